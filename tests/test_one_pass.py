"""Issue 25: one read of each upload per round, and the sketch's batched products.

* The one-pass aggregation (``StreamingAggregator(one_pass=True)``) observes and adds each update in one read;
  when :meth:`settle` finds nobody capped or clipped its result is the two-pass one bit for bit (compared against
  an aggregator driven by hand through ``observe`` then ``add``); when someone is capped or clipped the round is
  aggregated again in two passes, with the same result and the same rejections as before.
* The sketch's images ``Y = W Omega`` and ``X = Psi W`` (clients added in batches, test matrices stored as float32
  numbers and converted in chunks) against an independent float64 numpy computation, at honest and hostile
  magnitudes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_hetlora.federated.aggregation import ClientUpdate, StreamingAggregator, aggregate
from peft_hetlora.federated.aggregation.methods.sketch import TwoSidedSketch
from peft_hetlora.federated.round import Rejection, RoundPlan, RoundSettings, close_round

R_MAX = 4
SCALE = 2.0
MODULES = {"a.q": (24, 20), "a.v": (12, 20)}


def _previous(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (d_out, d_in) in MODULES.items():
        out[f"{name}.lora_A.weight"] = torch.randn(R_MAX, d_in, generator=gen) / 4
        out[f"{name}.lora_B.weight"] = torch.randn(d_out, R_MAX, generator=gen) / 10
    return out


PREVIOUS = _previous()


def _upload(cid: str, rank: int, seed: int, *, n: int = 100, step: float = 0.1, bad: str | None = None
            ) -> ClientUpdate:
    """The previous global truncated to ``rank`` plus a random step of size ~``step`` (what training does)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name in MODULES:
        a, b = PREVIOUS[f"{name}.lora_A.weight"][:rank], PREVIOUS[f"{name}.lora_B.weight"][:, :rank]
        sd[f"{name}.lora_A.weight"] = (a + step * torch.randn(a.shape, generator=gen)).contiguous()
        sd[f"{name}.lora_B.weight"] = (b + step * torch.randn(b.shape, generator=gen)).contiguous()
    key = next(iter(sd))
    if bad == "nan":
        sd[key][0, 0] = float("nan")
    elif bad == "huge":  # ||B A|| beyond what a float32 global can hold
        sd = {k: v * 3e19 for k, v in sd.items()}
    elif bad == "shape":
        sd[key] = torch.zeros(rank, 7)
    meta = {"rank_in": rank, "rank_out": rank, "num_examples": n, "train_loss": 1.0}
    return ClientUpdate(cid, sd, rank=rank, num_examples=n, metadata=meta)


def _two_pass(updates, method, clip, **kwargs):
    """The two-pass aggregation driven by hand: observe every update, then add every one (refusals skipped)."""
    agg = StreamingAggregator(method, R_MAX, SCALE, previous=PREVIOUS, clip_norm=clip, **kwargs)
    for u in updates:
        try:
            agg.observe(u)
        except ValueError:
            pass
    refused = {}
    for u in updates:
        try:
            agg.add(u)
        except ValueError as err:
            refused[u.client_id] = str(err)
    return agg.result(), refused


def _one_pass(updates, method, clip, **kwargs):
    agg = StreamingAggregator(method, R_MAX, SCALE, previous=PREVIOUS, clip_norm=clip, one_pass=True, **kwargs)
    refused = {}
    for u in updates:
        try:
            agg.add(u)
        except ValueError as err:
            refused[u.client_id] = str(err)
    return agg, refused


def _assert_same(res, ref):
    assert list(res.state_dict) == list(ref.state_dict)
    for key, value in ref.state_dict.items():
        assert torch.equal(res.state_dict[key], value), key
    assert res.weights == ref.weights and res.norms == ref.norms and res.clip_scales == ref.clip_scales
    assert res.influence == ref.influence and res.weight_cap == ref.weight_cap and res.messages == ref.messages


METHODS = ["flexlora_held", "flexlora", "hetlora", "zero_pad", "rankwise", "component"]


# ---------------------------------------------------------------------------------------------- one pass = two
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), method=st.sampled_from(METHODS),
       clip=st.sampled_from(["adaptive", "off", 5.0]),
       ranks=st.lists(st.integers(1, R_MAX), min_size=1, max_size=9),
       sizes=st.lists(st.integers(0, 400), min_size=9, max_size=9),
       bad=st.lists(st.sampled_from([None, None, None, "nan", "huge", "shape"]), min_size=9, max_size=9))
