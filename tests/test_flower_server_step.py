"""The Flower strategy runs the same server step as the coordinator (issue 24): state kept in memory, mirrored beside
each global in the store, and every mirrored global is what `round.close_round` makes of the round's updates."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.app import ArrayRecord  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from peft_hetlora.federated.round import RoundPlan, close_round  # noqa: E402
from peft_hetlora.federated.stores import LocalStore  # noqa: E402
from peft_hetlora.utils.constants import ADAPTER_FILE, SERVER_STATE_FILE  # noqa: E402
from tests.test_flower import (  # noqa: E402, F401  (fixtures register by import)
    initial,
    inline_grid,
    strategy_for,
    stub_client_app,
    task_identity,
)


def test_flower_keeps_the_server_state_and_mirrors_it_beside_each_global(initial, tmp_path):  # noqa: F811
    store = LocalStore(tmp_path / "fed", create=True)
    ranks = {"client-0": 2, "client-1": 8}
    strategy = strategy_for(2, ranks, method="flexlora_held", store=store, error_feedback=True,
                            server_optimizer={"name": "fedavgm", "lr": 0.9, "momentum": 0.5})
    strategy.start(grid=inline_grid(2, app=stub_client_app(2)), initial_arrays=ArrayRecord(initial), num_rounds=2)
    assert store.read_federation()["server_optimizer"] == {"name": "fedavgm", "lr": 0.9, "momentum": 0.5}
    state = None
    for t in range(2):
        summary = strategy.history[t]
        previous = load_file(str(store.get_global(t).path / ADAPTER_FILE))
        plan = RoundPlan(t, list(summary["participants"]), dict(summary["assigned_ranks"]))
        again = close_round(plan, strategy.round_updates[t], previous, strategy.round_settings(),
                            client_ranks=summary["assigned_ranks"], initial_ranks=strategy.initial_ranks,
                            clock=lambda: 0.0, server_state=state)
        published = load_file(str(store.get_global(t + 1).path / ADAPTER_FILE))
        mirrored = load_file(str(store.get_global(t + 1).path / SERVER_STATE_FILE))
        assert summary["server_step"]["error_feedback"] is True and again.accepted == summary["accepted"]
        for key, value in again.state_dict.items():
            torch.testing.assert_close(published[key], value, atol=1e-6, rtol=1e-5)
        assert mirrored.keys() == again.server_state.keys()
        for key, value in again.server_state.items():
            torch.testing.assert_close(mirrored[key], value, atol=1e-9, rtol=1e-7)
        state = mirrored
    assert strategy.server_state.keys() == state.keys()
