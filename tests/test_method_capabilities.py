"""A method declares what it is (issue 23): the engines ask its capabilities, never its name.

A method registered here, in the test and nowhere else, runs a coordinator round, a Flower strategy round and a DP
round; the results are checked against independent numpy references (tests/reference.py, coordinator_fakes).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import reference as np_ref
from coordinator_fakes import (
    CLIENTS,
    EXTRA,
    FakeClients,
    expected_aggregate,
    initial_adapter,
    make_coordinator,
    np_upload,
)
from safetensors.numpy import load_file as np_load_file

from peft_hetlora.federated import AggregationMethod, LocalStore, register_aggregation, unregister_aggregation
from peft_hetlora.federated.aggregation import PaddedSum, get_aggregation
from peft_hetlora.federated.aggregation.privacy import DPConfig
from peft_hetlora.federated.round import RoundSettings, check_dp, dp_method_for, dp_methods, window_methods
from peft_hetlora.utils.errors import AggregationError


class EqualRankMean(AggregationMethod):
    """A homogeneous, data-weighted mean of the zero-padded factors with a DP form: what ``fedavg`` is, under
    another name, so that nothing outside this file can know it."""

    weights: ClassVar[str] = "data"
    homogeneous: ClassVar[bool] = True
    default_rank_policy: ClassVar[str] = "constant"
    dp_form: ClassVar[str | None] = "zero_pad"
    secure_sum: ClassVar[str | None] = "prefix"

    def accumulator(self, a_shape, b_shape, r_max):
        return PaddedSum(a_shape, b_shape, r_max, covered_only=False)


class NoDPMean(EqualRankMean):
    dp_form: ClassVar[str | None] = None


@pytest.fixture
def equal_rank_mean():
    register_aggregation("equal_rank_mean", EqualRankMean)
    register_aggregation("no_dp_mean", NoDPMean)
    yield "equal_rank_mean"
    unregister_aggregation("equal_rank_mean")
    unregister_aggregation("no_dp_mean")


def global_np(store: LocalStore, t: int) -> dict[str, np.ndarray]:
    return np_load_file(str(Path(store.get_global(t).path) / "adapter_model.safetensors"))


def test_builtin_capabilities_are_the_former_name_tables():
    """The tables the engines used to keep (DP forms, window takers, homogeneous, secure sums) read from methods."""
    former_dp = {"rankwise": "component", "component": "component", "zero_pad": "zero_pad", "fedavg": "zero_pad"}
    builtins = ["hetlora", "zero_pad", "fedavg", "flexlora", "rankwise", "component", "component_data",
                "component_fedavg", "flexlora_held"]
    assert {m: get_aggregation(m).dp_form for m in builtins if get_aggregation(m).dp_form} == former_dp
    assert {m for m in builtins if get_aggregation(m).homogeneous} == {"fedavg"}
    assert {m: get_aggregation(m).default_rank_policy for m in builtins} == {
        m: "constant" if m == "fedavg" else "uniform" for m in builtins}
    assert {m for m in builtins if get_aggregation(m).secure_sum} == {"hetlora", "rankwise", "component", "zero_pad",
                                                                     "fedavg"}
    assert {m for m in builtins if get_aggregation(m).secure_sum == "indexed"} == {"component"}
    assert set(window_methods()) >= {"hetlora", "zero_pad", "rankwise", "component", "component_data",
                                     "component_fedavg", "flexlora_held"}
    assert not set(window_methods()) & {"fedavg", "flexlora"}
    assert set(dp_methods()) >= set(former_dp) and "hetlora" not in dp_methods()


def test_a_registered_method_runs_a_coordinator_round_from_its_capabilities(tmp_path, equal_rank_mean):
    store = LocalStore(tmp_path / "fed", create=True)
    fake = FakeClients(store, tmp_path / "work", prune={"a"})  # a reports rank_out 3: not the federation's rank
    coord = make_coordinator(store, fake, method=equal_rank_mean, rank_policy=None, clients_per_round=4,
                             min_clients=3, rounds=1)
    coord.init(initial_adapter(tmp_path / "init", r_max=4))
    coord.run()
    info = coord.federation
    assert info["method"] == equal_rank_mean
    assert info["initial_ranks"] == {cid: 4 for cid in CLIENTS}  # default_rank_policy "constant" (at r_max)
    summary = store.read_summary(0)
    assert summary["method"] == equal_rank_mean and summary["accepted"] == ["b", "c", "d"]
    assert "differs from the rank 4 this method requires" in summary["rejected"]["a"]  # homogeneous
    uploads = {cid: np_upload(store, 0, cid) for cid in summary["accepted"]}
    expected, weights = expected_aggregate("zero_pad", uploads, global_np(store, 0), 4, 2.0)
    got = global_np(store, 1)
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert summary["weights"] == pytest.approx(weights, rel=1e-6)


def test_a_registered_method_runs_under_dp_by_its_dp_form(tmp_path, equal_rank_mean):
    assert dp_method_for(equal_rank_mean) == "zero_pad" and equal_rank_mean in dp_methods()
    dp = DPConfig(clip=1e9, noise_multiplier=0.0, delta=1e-5, sampling_rate=1.0, expected_clients=4)
    check_dp(equal_rank_mean, dp)
    RoundSettings(method=equal_rank_mean, r_max=4, r_min=1, scaling=2.0, dp=dp)
    with pytest.raises(AggregationError, match="no differentially private form"):
        check_dp("no_dp_mean", dp)
    store = LocalStore(tmp_path / "dp", create=True)
    same_size = {cid: {"num_examples": 20} for cid in CLIENTS}
    fake = FakeClients(store, tmp_path / "work", meta=same_size)
    coord = make_coordinator(store, fake, method=equal_rank_mean, rank_policy=None, dp=dp, clients_per_round=4,
                             rounds=1)
    coord.init(initial_adapter(tmp_path / "init", r_max=4))
    coord.run()
    summary = store.read_summary(0)
    assert summary["accepted"] == CLIENTS and "privacy" in summary
    updates = []
    for cid in CLIENTS:
        sd, meta = np_upload(store, 0, cid)
        updates.append(SimpleNamespace(client_id=cid, state_dict=sd, rank=meta["rank_out"],
                                       num_examples=meta["num_examples"]))
    # noise 0, a clip nobody reaches, public weights 1 over 4 expected clients: the uniform mean of padded factors
    factors, extras, _ = np_ref.weighted(updates, [1.0] * 4, 4)
    got = global_np(store, 1)
    for name, (a, b) in factors.items():
        np.testing.assert_allclose(got[f"{name}.lora_A.weight"], a, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[f"{name}.lora_B.weight"], b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[EXTRA], extras[EXTRA], rtol=1e-5, atol=1e-5)


@pytest.fixture
def flower_task_identity():
    """Messages built outside a Flower runtime need the process's task identity (as in test_flower)."""
    pytest.importorskip("flwr")
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # older Flower: messages need no process identity
        yield
        return
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_a_registered_method_runs_a_flower_strategy_round(equal_rank_mean, flower_task_identity):
    import test_flower as tf
    import torch
    from flwr.app import ArrayRecord
    from tiny_models import tiny_llama

    from peft_hetlora.flower import HetLoRAStrategy, LocalTrainingConfig, initial_global_state

    state = initial_global_state(tiny_llama(0), tf.CONFIG, seed=0)
    generator = torch.Generator().manual_seed(5)
    initial = {k: (torch.randn(v.shape, generator=generator) * 0.1 if ".lora_B." in k else v)
               for k, v in state.items()}
    strategy = HetLoRAStrategy(tf.CONFIG, method=equal_rank_mean, clients=tf.client_ids(3), min_available_nodes=3,
                               training=LocalTrainingConfig(local_steps=1, batch_size=4, prune=True),
                               keep_updates=True)
    assert strategy.rank_policy.kind == "constant"  # the method's default_rank_policy
    assert strategy.training.prune is False  # homogeneous: clients never prune
    strategy.start(grid=tf.inline_grid(3, app=tf.stub_client_app(3, prune=(2,))), initial_arrays=ArrayRecord(initial),
                   num_rounds=1)
    summary = strategy.history[0]
    assert summary["accepted"] == ["client-0", "client-1"]
    assert "client-2" in summary["rejected"]  # uploaded rank r_max - 1: a homogeneous method refuses it
    tf.assert_matches_reference(strategy.global_state, strategy.round_updates[0], "zero_pad", previous=initial,
                                weights=summary["weights"])

