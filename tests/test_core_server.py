"""The server side of core clients: plan, validation of hostile core uploads, expansion before aggregation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from peft_hetlora.federated.adapter.core import CORE_SUFFIX, core_bases, core_seed
from peft_hetlora.federated.aggregation import ClientUpdate, StreamingAggregator
from peft_hetlora.federated.round import RoundPlan, RoundSettings, close_round
from peft_hetlora.federated.round.plan import plan_round
from peft_hetlora.federated.round.settings import check_client_training, core_methods
from peft_hetlora.federated.upload import RejectedUpload, UploadSpec, validate_update
from peft_hetlora.utils.errors import AggregationError

R_MAX, D_IN, D_OUT, S = 6, 20, 14, 2.0
MODULES = ("m0", "m1")
REVISION = "abc123"


def _previous(seed=0, zero_b=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in MODULES:
        out[f"{m}.lora_A.weight"] = torch.randn(R_MAX, D_IN, generator=g)
        out[f"{m}.lora_B.weight"] = torch.zeros(D_OUT, R_MAX) if zero_b else torch.randn(D_OUT, R_MAX, generator=g)
    return out


def _spec():
    return UploadSpec(modules={m: (D_IN, D_OUT) for m in MODULES}, r_min=1, r_max=R_MAX)


def _report(cid="a", core_rank=4, rank=2, **extra):
    out = {"client_id": cid, "round": 0, "rank_in": rank, "rank_out": rank, "num_examples": 10,
           "global_revision": REVISION}
    if core_rank is not None:
        out["core_rank"] = core_rank
    out.update(extra)
    return out


def _cores(r_c=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {m + CORE_SUFFIX: torch.randn(r_c, r_c, generator=g) for m in MODULES}


def _validate(adapter, report, assigned_core=4, **kw):
    return validate_update(adapter, report, _spec(), client_id="a", round_idx=0,
                           assigned_rank=2, assigned_core=assigned_core, current_revision=REVISION, **kw)


def test_a_core_upload_is_accepted_only_when_the_round_asked_for_it():
    update = _validate(_cores(), _report())
    assert set(update.state_dict) == {m + CORE_SUFFIX for m in MODULES} and update.metadata["core_rank"] == 4
    assert _validate(_cores(3), _report(core_rank=3)).metadata["core_rank"] == 3  # a smaller core: its budget
    cases = {
        "did not ask this client for a core": dict(assigned_core=None),
        "reports no core_rank": dict(report=_report(core_rank=None)),
        "core_rank": dict(report=_report(core_rank=5)),  # above the assigned core
        "not the round's": dict(report=_report(global_revision="old")),
        "is not the declared core_rank": dict(adapter={**_cores(), "m1" + CORE_SUFFIX: torch.zeros(4, 3)}),
        "non-finite": dict(adapter={**_cores(), "m0" + CORE_SUFFIX: torch.full((4, 4), float("nan"))}),
        "core upload keys do not match": dict(adapter={"m0" + CORE_SUFFIX: torch.zeros(4, 4)}),
        "components with a core_rank": dict(report=_report(components=[0, 1])),
    }
    for reason, change in cases.items():
        adapter = change.get("adapter", _cores())
        report = change.get("report", _report())
        with pytest.raises(RejectedUpload, match=reason):
            _validate(adapter, report, assigned_core=change.get("assigned_core", 4))
    # factors where the round asked for a core: refused (the report has no core_rank)
    factors = {f"{m}.lora_A.weight": torch.zeros(2, D_IN) for m in MODULES}
    factors.update({f"{m}.lora_B.weight": torch.zeros(D_OUT, 2) for m in MODULES})
    with pytest.raises(RejectedUpload, match="reports no core_rank"):
        _validate(factors, _report(core_rank=None))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(core_rank=st.one_of(st.none(), st.integers(-3, 9), st.floats(allow_nan=True), st.text(max_size=3),
                           st.booleans()),
       shape=st.tuples(st.integers(0, 7), st.integers(0, 7)),
       value=st.sampled_from([0.0, 1.0, 1e30, float("inf"), float("nan")]),
       revision=st.sampled_from([REVISION, "other", None]))
def test_hostile_core_uploads_are_rejected_with_a_reason_never_a_crash(core_rank, shape, value, revision):
    adapter = {m + CORE_SUFFIX: torch.full(shape, value) for m in MODULES}
    report = _report(core_rank=core_rank, global_revision=revision)
    try:
        update = _validate(save(adapter), json.dumps(report).encode())
    except RejectedUpload as err:
        assert err.reason
        return
    # accepted: then everything about it was valid
    assert isinstance(core_rank, int) and not isinstance(core_rank, bool) and 1 <= core_rank <= 4
    assert shape == (core_rank, core_rank) and np.isfinite(value) and revision == REVISION
    assert all(torch.isfinite(v).all() for v in update.state_dict.values())


def _held_product_reference(previous, cores, r_c):
    """W_k of a core client by an independent route: dense SVD of the global, U_c C V_c^T + the global's tail."""
    out = {}
    for m in MODULES:
        a, b = previous[f"{m}.lora_A.weight"].double().numpy(), previous[f"{m}.lora_B.weight"].double().numpy()
        dense = S * b @ a
        u, s, vh = np.linalg.svd(dense)
        bases = core_bases(previous[f"{m}.lora_A.weight"], previous[f"{m}.lora_B.weight"], r_c,
                           seed=core_seed(m, previous[f"{m}.lora_A.weight"], previous[f"{m}.lora_B.weight"]),
                           scaling=S)
        # the same subspace as numpy's top r_c singular vectors (signs aside; at round 0 there are none)
        if s[0] > 0:
            np.testing.assert_allclose(np.abs(bases.u.numpy().T @ u[:, :r_c]), np.eye(r_c), atol=1e-6)
        core_part = S * bases.u.numpy() @ cores[m + CORE_SUFFIX].double().numpy() @ bases.v.numpy().T
        tail = S * b[:, r_c:] @ a[r_c:]  # flexlora_held adds the previous global's components r_c.. back
        out[m] = core_part + tail
    return out


