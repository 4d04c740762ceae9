"""Component selection end to end: the coordinator's plan -> window clients -> validated indexed uploads -> global.

The new global is compared with the numpy reference of the general component rule (`tests/reference.py`) computed on
the uploads as they landed in the store, never with the code's own output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from peft_hetlora.federated import Coordinator, LocalStore
from peft_hetlora.federated.aggregation import ClientUpdate, UpdateShapeError, validate_round
from peft_hetlora.federated.round import RoundSettings, plan_round
from peft_hetlora.federated.upload import RejectedUpload, UploadSpec, validate_update
from peft_hetlora.utils.errors import AggregationError, FederationMismatch
from tests import reference
from tests.test_callbacks import _train, make_model
from trainer_callbacks import FederatedClientCallback

R_MAX = 8
RANKS = {"a": 2, "b": 3, "c": 4}


def _initial_adapter(tmp_path):
    model = make_model(rank=R_MAX, r=R_MAX, seed=0)
    gen = torch.Generator().manual_seed(11)
    for name, param in model.named_parameters():
        if "lora_A" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1
    folder = tmp_path / "init"
    model.save_pretrained(str(folder))
    return folder


def _coordinator(tmp_path, **kwargs):
    settings = dict(method="component", r_max=R_MAX, r_min=1, clients=sorted(RANKS), rank_policy=dict(RANKS),
                    rounds=2, component_selection="coverage", progress=False)
    settings.update(kwargs)
    return Coordinator(LocalStore(tmp_path / "fed", create=True), **settings)


def test_coverage_windows_flow_from_round_json_to_the_reference_global(tmp_path):
    coord = _coordinator(tmp_path)
    first = coord.init(_initial_adapter(tmp_path))
    info = json.loads((Path(first.path) / "round.json").read_text())
    windows = info["components"]
    assert info["component_selection"] == "coverage"
    assert set(windows) == set(RANKS)
    assert {cid: len(w) for cid, w in windows.items()} == RANKS
    # 2 + 3 + 4 >= 8: coverage trains every component of the global at least once
    assert sorted({j for w in windows.values() for j in w}) == list(range(R_MAX))
    assert any(w != list(range(len(w))) for w in windows.values())
    previous = load_file(str(Path(first.path) / "adapter_model.safetensors"))

    for cid in sorted(RANKS):
        model = make_model(rank=R_MAX, r=R_MAX, seed=0)  # budget r_max: trains exactly its window
        client = FederatedClientCallback(coord.store, cid, prune=False)
        _train(tmp_path / cid, model, [client], max_steps=2)
        assert client.last_round["components"] == windows[cid]

    summary = coord.close_round(0)
    assert summary["accepted"] == sorted(RANKS) and summary["rejected"] == {}
    assert summary["assigned_components"] == windows
    assert summary["coverage"] == [sum(j in w for w in windows.values()) for j in range(R_MAX)]
    assert {cid: d["components"] for cid, d in summary["clients"].items()} == windows

    updates = []
    for cid in sorted(RANKS):
        folder = coord.store.download_client(0, cid)
        meta = json.loads((Path(folder) / "client.json").read_text())
        assert meta["components"] == windows[cid]
        updates.append(ClientUpdate(cid, load_file(str(Path(folder) / "adapter_model.safetensors")), meta["rank_out"],
                                    meta["num_examples"], components=meta["components"]))
    expected = reference.component_rule(updates, R_MAX, coord.scaling, previous=previous)
    new = load_file(str(Path(coord.store.get_global(1).path) / "adapter_model.safetensors"))
    got = reference.np_modules(new)
    assert set(got) == set(expected)
    moved = 0.0
    for name, (a, b) in expected.items():
        np.testing.assert_allclose(got[name][0], a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[name][1], b, rtol=1e-5, atol=1e-6)
        moved += float(np.abs(a - reference.np_modules(previous)[name][0]).sum())
    assert moved > 0  # the clients trained: the global changed

    # round 1's plan assigns windows again (rolling / coverage re-drawn per round) from the next ranks
    info1 = json.loads((Path(coord.store.get_global(1).path) / "round.json").read_text())
    assert {cid: len(w) for cid, w in info1["components"].items()} == RANKS


def test_prefix_round_json_has_no_components_and_settings_are_recorded(tmp_path):
    coord = _coordinator(tmp_path, component_selection=None, method="hetlora")
    first = coord.init(_initial_adapter(tmp_path))
    info = json.loads((Path(first.path) / "round.json").read_text())
    assert "components" not in info
    assert coord.store.read_federation()["component_selection"] == "prefix"
    with pytest.raises(FederationMismatch, match="component_selection"):
        Coordinator(coord.store, component_selection="rolling").federation  # noqa: B018


def test_resume_with_another_selection_or_anchor_is_refused(tmp_path):
    coord = _coordinator(tmp_path, anchor=1)
    coord.init(_initial_adapter(tmp_path))
    assert coord.store.read_federation()["anchor"] == 1
    with pytest.raises(FederationMismatch, match="anchor"):
        Coordinator(coord.store, anchor=2).federation  # noqa: B018
    with pytest.raises(FederationMismatch, match="component_selection"):
        Coordinator(coord.store, component_selection="rolling").federation  # noqa: B018
    assert Coordinator(coord.store).component_selection == "coverage"


@pytest.mark.parametrize("method", ["fedavg", "flexlora"])
def test_window_selection_with_a_prefix_only_method_is_refused(tmp_path, method):
    with pytest.raises(AggregationError, match="cannot aggregate"):
        _coordinator(tmp_path, method=method)


def test_window_selection_with_dp_or_bad_names_is_refused():
    with pytest.raises(AggregationError, match="prefix uploads only"):
        RoundSettings(method="rankwise", r_max=8, r_min=1, scaling=1.0, component_selection="rolling",
                      dp=type("DP", (), {"expected_clients": 4})())
    with pytest.raises(AggregationError, match="component_selection must be one of"):
        RoundSettings(method="component", r_max=8, r_min=1, scaling=1.0, component_selection="random")
    with pytest.raises(AggregationError, match="anchor"):
        RoundSettings(method="component", r_max=8, r_min=1, scaling=1.0, component_selection="rolling", anchor=9)


def _spec():
    return UploadSpec(modules={"m": (6, 5)}, r_min=1, r_max=R_MAX)


def _upload(rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(rank, 6, generator=gen),
            "m.lora_B.weight": torch.randn(5, rank, generator=gen)}


def _report(**kw):
    out = {"client_id": "a", "round": 0, "rank_in": 3, "rank_out": 3, "num_examples": 4}
    out.update(kw)
    return out


def test_validation_accepts_the_assigned_window_and_builds_an_indexed_update():
    update = validate_update(_upload(3), _report(components=[6, 1, 4]), _spec(), client_id="a", round_idx=0,
                             assigned_rank=3, assigned_components=(1, 4, 6))
    assert update.components == (6, 1, 4)


@pytest.mark.parametrize(
    ("report", "assigned", "match"),
    [
        (_report(components=[1, 4, 7]), (1, 4, 6), "not assigned"),
        (_report(components=[1, 4]), (1, 4, 6), "rank_out is 3"),
        (_report(components=[1, 1, 4]), (1, 4, 6), "more than once"),
        (_report(components=[1, 4, 6, 2], rank_in=3), None, "budget is 3"),
        (_report(components=[9, 1, 4]), None, "outside"),
        (_report(components="1,4,6"), (1, 4, 6), "list of ints"),
        (_report(), (1, 4, 6), "reports none"),
        (_report(components=[5, 6, 7]), None, "not assigned"),  # a prefix plan: only range(assigned rank)
    ],
)
def test_validation_rejects_components_the_round_did_not_give(report, assigned, match):
    with pytest.raises(RejectedUpload, match=match):
        validate_update(_upload(3), report, _spec(), client_id="a", round_idx=0, assigned_rank=3,
                        assigned_components=assigned)


def test_robust_dp_and_secure_sum_paths_refuse_indexed_uploads():
    up = ClientUpdate("a", _upload(2), 2, 4, components=[3, 5])
    with pytest.raises(UpdateShapeError, match="prefix uploads only"):
        validate_round([up], R_MAX)


def test_plan_round_windows_match_select_components():
    from peft_hetlora.federated.policies import select_components

    plan = plan_round(3, ["a", "b", "c"], RANKS, clients_per_round=2, seed=5, component_selection="rolling",
                      anchor=1, r_max=R_MAX)
    assert plan.components == select_components("rolling", plan.ranks, r_max=R_MAX, round_idx=3, seed=5, anchor=1)
    settings = RoundSettings(method="component", r_max=R_MAX, r_min=1, scaling=1.0, component_selection="rolling",
                             anchor=1)
    info = plan.to_json(settings)
    assert info["components"] == {cid: list(plan.components[cid]) for cid in plan.participants}
    back = type(plan).from_json(json.loads(json.dumps(info)), round_idx=3, revision="x")
    assert back.components == plan.components
    with pytest.raises(ValueError, match="r_max"):
        plan_round(0, ["a"], {"a": 2}, clients_per_round=1, seed=0, component_selection="coverage")
