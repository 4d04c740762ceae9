"""raFLoRA (arXiv 2602.13486): each component averaged in product space over its contributors, then the top r_max SVD.

Every expected value comes from an independent float64 numpy reference built with explicit loops (dense rank-one
products per uploaded column, numpy's SVD), never from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_hetlora.federated.aggregation import ClientUpdate, aggregate
from peft_hetlora.federated.aggregation.methods import get_aggregation
from peft_hetlora.federated.round import RoundPlan, RoundSettings, close_round

R_MAX = 4
SCALE = 2.0
RATIO = 10.0
SHAPES = {"m0": (6, 5), "m1": (5, 7)}  # r_max = 4 < min(d_out, d_in): the truncation is a real one


def _previous(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (d_out, d_in) in SHAPES.items():
        out[f"{name}.lora_A.weight"] = torch.randn(R_MAX, d_in, generator=g) * 0.5
        out[f"{name}.lora_B.weight"] = torch.randn(d_out, R_MAX, generator=g) * 0.3
    return out


PREVIOUS = _previous()


def _upload(cid: str, rank: int, seed: int, *, n: int = 100, components: tuple[int, ...] | None = None,
            scale_a: float = 1.0, scale_b: float = 1.0) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (d_out, d_in) in SHAPES.items():
        sd[f"{name}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g).double() * scale_a).float()
        sd[f"{name}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g).double() * scale_b).float()
    return ClientUpdate(cid, sd, rank=rank, num_examples=n, components=components,
                        metadata={"rank_in": rank, "rank_out": rank, "num_examples": n, "train_loss": 1.0})


def raflora_dense(updates, r_max: int, previous=None, cap_ratio: float | None = RATIO) -> dict[str, np.ndarray]:
    """W = sum_j (sum_{k in C_j} w_k b_kj a_kj^T) / (sum_{k in C_j} w_k), + b_prev_j a_prev_j^T where C_j is empty.

    One component at a time, one client at a time (explicit loops), w_k = capped n_k."""
    sizes = reference.capped_sizes([u.num_examples for u in updates], cap_ratio)
    mods_list = [reference.np_modules(u.state_dict) for u in updates]
    prev = reference.np_modules(previous) if previous is not None else None
    out = {}
    for name, (d_out, d_in) in SHAPES.items():
        dense = np.zeros((d_out, d_in))
        for j in range(r_max):
            num = np.zeros((d_out, d_in))
            den = 0.0
            for w_k, u, mods in zip(sizes, updates, mods_list):
                a, b = mods[name]
                for slot, comp in enumerate(reference.indices_of(u)[: a.shape[0]]):
                    if comp == j:
                        num += w_k * np.outer(b[:, slot], a[slot])
                        den += w_k
            if den > 0:
                dense += num / den
            elif prev is not None:
                dense += np.outer(prev[name][1][:, j], prev[name][0][j])
        out[name] = dense
    return out


def _assert_matches(state: dict[str, torch.Tensor], want_dense: dict[str, np.ndarray], s: float = SCALE) -> None:
    got = reference.delta_w(reference.np_modules(state), s)
    for name, dense in want_dense.items():
        want = s * reference.best_rank_k(dense, R_MAX)
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5 * max(1e-30, float(np.abs(want).max())),
                                   err_msg=name)


def _run(updates, previous=PREVIOUS, method="raflora"):
    return aggregate(updates, method=method, r_max=R_MAX, scaling=SCALE, previous=previous, max_weight_ratio=RATIO)


def test_raflora_is_registered_with_its_capabilities():
    method = get_aggregation("raflora")
    assert (method.weights, method.uses_previous, method.accepts_components) == ("data", True, True)


def test_heterogeneous_prefix_clients_equal_the_reference():
    updates = [_upload(f"c{k}", r, 10 + k, n=50 + 17 * k) for k, r in enumerate([1, 2, 4, 1, 3, 4])]
    _assert_matches(_run(updates).state_dict, raflora_dense(updates, R_MAX, PREVIOUS))


def test_a_component_only_capable_clients_train_is_not_damped_by_the_weak_clients():
    """Hand formula: 3 rank-1 clients and 1 rank-2 client, one-hot factors. FlexLoRA gives component 1 a quarter of
    the strong client's value (its weight share); raFLoRA gives it the whole value (its only contributor)."""

    def one_hot(cid: str, rank: int, values: list[float]) -> ClientUpdate:
        a = torch.zeros(rank, 3)
        b = torch.zeros(3, rank)
        for i, v in enumerate(values):
            a[i, i], b[i, i] = 1.0, v
        return ClientUpdate(cid, {"m.lora_A.weight": a, "m.lora_B.weight": b}, rank=rank, num_examples=10)

    updates = [one_hot("w0", 1, [1.0]), one_hot("w1", 1, [2.0]), one_hot("w2", 1, [3.0]), one_hot("s", 2, [6.0, 8.0])]
    for method, expected in [("raflora", [(1 + 2 + 3 + 6) / 4, 8.0]), ("flexlora", [(1 + 2 + 3 + 6) / 4, 8.0 / 4])]:
        sd = aggregate(updates, method=method, r_max=2, scaling=1.0).state_dict
        w = (sd["m.lora_B.weight"] @ sd["m.lora_A.weight"]).double().numpy()
        np.testing.assert_allclose(np.diag(w)[:2], expected, rtol=1e-6)
        assert abs(w[2, 2]) < 1e-6