def _svd_ordered(previous):
    """The previous global in flexlora's form (B = U S / s, A = V^T), as every round after round 0 publishes it."""
    out = {}
    for m in MODULES:
        a, b = previous[f"{m}.lora_A.weight"].double(), previous[f"{m}.lora_B.weight"].double()
        u, s, vh = torch.linalg.svd(S * b @ a, full_matrices=False)
        out[f"{m}.lora_A.weight"] = vh[:R_MAX].float().contiguous()
        out[f"{m}.lora_B.weight"] = (u[:, :R_MAX] * s[:R_MAX] / S).float().contiguous()
    return out


@pytest.mark.parametrize("round_zero", [False, True])
def test_core_and_factor_clients_merge_in_product_space(round_zero):
    previous = _previous(zero_b=True) if round_zero else _svd_ordered(_previous())
    cores = _cores(4)
    g = torch.Generator().manual_seed(9)
    factor = {f"{m}.lora_A.weight": torch.randn(R_MAX, D_IN, generator=g) for m in MODULES}
    factor.update({f"{m}.lora_B.weight": torch.randn(D_OUT, R_MAX, generator=g) for m in MODULES})
    agg = StreamingAggregator("flexlora_held", r_max=R_MAX, scaling=S, previous=previous, clip_norm="off",
                              max_weight_ratio=None)
    agg.add(ClientUpdate("core", cores, rank=2, num_examples=30))
    agg.add(ClientUpdate("capable", factor, rank=R_MAX, num_examples=10))
    result = agg.result().state_dict
    held = _held_product_reference(previous, cores, 4)
    for m in MODULES:
        a_f, b_f = factor[f"{m}.lora_A.weight"].double().numpy(), factor[f"{m}.lora_B.weight"].double().numpy()
        dense = 0.75 * held[m] + 0.25 * S * b_f @ a_f
        u, s, vh = np.linalg.svd(dense)
        reference = (u[:, :R_MAX] * s[:R_MAX]) @ vh[:R_MAX]
        got = S * result[f"{m}.lora_B.weight"].double().numpy() @ result[f"{m}.lora_A.weight"].double().numpy()
        np.testing.assert_allclose(got, reference, atol=1e-4 * np.abs(reference).max())


