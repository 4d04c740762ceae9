"""The round engine's wiring (issue 14): registered robust methods and client-level DP, end to end through the
coordinator and `hetlora coordinate`, checked against independent numpy references and Opacus's accountant."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import reference as np_ref
from robust_reference import robust_global
from safetensors.numpy import load_file as np_load_file
from test_coordinator import CLIENTS, FakeClients, initial_adapter, make_coordinator, np_upload

from peft_hetlora.commands.coordinate import main
from peft_hetlora.federated import AGGREGATION_METHODS, RobustMethod, register_aggregation, unregister_aggregation
from peft_hetlora.federated.aggregation.privacy import DPConfig, privacy_spent
from peft_hetlora.federated.policies import poisson_sample
from peft_hetlora.federated.round import plan_round
from peft_hetlora.federated.stores import LocalStore
from peft_hetlora.utils.errors import AggregationError


def global_np(store: LocalStore, t: int) -> dict[str, np.ndarray]:
    return np_load_file(str(Path(store.get_global(t).path) / "adapter_model.safetensors"))


def round_updates(store: LocalStore, t: int, accepted) -> list[SimpleNamespace]:
    out = []
    for cid in accepted:
        sd, meta = np_upload(store, t, cid)
        out.append(SimpleNamespace(client_id=cid, state_dict=sd, rank=meta["rank_out"],
                                   num_examples=meta["num_examples"]))
    return out


def run(tmp_path: Path, name: str, **kwargs):
    store = LocalStore(tmp_path / name, create=True)
    fake = FakeClients(store, tmp_path / f"work-{name}", prune=kwargs.pop("prune", ()), meta=kwargs.pop("meta", None))
    coord = make_coordinator(store, fake, **kwargs)
    coord.init(initial_adapter(tmp_path / f"init-{name}", 4))
    coord.run()
    return store, coord


def assert_state(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], atol=1e-6) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key].astype(np.float64), value, rtol=1e-5, atol=atol, err_msg=key)


def test_robust_methods_are_registered_by_name():
    assert "median" in AGGREGATION_METHODS and "trimmed_mean" in AGGREGATION_METHODS


@pytest.fixture
def trimmed_34():
    register_aggregation("trimmed_34", RobustMethod("trimmed_mean", trim=0.34))
    yield "trimmed_34"
    unregister_aggregation("trimmed_34")


@pytest.mark.parametrize("method,rule,trim", [("median", "median", 0.2), ("trimmed_mean", "trimmed_mean", 0.2),
                                              ("trimmed_34", "trimmed_mean", 0.34)])
def test_coordinator_rounds_with_a_robust_method_match_numpy(tmp_path, trimmed_34, method, rule, trim):
    store, _ = run(tmp_path, method, method=method, prune=("c",), rounds=2, clients_per_round=4)
    for t in range(2):
        summary = store.read_summary(t)
        assert summary["method"] == method and len(summary["accepted"]) == 4
        updates = round_updates(store, t, summary["accepted"])
        assert len({u.rank for u in updates}) > 2  # heterogeneous coverage is exercised
        expected = robust_global(updates, 4, rule, trim=trim, previous=global_np(store, t))
        assert_state(global_np(store, t + 1), expected)
        mean = np_ref.rankwise(updates, 4, 2.0, previous=global_np(store, t), data_weights=True)
        name = next(iter(mean))
        assert not np.allclose(expected[f"{name}.lora_A.weight"], mean[name][0])  # a robust rule, not a mean


def test_dp_without_noise_and_with_a_huge_clip_equals_the_plain_path(tmp_path):
    same_size = {cid: {"num_examples": 20} for cid in CLIENTS}  # the plain path's data weights are then uniform
    dp = DPConfig(clip=1e9, noise_multiplier=0.0, delta=1e-5, sampling_rate=1.0, expected_clients=4)
    dp_store, _ = run(tmp_path, "dp", method="zero_pad", dp=dp, clients_per_round=4, meta=same_size)
    plain_store, _ = run(tmp_path, "plain", method="zero_pad", clients_per_round=4, meta=same_size)
    for t in range(3):
        summary = dp_store.read_summary(t)
        assert summary["accepted"] == CLIENTS and summary["privacy"]["epsilon"] is None
        updates = round_updates(dp_store, t, CLIENTS)
        factors, extras, _ = np_ref.weighted(updates, [1.0] * 4, 4)  # uniform mean of the zero-padded factors
        expected = dict(extras)
        for name, (a, b) in factors.items():
            expected[f"{name}.lora_A.weight"], expected[f"{name}.lora_B.weight"] = a, b
        assert_state(global_np(dp_store, t + 1), expected, atol=1e-5)
        assert_state(global_np(plain_store, t + 1), expected, atol=1e-5)


def test_dp_rounds_record_the_accountants_epsilon_and_hide_client_norms(tmp_path):
    dp = DPConfig(clip=0.5, noise_multiplier=1.1, delta=1e-5, sampling_rate=0.75, population=4)
    store, coord = run(tmp_path, "eps", method="rankwise", dp=dp, rounds=2)
    assert all(store.read_summary(t)["accepted"] for t in range(2))
    for t in range(2):
        summary = store.read_summary(t)
        assert summary["privacy"]["epsilon"] == pytest.approx(privacy_spent(dp, t + 1)["epsilon"], rel=1e-12)
        assert summary["privacy"]["rounds"] == t + 1 and summary["privacy"]["accountant"] == "rdp"
        assert all("norm" not in info for info in summary["clients"].values())
        # Poisson sampling at q (as the accountant assumes), seeded: the plan is the protocol's
        assert summary["participants"] == poisson_sample(CLIENTS, 0.75, seed=7, round_idx=t)
    card = (store.path / "README.md").read_text()
    assert "## Differential privacy" in card and "epsilon" in card
    # a coordinator resumed without dp= takes the DP settings from federation.json
    resumed = make_coordinator(store, None, method=None, rank_policy=None, seed=None)
    assert resumed.dp == dp


def test_dp_refuses_hetlora_sparsity_weights_and_a_missing_denominator(tmp_path):
    with pytest.raises(AggregationError, match="no differentially private form"):
        make_coordinator(LocalStore(tmp_path / "s", create=True), None, method="hetlora",
                         dp=DPConfig(clip=1.0, noise_multiplier=1.0, delta=1e-5, expected_clients=3))
    with pytest.raises(AggregationError, match="expected_clients"):
        make_coordinator(LocalStore(tmp_path / "t", create=True), None, method="rankwise",
                         dp=DPConfig(clip=1.0, noise_multiplier=1.0, delta=1e-5))


def test_poisson_plan_draws_each_client_with_probability_q():
    clients = [f"c{i}" for i in range(50)]
    counts = [len(plan_round(t, clients, dict.fromkeys(clients, 2), clients_per_round=50, seed=3,
                             sampling_rate=0.2).participants) for t in range(200)]
    assert abs(np.mean(counts) - 10.0) < 1.0  # binomial(50, 0.2): mean 10, sd of the mean of 200 draws ~0.2
    assert len(set(counts)) > 3  # not a fixed-size sample


def test_cli_turns_on_dp_and_accepts_a_robust_method(tmp_path, capsys):
    init = initial_adapter(tmp_path / "init", 4)
    base = ["--store", str(tmp_path / "fed"), "--init-adapter", str(init), "--clients", "a,b,c,d",
            "--clients-per-round", "2", "--rounds", "3", "--no-progress"]
    assert main([*base, "--method", "zero_pad", "--dp-clip", "0.5", "--dp-noise-multiplier", "1.3",
                 "--dp-delta", "1e-5"]) == 0
    fed = json.loads((tmp_path / "fed" / "federation.json").read_text())
    assert fed["method"] == "zero_pad"
    assert fed["dp"]["clip"] == 0.5 and fed["dp"]["noise_multiplier"] == 1.3 and fed["dp"]["sampling_rate"] == 0.5
    assert main(["--store", str(tmp_path / "rob"), "--init-adapter", str(init), "--clients", "a,b,c",
                 "--method", "median", "--no-progress"]) == 0
    assert json.loads((tmp_path / "rob" / "federation.json").read_text())["method"] == "median"
    assert main([*base[:2], "--dp-noise-multiplier", "1.0"]) == 2  # a usage error (peft_hetlora.cli.EXIT_STATUS)
    assert "need --dp-clip" in capsys.readouterr().err