@pytest.mark.parametrize("with_previous", [True, False])
def test_windows_and_a_component_nobody_trained(with_previous):
    """Windows (component-indexed uploads) that never cover component 2: it keeps the previous global's value (zero
    without one), and every covered component is averaged over its own contributors."""
    updates = [_upload("a", 2, 1, components=(3, 0)), _upload("b", 1, 2, components=(1,), n=70),
               _upload("c", 2, 3, components=(0, 1), n=130), _upload("d", 1, 4, components=(3,), n=90)]
    prev = PREVIOUS if with_previous else None
    res = _run(updates, previous=prev)
    _assert_matches(res.state_dict, raflora_dense(updates, R_MAX, prev))


def test_lying_example_counts_are_capped_like_every_data_weighted_method():
    honest = [_upload(f"h{k}", 1 + k % R_MAX, k, n=100) for k in range(5)]
    liar = _upload("x", R_MAX, 99, n=10**9)
    res = _run([*honest, liar])
    _assert_matches(res.state_dict, raflora_dense([*honest, liar], R_MAX, PREVIOUS, cap_ratio=RATIO))
    # the liar weighs 10 medians (1000), not 1e9
    assert res.weights["x"] == pytest.approx(1000 / 1500, rel=1e-12)


def test_a_different_cap_gives_a_different_global_than_no_cap():
    """The cap is applied (not only reported): without it the liar dominates every component it trained."""
    updates = [_upload(f"h{k}", 2, k, n=100) for k in range(3)] + [_upload("x", 2, 7, n=10**6)]
    capped = _run(updates).state_dict
    uncapped = aggregate(updates, method="raflora", r_max=R_MAX, scaling=SCALE, previous=PREVIOUS,
                         max_weight_ratio=None).state_dict
    _assert_matches(capped, raflora_dense(updates, R_MAX, PREVIOUS, cap_ratio=RATIO))
    _assert_matches(uncapped, raflora_dense(updates, R_MAX, PREVIOUS, cap_ratio=None))


@pytest.mark.parametrize("scale_a,scale_b", [(1e-30, 1e30), (1e30, 1e-30), (1e15, 1e15), (1e-20, 1e-20)])
def test_hostile_magnitudes_close_the_round_finite_and_equal_the_reference(scale_a, scale_b):
    """Through the round engine with the default adaptive bound: the attacker is clipped towards what it was sent,
    the global is finite and equals the reference on the clipped uploads."""
    honest = [_upload(f"h{k}", 1 + k % R_MAX, k) for k in range(4)]
    updates = [*honest, _upload("x", R_MAX, 99, scale_a=scale_a, scale_b=scale_b)]
    ids = [u.client_id for u in updates]
    ranks = {cid: R_MAX for cid in ids}
    outcome = close_round(RoundPlan(0, sorted(ids), ranks), list(updates), PREVIOUS,
                          RoundSettings(method="raflora", r_max=R_MAX, r_min=1, scaling=SCALE, clip_norm="adaptive"),
                          client_ranks=ranks, initial_ranks=ranks, clock=lambda: 0.0)
    assert outcome.result is not None, outcome.summary.get("note")
    assert all(bool(torch.isfinite(v).all()) for v in outcome.state_dict.values())
    accepted = [u for u in updates if u.client_id in outcome.summary["accepted"]]
    radii = reference.adaptive_radii(accepted, PREVIOUS)
    clipped = reference.clip_radii(accepted, *radii, previous=PREVIOUS)
    _assert_matches(outcome.state_dict, raflora_dense(clipped, R_MAX, PREVIOUS))


@st.composite
def federations(draw):
    n = draw(st.integers(1, 6))
    updates = []
    for k in range(n):
        rank = draw(st.integers(1, R_MAX))
        components = None
        if draw(st.booleans()):
            components = tuple(draw(st.permutations(range(R_MAX)))[:rank])
        updates.append(_upload(f"c{k}", rank, draw(st.integers(0, 2**16)), n=draw(st.integers(1, 10**6)),
                               components=components))
    return updates, draw(st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(federations())
def test_random_federations_equal_the_reference(case):
    updates, with_previous = case
    prev = PREVIOUS if with_previous else None
    res = _run(updates, previous=prev)
    _assert_matches(res.state_dict, raflora_dense(updates, R_MAX, prev))


@pytest.mark.parametrize("svd", ["randomized", "sketch"])
def test_other_svd_paths_are_close_to_the_exact_top_r_max(svd):
    """The same FlexLoRA SVD machinery: an update of rank <= r_max is recovered by every path (exact when the
    stacked product has rank <= r_max)."""
    from peft_hetlora.federated.aggregation.methods import register_aggregation, unregister_aggregation
    from peft_hetlora.federated.aggregation.methods.raflora import RaFLoRA

    name = f"raflora_{svd}_test"
    register_aggregation(name, RaFLoRA(svd=svd), overwrite=True)
    try:
        updates = [_upload("a", 2, 1, components=(0, 1)), _upload("b", 2, 2, components=(2, 3))]
        res = _run(updates, method=name)
        got = reference.delta_w(reference.np_modules(res.state_dict), SCALE)
        for mod, dense in raflora_dense(updates, R_MAX, PREVIOUS).items():
            assert np.linalg.norm(got[mod] - SCALE * dense) <= 1e-4 * max(1.0, math.sqrt(float(np.sum(dense**2))))
    finally:
        unregister_aggregation(name)