def test_one_pass_that_settles_is_the_two_pass_round_bit_for_bit(seed, method, clip, ranks, sizes, bad):
    """Honest-sized steps (nobody beyond 4 median steps) and sizes within 10 x the median of one another, hostile
    uploads among them: when settle() says yes, every bit of the global, the weights, norms and records, and every
    rejection reason equal the two-pass round's; when it says no, result() refuses."""
    updates = [_upload(f"c{k}", r, seed + k, n=sizes[k], step=0.1, bad=bad[k]) for k, r in enumerate(ranks)]
    if all(b is not None for b in bad[: len(ranks)]):
        updates.append(_upload("honest", R_MAX, seed))
    agg, refused = _one_pass(updates, method, clip)
    ref, ref_refused = _two_pass(updates, method, clip)
    assert refused == ref_refused
    if agg.settle():
        _assert_same(agg.result(), ref)
    else:
        with pytest.raises(ValueError, match="two passes"):
            agg.result()
        if not ref_refused:  # aggregate() raises on a refusal; without one it falls back to the two passes
            _assert_same(aggregate(updates, method=method, r_max=R_MAX, scaling=SCALE, previous=PREVIOUS,
                                   clip_norm=clip), ref)


@pytest.mark.parametrize("method", ["flexlora_held", "hetlora"])
@pytest.mark.parametrize("attack", ["step", "size"])
def test_a_clipped_or_capped_client_makes_the_round_two_passes_with_the_same_result(method, attack):
    """A client 1000 x the median step (clipped by the adaptive bound) or claiming 1e9 examples (capped at 10 x the
    median): settle() says no, aggregate() and close_round fall back to two passes, and the result is the
    two-pass one; the callable is read three times (one wasted pass), the honest round once."""
    honest = [_upload(f"h{k}", k % R_MAX + 1, k, n=100 + k) for k in range(6)]
    liar = (_upload("x", R_MAX, 99, step=100.0) if attack == "step" else _upload("x", R_MAX, 99, n=10**9))
    updates = [*honest, liar]
    agg, _ = _one_pass(updates, method, "adaptive")
    capped = attack == "size" and method == "flexlora_held"  # hetlora: sparsity weights, the cap does not bind
    assert agg.settle() is not (attack == "step" or capped)
    ref, _ = _two_pass(updates, method, "adaptive")
    _assert_same(aggregate(updates, method=method, r_max=R_MAX, scaling=SCALE, previous=PREVIOUS,
                           clip_norm="adaptive"), ref)
    if attack == "step":
        assert ref.clip_scales["x"] < 1.0
    elif capped:
        assert ref.capped == {"x": ref.weight_cap["limit"]}

    calls = []

    def source():
        calls.append(1)
        return iter([*updates, Rejection("gone", "upload could not be downloaded")])

    ids = [u.client_id for u in updates] + ["gone"]
    ranks = {cid: R_MAX for cid in ids}
    settings_ = RoundSettings(method=method, r_max=R_MAX, r_min=1, scaling=SCALE, clip_norm="adaptive")
    outcome = close_round(RoundPlan(0, sorted(ids), ranks), source, PREVIOUS, settings_, client_ranks=ranks,
                          initial_ranks=ranks, clock=lambda: 0.0)
    assert len(calls) == (1 if agg.settle() else 3)
    assert outcome.summary["rejected"] == {"gone": "upload could not be downloaded"}
    assert outcome.summary["accepted"] == sorted(u.client_id for u in updates)
    for key, value in ref.state_dict.items():
        assert torch.equal(outcome.state_dict[key], value)
    calls.clear()
    honest_round = close_round(RoundPlan(0, sorted(ids), ranks), lambda: (calls.append(1), iter(honest))[1],
                               PREVIOUS, settings_, client_ranks=ranks, initial_ranks=ranks, clock=lambda: 0.0)
    assert len(calls) == 1 and honest_round.summary["accepted"] == sorted(u.client_id for u in honest)


def test_one_pass_rejects_hostile_uploads_with_the_two_pass_reasons_and_keeps_the_rest():
    honest = [_upload(f"h{k}", k % R_MAX + 1, k) for k in range(5)]
    hostile = [_upload("nan", 2, 50, bad="nan"), _upload("huge", 2, 51, bad="huge"),
               _upload("shape", 2, 52, bad="shape"), _upload("h0", 1, 53)]  # the last: a duplicate id
    updates = [*honest[:2], *hostile, *honest[2:]]
    agg, refused = _one_pass(updates, "flexlora_held", "adaptive")
    ref, ref_refused = _two_pass(updates, "flexlora_held", "adaptive")
    assert set(refused) == {"nan", "huge", "shape", "h0"} and refused == ref_refused
    assert "non-finite" in refused["nan"] and "float32" in refused["huge"]
    assert agg.settle() and agg.num_clients == 5
    _assert_same(agg.result(), ref)


