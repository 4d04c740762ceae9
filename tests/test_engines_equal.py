"""One settings record, one in-process loop: the Flower strategy and the simulator's in-process engine give the same
globals, bit for bit, for every kind of arm (prefix with self-pruning, windows, nested training, DP).

The Flower side is `HetLoRAStrategy` driving the real HetLoRA `ClientApp` through an in-process grid (no Ray); the
in-process side is `run_inprocess_simulation`, a `Coordinator` over a `LocalStore` closing each round in
`hetlora_bench.engines.run_round` (what ``hetlora simulate`` runs). Both take one `FederationSettings` record and one
`LocalTrainingConfig`. The prefix case is also checked against the independent numpy reference of `test_flower`.
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.app import ArrayRecord  # noqa: E402
from test_flower import (  # noqa: E402, F401 - task_identity: an autouse fixture messages need
    CONFIG,
    TASK,
    TRAINING,
    assert_matches_reference,
    client_ids,
    initial,
    inline_grid,
    task_identity,
)

from hetlora_bench.engines import run_inprocess_simulation  # noqa: E402
from peft_hetlora.federated import FederationSettings  # noqa: E402
from peft_hetlora.federated.aggregation.privacy import DPConfig  # noqa: E402
from peft_hetlora.flower import HetLoRAStrategy  # noqa: E402

pytestmark = [pytest.mark.flower]

RANKS = {"client-0": 2, "client-1": 5, "client-2": 8}

CASES = {
    # the paper's prefix rule; the clients self-prune (CONFIG has prune_lambda > 0)
    "hetlora_prefix": (dict(method="hetlora"), TRAINING),
    # FlexLoRA over held adapters, coverage windows: clients receive the whole global and train their window
    "flexlora_held_windows": (dict(method="flexlora_held", component_selection="coverage", anchor=1),
                              dataclasses.replace(TRAINING, prune=False)),
    # nested prefixes: every optimizer step trains a random prefix of the client's rank
    "rankwise_nested": (dict(method="rankwise"), dataclasses.replace(TRAINING, nested=True, local_steps=2)),
    # central DP with seeded noise (reproducible), Poisson sampling at q
    "rankwise_dp": (dict(method="rankwise", dp_noise_seed=True,
                         dp=DPConfig(clip=0.5, noise_multiplier=0.8, delta=1e-5, sampling_rate=0.7,
                                     expected_clients=2.1)), dataclasses.replace(TRAINING, prune=False)),
}


def assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    unequal = [key for key in a if not torch.equal(a[key], b[key])]
    assert not unequal, f"{len(unequal)} of {len(a)} tensors differ, e.g. {unequal[:2]}"


@pytest.mark.parametrize("case", list(CASES))
def test_flower_strategy_and_inprocess_simulator_publish_the_same_globals(initial, case):  # noqa: F811
    given, training = CASES[case]
    settings = FederationSettings.from_kwargs(rank_policy=RANKS, clients=client_ids(3), seed=3, **given)
    rounds = 2
    strategy = HetLoRAStrategy(CONFIG, settings, min_available_nodes=3, training=training, keep_updates=True)
    strategy.start(grid=inline_grid(3), initial_arrays=ArrayRecord(initial), num_rounds=rounds)
    reference = run_inprocess_simulation(TASK, adapter_config=CONFIG, settings=settings, num_clients=3, rounds=rounds,
                                         training=training, initial_state_dict=initial, keep_updates=True)

    assert len(strategy.history) == len(reference.rounds) == rounds
    for flower, inprocess in zip(strategy.history, reference.rounds):
        for key in ("participants", "assigned_ranks", "accepted", "weights", "client_ranks"):
            assert flower[key] == inprocess[key], key
        assert flower.get("components") == inprocess.get("components")
        assert flower.get("privacy") == inprocess.get("privacy")
    assert any(h["accepted"] for h in strategy.history)  # something was aggregated
    for t in range(rounds):
        flower_updates = {u.client_id: u for u in strategy.round_updates[t]}
        for update in reference.updates[t]:
            assert_equal_states(update.state_dict, flower_updates[update.client_id].state_dict)
    assert_equal_states(strategy.global_state, reference.final_state_dict)
    assert not all(torch.equal(initial[k], reference.final_state_dict[k]) for k in initial)  # the global moved
    if case == "hetlora_prefix":  # and the first round is the paper's rule, computed independently
        first = run_inprocess_simulation(TASK, adapter_config=CONFIG, settings=settings, num_clients=3, rounds=1,
                                         training=training, initial_state_dict=initial, keep_updates=True)
        assert_matches_reference(first.final_state_dict, first.updates[0], "hetlora",
                                 weights=first.rounds[0]["weights"])


def test_the_keyword_form_of_the_inprocess_simulator_builds_the_same_record(initial):  # noqa: F811
    settings = FederationSettings.from_kwargs(method="rankwise", rank_policy=RANKS, clients=client_ids(3), seed=3)
    by_record = run_inprocess_simulation(TASK, adapter_config=CONFIG, settings=settings, num_clients=3,
                                         training=TRAINING, initial_state_dict=initial)
    by_keywords = run_inprocess_simulation(TASK, adapter_config=CONFIG, method="rankwise", ranks=RANKS, seed=3,
                                           num_clients=3, training=TRAINING, initial_state_dict=initial)
    assert_equal_states(by_record.final_state_dict, by_keywords.final_state_dict)
    with pytest.raises(TypeError, match="not both"):
        run_inprocess_simulation(TASK, adapter_config=CONFIG, settings=settings, method="hetlora", num_clients=3)