def test_the_adaptive_bound_does_not_freeze_a_capable_clients_a():
    """Core clients never move A: the A radius follows the factor clients, so a capable client is not clipped to 0."""
    previous = _svd_ordered(_previous())
    g = torch.Generator().manual_seed(3)
    factor = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in previous.items()}
    updates = [ClientUpdate(f"core{i}", _cores(4, seed=i), rank=2, num_examples=10) for i in range(3)]
    updates.append(ClientUpdate("capable", factor, rank=R_MAX, num_examples=10))
    agg = StreamingAggregator("flexlora_held", r_max=R_MAX, scaling=S, previous=previous, clip_norm="adaptive")
    for u in updates:
        agg.observe(u)
    for u in updates:
        agg.add(u)
    res = agg.result()
    assert res.clip_scales["capable"] == 1.0
    assert res.influence["radius_a"] > 0


def test_only_methods_that_accept_cores_take_them():
    assert core_methods() == ("flexlora_held",)
    for method in ("flexlora", "hetlora", "fedavg"):
        with pytest.raises(AggregationError, match="cannot aggregate"):
            check_client_training(method, "core")
    agg = StreamingAggregator("flexlora", r_max=R_MAX, scaling=S, previous=_previous(), clip_norm="off",
                              max_weight_ratio=None)
    with pytest.raises(AggregationError, match="does not take"):
        agg.add(ClientUpdate("a", _cores(), rank=2, num_examples=3))
    with pytest.raises(AggregationError):
        check_client_training("flexlora_held", "core", "coverage")


def test_plan_gives_each_weak_participant_its_budget_core_and_round_trips():
    plan = plan_round(0, ["a", "b", "c"], {"a": 2, "b": 4, "c": 16}, clients_per_round=3, seed=0, r_max=16,
                      client_training="core", module_dims={"q": (576, 576), "k": (576, 192)})
    assert plan.cores == {"a": 7, "b": 14}  # by hand in test_core_math; c (r_max) trains factors
    settings_ = RoundSettings(method="flexlora_held", r_max=16, r_min=2, scaling=2.0, client_training="core")
    info = plan.to_json(settings_)
    assert info["cores"] == {"a": 7, "b": 14} and info["client_training"] == "core"
    back = RoundPlan.from_json(info, round_idx=0, revision="r")
    assert back.core_of("a") == 7 and back.core_of("c") is None
    with pytest.raises(AggregationError):
        RoundSettings(method="fedavg", r_max=16, r_min=2, scaling=2.0, client_training="core")


def test_close_round_rejects_a_core_it_cannot_expand_and_keeps_the_others():
    previous = _svd_ordered(_previous())
    plan = RoundPlan(0, ["a", "b"], {"a": 2, "b": 2}, revision=REVISION, cores={"a": 4, "b": 4})
    settings_ = RoundSettings(method="flexlora_held", r_max=R_MAX, r_min=1, scaling=S, client_training="core")
    bad = {m + CORE_SUFFIX: torch.zeros(4, 4) for m in MODULES}
    bad["m1" + CORE_SUFFIX] = torch.zeros(3, 3)  # cores of two ranks
    out = close_round(plan, [ClientUpdate("a", _cores(), rank=2, num_examples=5, metadata=_report("a")),
                             ClientUpdate("b", bad, rank=2, num_examples=5, metadata=_report("b"))],
                      previous, settings_, client_ranks={"a": 2, "b": 2}, initial_ranks={"a": 2, "b": 2})
    assert out.summary["accepted"] == ["a"] and "one rank" in out.summary["rejected"]["b"]
    assert out.client_ranks["a"] == 2  # a core client keeps its factor rank