def test_one_pass_api_misuse_is_refused():
    agg = StreamingAggregator("flexlora_held", R_MAX, SCALE, previous=PREVIOUS, one_pass=True)
    with pytest.raises(ValueError, match="one-pass"):
        agg.observe(_upload("a", 2, 0))
    agg.add(_upload("a", 2, 0))
    assert agg.settle() and agg.settle()  # idempotent
    with pytest.raises(ValueError, match="after settle"):
        agg.add(_upload("b", 2, 1))
    with pytest.raises(ValueError, match="one-pass"):
        StreamingAggregator("hetlora", R_MAX).settle()


# ---------------------------------------------------------------------------------------------- the sketch's images
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), log_a=st.integers(-42, 30), log_b=st.integers(-30, 30),
       ranks=st.lists(st.integers(1, 6), min_size=1, max_size=5))
def test_sketch_images_match_a_float64_numpy_reference(seed, log_a, log_b, ranks):
    """``Y = sum_k w_k B_k A_k Omega`` and ``X = sum_k w_k Psi B_k A_k`` against numpy in float64 (the test matrices'
    float32 numbers taken exactly), factors at magnitudes 1e-42 (float32 subnormals) .. 1e30, clients added one by
    one and as one batch: within float64's deterministic bound ``gamma_n ||test||_F sum_k w_k ||B_k||_F ||A_k||_F``
    (``gamma_n = n u / (1 - n u)``, ``u = 2^-53``, ``n`` the inner dimension plus the rank)."""
    rng = np.random.default_rng(seed)
    d_out, d_in, rank = 50, 40, 3
    sk = TwoSidedSketch(d_out, d_in, rank, seed=seed)
    batched = TwoSidedSketch(d_out, d_in, rank, seed=seed)
    omega, psi = sk.omega.numpy().astype(np.float64), sk.psi.numpy().astype(np.float64)
    w_ref = np.zeros((d_out, d_in))
    scale = 0.0
    blocks = []
    for r in ranks:
        b = (rng.standard_normal((d_out, r)) * 10.0**log_b).astype(np.float32)
        a = (rng.standard_normal((r, d_in)) * 10.0**log_a).astype(np.float32)
        weight = float(rng.uniform(0.1, 3.0))
        sk.add(torch.from_numpy(b), torch.from_numpy(a), weight)
        blocks.append((b, a, weight))
        b64, a64 = b.astype(np.float64), a.astype(np.float64)
        w_ref += weight * (b64 @ a64)
        scale += weight * np.linalg.norm(b64) * np.linalg.norm(a64)
    batched.add_terms(torch.from_numpy(np.concatenate([b for b, _, _ in blocks], axis=1)),
                      torch.tensor([w for b, _, w in blocks for _ in range(b.shape[1])], dtype=torch.float64),
                      torch.from_numpy(np.concatenate([a for _, a, _ in blocks], axis=0)), 0.0)
    y_ref, x_ref = w_ref @ omega, psi @ w_ref
    u = 2.0**-53
    for state in (sk, batched):
        for got, ref, n, test in ((state.y, y_ref, d_in, omega), (state.x, x_ref, d_out, psi)):
            got = got.numpy()
            assert np.all(np.isfinite(got))
            n = n + sum(ranks) + len(ranks)
            gamma = n * u / (1 - n * u)
            assert np.linalg.norm(got - ref) <= gamma * np.linalg.norm(test) * scale * 4 + 1e-300


def test_unbalanced_factors_keep_the_sketch_exact_when_rank_is_at_most_l():
    """W of rank 3 <= l = 5, factors at 1e30 and 1e-30 (their float32 products would overflow and underflow; the
    sketch's are float64): the published top-2 factors reproduce numpy's float64 best rank-2."""
    rng = np.random.default_rng(5)
    d_out, d_in, rank = 60, 45, 2
    sk = TwoSidedSketch(d_out, d_in, rank, seed=1)
    w_ref = np.zeros((d_out, d_in))
    base_b, base_a = rng.standard_normal((d_out, 3)), rng.standard_normal((3, d_in))
    for k, (sb, sa) in enumerate([(1e30, 1e-30), (1e-30, 1e30), (1.0, 1.0), (3e15, 1e-16)]):
        mix = rng.standard_normal((3, 3))
        b = (base_b @ mix * sb).astype(np.float32)
        a = (base_a * sa).astype(np.float32)
        sk.add(torch.from_numpy(b), torch.from_numpy(a), 1.0 + k)
        w_ref += (1.0 + k) * (b.astype(np.float64) @ a.astype(np.float64))
    new_b, new_a = sk.factors(rank)
    u_, s_, vh_ = np.linalg.svd(w_ref)
    best = (u_[:, :rank] * s_[:rank]) @ vh_[:rank]
    got = new_b.numpy() @ new_a.numpy()
    assert np.linalg.norm(got - best) <= 1e-9 * np.linalg.norm(best)
