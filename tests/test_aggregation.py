"""Aggregation tests against an independent numpy reference written from docs/design.md#the-algorithm.

The reference below forms dense ``B @ A`` products and uses plain loops; the code under test never does.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import reference
import torch

from peft_hetlora.federated.adapter import lora_module_names, pad, truncate, update_norm
from peft_hetlora.federated.aggregation import (
    AGGREGATION_METHODS,
    AggregationResult,
    ClientUpdate,
    StreamingAggregator,
    aggregate,
)

R_MAX = 8
# module name -> (d_out, d_in)
SHAPES = {
    "base_model.model.model.layers.0.self_attn.q_proj": (6, 5),
    "base_model.model.model.layers.0.self_attn.v_proj": (3, 5),
    "base_model.model.model.layers.1.mlp.down_proj": (5, 7),
}
EXTRA = "base_model.model.score.modules_to_save.weight"
SCALE = 2.0  # lora_alpha / r_max


def a_key(name: str) -> str:
    return f"{name}.lora_A.weight"


def b_key(name: str) -> str:
    return f"{name}.lora_B.weight"


def make_state_dict(rng: np.random.Generator, rank, extras: bool = True, b_scale: float = 1.0) -> dict:
    """Random adapter; ``rank`` is an int or a per-module dict."""
    sd = {}
    for name, (d_out, d_in) in SHAPES.items():
        r = rank[name] if isinstance(rank, dict) else rank
        sd[a_key(name)] = torch.from_numpy(rng.standard_normal((r, d_in))).float()
        sd[b_key(name)] = torch.from_numpy(rng.standard_normal((d_out, r)) * b_scale).float()
    if extras:
        sd[EXTRA] = torch.from_numpy(rng.standard_normal((2, 4))).float()
    return sd


def make_updates(seed: int, ranks, num_examples=None, **kwargs) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    num_examples = num_examples or [10 * (i + 1) for i in range(len(ranks))]
    out = []
    for i, (r, n) in enumerate(zip(ranks, num_examples)):
        declared = max(r.values()) if isinstance(r, dict) else r
        out.append(ClientUpdate(f"client-{i}", make_state_dict(rng, r, **kwargs), declared, n))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Independent numpy reference (docs/design.md#aggregation, #methods)
# ---------------------------------------------------------------------------------------------------------------


def np_modules(sd) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return reference.np_modules(sd)


def ref_module_norms(sd, s: float) -> dict[str, float]:
    return reference.module_norms(np_modules(sd), s)


def ref_norm(sd, s: float) -> float:
    return reference.norm(np_modules(sd), s)


ref_pad = reference.pad


def ref_weighted(updates, weights: list[float], r_max: int):
    """sum_k w_k pad(A_k), sum_k w_k pad(B_k) with w normalised."""
    out, extras, w = reference.weighted(updates, weights, r_max)
    return out, extras[EXTRA], w


def ref_hetlora(updates, r_max, s, clip=None, per_module=False, previous=None):
    out, extras, p = reference.hetlora(updates, r_max, s, clip, per_module, previous)
    return out, extras[EXTRA], p


ref_rankwise = reference.rankwise


def ref_flexlora_dense(updates) -> dict[str, np.ndarray]:
    return reference.flexlora_dense(updates)


def assert_factors_close(result: AggregationResult, ref: dict, atol: float = 1e-5) -> None:
    for name, (ra, rb) in ref.items():
        ga, gb = result.state_dict[a_key(name)], result.state_dict[b_key(name)]
        assert ga.dtype == torch.float32 and gb.dtype == torch.float32
        assert tuple(ga.shape) == ra.shape and tuple(gb.shape) == rb.shape
        np.testing.assert_allclose(ga.numpy(), ra, atol=atol, rtol=1e-5)
        np.testing.assert_allclose(gb.numpy(), rb, atol=atol, rtol=1e-5)


MIXED = [1, 3, R_MAX, 5]  # includes r_k = 1 and r_k = r_max


# ---------------------------------------------------------------------------------------------------------------
# Helpers: names, truncate, pad, norms
# ---------------------------------------------------------------------------------------------------------------


def test_lora_module_names_order_and_extras():
    sd = make_state_dict(np.random.default_rng(0), 2)
    assert lora_module_names(sd) == list(SHAPES)
    emb = {"m.embed.lora_embedding_A": torch.zeros(2, 10), "m.embed.lora_embedding_B": torch.zeros(4, 2)}
    assert lora_module_names(emb) == ["m.embed"]
    with pytest.raises(ValueError, match="lora_B"):
        lora_module_names({"x.lora_A.weight": torch.zeros(2, 3)})


def test_truncate_and_pad_identity_on_first_components():
    rng = np.random.default_rng(1)
    sd = make_state_dict(rng, 5)
    for k in (1, 3, 5):
        small = truncate(sd, k)
        padded = pad(small, R_MAX)
        for name in SHAPES:
            a, b = sd[a_key(name)], sd[b_key(name)]
            pa, pb = padded[a_key(name)], padded[b_key(name)]
            assert small[a_key(name)].shape[0] == k and small[b_key(name)].shape[1] == k
            assert small[b_key(name)].is_contiguous()
            torch.testing.assert_close(pa[:k], a[:k], rtol=0, atol=0)
            torch.testing.assert_close(pb[:, :k], b[:, :k], rtol=0, atol=0)
            assert pa[k:].abs().sum() == 0 and pb[:, k:].abs().sum() == 0
            # zero padding keeps B A; truncation of a padded adapter gives the original back
            torch.testing.assert_close(pb @ pa, small[b_key(name)] @ small[a_key(name)])
        assert padded[EXTRA] is sd[EXTRA]
    back = truncate(pad(sd, R_MAX), 5)
    for key in sd:
        torch.testing.assert_close(back[key], sd[key], rtol=0, atol=0)
    per_module = truncate(sd, {next(iter(SHAPES)): 2})
    assert per_module[a_key(next(iter(SHAPES)))].shape[0] == 2 and per_module[a_key(list(SHAPES)[1])].shape[0] == 5
    bf16 = pad({k: v.bfloat16() for k, v in sd.items()}, R_MAX)
    assert bf16[a_key(next(iter(SHAPES)))].dtype == torch.bfloat16


def test_truncate_pad_errors():
    sd = make_state_dict(np.random.default_rng(2), 4)
    with pytest.raises(ValueError, match="pad"):
        truncate(sd, 5)
    with pytest.raises(ValueError, match="truncate"):
        pad(sd, 3)
    with pytest.raises(ValueError, match="not in the state dict"):
        truncate(sd, {"nope": 1})
    with pytest.raises(ValueError, match=">= 1"):
        truncate(sd, 0)


def test_update_norm_matches_dense():
    rng = np.random.default_rng(3)
    for rank in (1, 4, R_MAX):
        sd = make_state_dict(rng, rank)
        assert update_norm(sd, scaling=SCALE) == pytest.approx(ref_norm(sd, SCALE), rel=1e-5)
    zero = make_state_dict(rng, 3, b_scale=0.0)
    assert update_norm(zero) == 0.0
    conv = {"c.lora_A.weight": torch.randn(3, 2, 3, 3), "c.lora_B.weight": torch.randn(4, 3, 1, 1)}
    dense = conv["c.lora_B.weight"].flatten(1).double() @ conv["c.lora_A.weight"].flatten(1).double()
    assert update_norm(conv) == pytest.approx(float(dense.norm()), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Methods against the reference
# ---------------------------------------------------------------------------------------------------------------


def test_hetlora_matches_reference():
    updates = make_updates(10, MIXED)
    res = aggregate(updates, method="hetlora", r_max=R_MAX, scaling=SCALE)
    ref, extra, p = ref_hetlora(updates, R_MAX, SCALE)
    assert_factors_close(res, ref)
    np.testing.assert_allclose(res.state_dict[EXTRA].numpy(), extra, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([res.weights[u.client_id] for u in updates], p, rtol=1e-6)
    for u in updates:
        assert res.norms[u.client_id] == pytest.approx(ref_norm(u.state_dict, SCALE), rel=1e-5)
    assert res.fallback is None and res.method == "hetlora"
    assert list(res.state_dict) == list(updates[0].state_dict)
    assert json.loads(json.dumps(res.summary()))["weights"] == pytest.approx(res.weights)


def test_zero_pad_and_fedavg_use_data_weights():
    updates = make_updates(11, MIXED, num_examples=[5, 0, 20, 15])
    res = aggregate(updates, method="zero_pad", r_max=R_MAX, scaling=SCALE)
    ref, extra, w = ref_weighted(updates, [5, 0, 20, 15], R_MAX)
    assert_factors_close(res, ref)
    np.testing.assert_allclose(res.state_dict[EXTRA].numpy(), extra, rtol=1e-5, atol=1e-6)
    assert res.weights == pytest.approx({u.client_id: wk for u, wk in zip(updates, w)})

    homo = make_updates(12, [4, 4, 4], num_examples=[1, 2, 3])
    res = aggregate(homo, method="fedavg", r_max=R_MAX)
    ref, extra, _ = ref_weighted(homo, [1, 2, 3], R_MAX)
    assert_factors_close(res, ref)
    with pytest.raises(ValueError, match="same rank.*hetlora"):
        aggregate(make_updates(13, [4, 2]), method="fedavg", r_max=R_MAX)


def test_per_module_weighting_matches_reference():
    ranks = [{n: r for n, r in zip(SHAPES, rs)} for rs in ([1, 8, 2], [8, 3, 8], [5, 5, 1])]
    updates = make_updates(14, ranks)
    res = aggregate(updates, method="hetlora", r_max=R_MAX, scaling=SCALE, weighting="per_module")
    ref, extra, _ = ref_hetlora(updates, R_MAX, SCALE, per_module=True)
    assert_factors_close(res, ref)
    np.testing.assert_allclose(res.state_dict[EXTRA].numpy(), extra, rtol=1e-5, atol=1e-6)
    assert res.module_weights is not None
    for name in SHAPES:
        norms = [ref_module_norms(u.state_dict, SCALE)[name] for u in updates]
        expect = np.array(norms) / sum(norms)
        np.testing.assert_allclose([res.module_weights[name][u.client_id] for u in updates], expect, rtol=1e-5)

    res = aggregate(updates, method="rankwise", r_max=R_MAX, scaling=SCALE, weighting="per_module")
    assert_factors_close(res, ref_rankwise(updates, R_MAX, SCALE, per_module=True))
    with pytest.raises(ValueError, match="per_module"):
        aggregate(updates, method="zero_pad", r_max=R_MAX, weighting="per_module")


def test_clipping_bounds_a_huge_client():
    updates = make_updates(15, [2, 4, 6])
    huge = make_updates(16, [R_MAX], b_scale=1e4)[0]
    updates.append(ClientUpdate("huge", huge.state_dict, R_MAX, 10))
    clip = 5.0
    res = aggregate(updates, method="hetlora", r_max=R_MAX, scaling=SCALE, clip_norm=clip)
    ref, _, p = ref_hetlora(updates, R_MAX, SCALE, clip=clip)
    assert_factors_close(res, ref)
    np.testing.assert_allclose([res.weights[u.client_id] for u in updates], p, rtol=1e-6)
    assert res.clip_scales["huge"] < 1e-3 and any("clipped" in m for m in res.messages)
    unclipped = aggregate(updates, method="hetlora", r_max=R_MAX, scaling=SCALE)
    assert unclipped.weights["huge"] > 0.999  # what clipping prevents
    # without `previous` each factor is clipped into the sqrt(C / s) ball around 0, so ||s B A|| <= C
    clipped_mods = reference.clip(updates, SCALE, clip)[-1][0]
    assert reference.norm(clipped_mods, SCALE) <= clip * (1 + 1e-9)
    assert res.weights["huge"] == pytest.approx(reference.norm(clipped_mods, SCALE) / sum(
        reference.norm(mods, SCALE) for mods, _, _ in reference.clip(updates, SCALE, clip)), rel=1e-5)


def test_rankwise_matches_reference_and_keeps_previous():
    updates = make_updates(17, [1, 3, 5])  # components 5..7 are covered by nobody
    res = aggregate(updates, method="rankwise", r_max=R_MAX, scaling=SCALE)
    assert_factors_close(res, ref_rankwise(updates, R_MAX, SCALE))
    for name in SHAPES:
        assert res.state_dict[a_key(name)][5:].abs().sum() == 0
    previous = make_state_dict(np.random.default_rng(18), R_MAX)
    res = aggregate(updates, method="rankwise", r_max=R_MAX, scaling=SCALE, previous=previous)
    assert_factors_close(res, ref_rankwise(updates, R_MAX, SCALE, previous=previous))
    for name in SHAPES:
        torch.testing.assert_close(res.state_dict[a_key(name)][5:], previous[a_key(name)][5:])
        torch.testing.assert_close(res.state_dict[b_key(name)][:, 5:], previous[b_key(name)][:, 5:])
    # component 0 is covered by everybody: it is the hetlora average there
    het = aggregate(updates, method="hetlora", r_max=R_MAX, scaling=SCALE)
    assert res.weights == pytest.approx(het.weights)
    # with r_k = r_max among the clients every component is covered
    full = make_updates(19, [R_MAX, 2])
    assert_factors_close(
        aggregate(full, method="rankwise", r_max=R_MAX, scaling=SCALE, previous=previous),
        ref_rankwise(full, R_MAX, SCALE),
    )


def _best_rank_k_error(dense: np.ndarray, k: int) -> float:
    sv = np.linalg.svd(dense, compute_uv=False)
    return float(np.sqrt(np.sum(sv[k:] ** 2)))


@pytest.mark.parametrize(
    ("ranks", "shared"),
    [([1, 2, 3], False), ([1, 3, R_MAX, 5], False), ([1, 3, R_MAX, 5], True), ([R_MAX] * 7, False)],
)
def test_flexlora_factored_equals_dense_svd(ranks, shared):
    """Sum of ranks <= r_max (exact), > r_max (top-r_max truncation), > 2 min(d) (exact recompression), and
    nearly dependent stacks (``shared``: every client = truncated common adapter + small noise, as after a round)."""
    updates = make_updates(20 + len(ranks), ranks)
    if shared:
        common = make_state_dict(np.random.default_rng(99), R_MAX)
        updates = [
            ClientUpdate(
                u.client_id,
                {k: truncate(common, u.rank)[k] + 1e-3 * v if "lora" in k else v for k, v in u.state_dict.items()},
                u.rank,
                u.num_examples,
            )
            for u in updates
        ]
    res = aggregate(updates, method="flexlora", r_max=R_MAX, scaling=SCALE)
    dense = ref_flexlora_dense(updates)
    n = np.array([u.num_examples for u in updates], dtype=np.float64)
    assert [res.weights[u.client_id] for u in updates] == pytest.approx(list(n / n.sum()))
    for name, w in dense.items():
        ga = res.state_dict[a_key(name)].double().numpy()
        gb = res.state_dict[b_key(name)].double().numpy()
        assert ga.shape == (R_MAX, SHAPES[name][1]) and gb.shape == (SHAPES[name][0], R_MAX)
        u, sv, vt = np.linalg.svd(w, full_matrices=False)
        k = min(R_MAX, len(sv))
        best = (u[:, :k] * sv[:k]) @ vt[:k]
        assert np.linalg.norm(gb @ ga - best) <= 1e-5 * np.linalg.norm(best)
        # B = U S (orthogonal columns, norms = singular values in order), A = V^T (orthonormal rows)
        col_norms = np.linalg.norm(gb, axis=0)
        np.testing.assert_allclose(col_norms[:k], sv[:k], rtol=1e-5, atol=1e-6 * sv[0])
        gram_a = ga[:k] @ ga[:k].T
        np.testing.assert_allclose(gram_a, np.eye(k), atol=1e-5)
        # truncating to any client rank gives that client its best rank-r_k approximation
        for r in sorted(set(ranks)):
            err = np.linalg.norm(w - gb[:, :r] @ ga[:r])
            assert err == pytest.approx(_best_rank_k_error(w, r), rel=1e-4, abs=1e-5 * sv[0])


def test_flexlora_dense_extras_use_data_weights_and_clipping():
    updates = make_updates(30, [2, 4], num_examples=[1, 3])
    res = aggregate(updates, method="flexlora", r_max=R_MAX, clip_norm=1e-2)
    _, extra, _ = ref_weighted(updates, [1, 3], R_MAX)
    np.testing.assert_allclose(res.state_dict[EXTRA].numpy(), extra, rtol=1e-5, atol=1e-6)
    for name in SHAPES:
        got = res.state_dict[b_key(name)].double() @ res.state_dict[a_key(name)].double()
        want = sum(
            wk * (mods[name][1] @ mods[name][0])
            for wk, (mods, _, _) in zip([0.25, 0.75], reference.clip(updates, 1.0, 1e-2))
        )
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# Streaming, fallbacks, dtypes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", AGGREGATION_METHODS)
def test_streaming_equals_batch_in_any_order(method):
    ranks = [4] * 4 if method == "fedavg" else MIXED
    updates = make_updates(40, ranks)
    batch = aggregate(updates, method=method, r_max=R_MAX, scaling=SCALE)
    agg = StreamingAggregator(method, R_MAX, SCALE)
    for i in (3, 1, 0, 2):  # the first pass (the weight cap's median), in another order than the second
        agg.observe(updates[i])
    for i in (2, 0, 3, 1):
        agg.add(updates[i])
    streamed = agg.result()
    again = agg.result()  # result() does not consume the sums
    for key, value in batch.state_dict.items():
        # flexlora: singular vectors are defined up to sign, so compare the products
        if method.startswith("flexlora") and key.endswith("lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            prod = batch.state_dict[b_key(name)] @ value
            torch.testing.assert_close(
                streamed.state_dict[b_key(name)] @ streamed.state_dict[key], prod, rtol=1e-5, atol=1e-5
            )
        elif not method.startswith("flexlora") or key == EXTRA:
            torch.testing.assert_close(streamed.state_dict[key], value, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(again.state_dict[key], streamed.state_dict[key], rtol=0, atol=0)
        assert value.device.type == "cpu" and value.dtype == torch.float32
    assert streamed.weights == pytest.approx(batch.weights)


@pytest.mark.parametrize("method", ["hetlora", "rankwise"])
def test_zero_norm_falls_back_to_data_size(method):
    """All B zero (round start): sparsity weights are 0/0; data-size weights are used and reported."""
    updates = make_updates(50, MIXED, num_examples=[10, 0, 30, 60], b_scale=0.0)
    res = aggregate(updates, method=method, r_max=R_MAX, scaling=SCALE)
    assert res.fallback == "data_size" and res.messages
    assert [res.weights[u.client_id] for u in updates] == pytest.approx([0.1, 0.0, 0.3, 0.6])
    for name in SHAPES:
        assert torch.isfinite(res.state_dict[a_key(name)]).all()
        assert res.state_dict[b_key(name)].abs().sum() == 0
    ref, extra, _ = ref_weighted(updates, [10, 0, 30, 60], R_MAX)
    if method == "rankwise":
        ref = ref_rankwise(updates, R_MAX, SCALE, data_weights=True)
    assert_factors_close(res, ref)
    np.testing.assert_allclose(res.state_dict[EXTRA].numpy(), extra, rtol=1e-5, atol=1e-6)
    none = make_updates(51, [2, 3], num_examples=[0, 0], b_scale=0.0)
    res = aggregate(none, method=method, r_max=R_MAX)
    assert res.fallback == "uniform" and res.weights == pytest.approx({"client-0": 0.5, "client-1": 0.5})


def test_rankwise_partial_fallback_only_where_needed():
    """Components covered only by a zero-norm client fall back to data weights; the others keep sparsity."""
    updates = make_updates(52, [2, 6])
    zero_tail = make_updates(53, [R_MAX], b_scale=0.0)[0]
    updates.append(ClientUpdate("zero", zero_tail.state_dict, R_MAX, 7))
    res = aggregate(updates, method="rankwise", r_max=R_MAX, scaling=SCALE)
    assert res.fallback == "data_size" and res.fallback_modules == list(SHAPES)
    for name in SHAPES:
        # components 6, 7 are covered by "zero" only: its data weight is the only one there
        torch.testing.assert_close(res.state_dict[a_key(name)][6:], zero_tail.state_dict[a_key(name)][6:])
    p = [res.weights[u.client_id] for u in updates]
    assert p[2] == 0.0 and sum(p) == pytest.approx(1.0)


def test_low_precision_inputs_give_float32_outputs():
    updates = make_updates(60, MIXED)
    bf16 = [
        ClientUpdate(u.client_id, {k: v.bfloat16() for k, v in u.state_dict.items()}, u.rank, u.num_examples)
        for u in updates
    ]
    res = aggregate(bf16, method="hetlora", r_max=R_MAX, scaling=SCALE)
    rounded = [
        ClientUpdate(u.client_id, {k: v.float() for k, v in u.state_dict.items()}, u.rank, u.num_examples)
        for u in bf16
    ]
    ref, _, _ = ref_hetlora(rounded, R_MAX, SCALE)
    assert_factors_close(res, ref, atol=1e-4)
    assert all(v.dtype == torch.float32 for v in res.state_dict.values())


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_errors_say_what_to_do():
    good = make_updates(70, [2, 3])
    with pytest.raises(ValueError, match="no client updates"):
        aggregate([], r_max=R_MAX)
    with pytest.raises(ValueError, match="r_max"):
        aggregate(good)
    with pytest.raises(ValueError, match="unknown aggregation method.*hetlora"):
        aggregate(good, method="fedprox", r_max=R_MAX)
    with pytest.raises(ValueError, match="r_max=2"):
        aggregate(good, r_max=2)
    with pytest.raises(ValueError, match="clip_norm"):
        aggregate(good, r_max=R_MAX, clip_norm=0.0)
    with pytest.raises(ValueError, match="weighting"):
        aggregate(good, r_max=R_MAX, weighting="per_layer")

    other_keys = make_updates(71, [2], extras=False)[0]
    with pytest.raises(ValueError, match="different key set"):
        aggregate([good[0], ClientUpdate("x", other_keys.state_dict, 2, 1)], r_max=R_MAX)
    wrong_dim = dict(good[1].state_dict)
    name = next(iter(SHAPES))
    wrong_dim[a_key(name)] = torch.zeros(3, SHAPES[name][1] + 1)
    with pytest.raises(ValueError, match="d_in"):
        aggregate([good[0], ClientUpdate("x", wrong_dim, 3, 1)], r_max=R_MAX)
    with pytest.raises(ValueError, match="declares rank"):
        aggregate([ClientUpdate("x", good[1].state_dict, 2, 1)], r_max=R_MAX)
    with pytest.raises(ValueError, match="declared rank 9 is outside \\[1, r_max=8\\]"):
        aggregate([ClientUpdate("x", good[0].state_dict, R_MAX + 1, 1)], r_max=R_MAX)
    with pytest.raises(ValueError, match="already added"):
        aggregate([good[0], good[0]], r_max=R_MAX)
    with pytest.raises(ValueError, match="num_examples"):
        ClientUpdate("x", good[0].state_dict, 2, -1)
    with pytest.raises(ValueError, match="result"):
        StreamingAggregator("hetlora", R_MAX).result()


def test_rejected_update_leaves_aggregator_unchanged():
    good = make_updates(80, [2, 5])
    bad_sd = dict(make_updates(81, [3])[0].state_dict)
    name = list(SHAPES)[-1]
    bad_sd[b_key(name)] = bad_sd[b_key(name)].clone()
    bad_sd[b_key(name)][0, 0] = float("nan")
    agg = StreamingAggregator("hetlora", R_MAX, SCALE)
    agg.add(good[0])
    with pytest.raises(ValueError, match="non-finite"):
        agg.add(ClientUpdate("bad", bad_sd, 3, 100))
    agg.add(good[1])
    expected = aggregate(good, r_max=R_MAX, scaling=SCALE)
    got = agg.result()
    assert got.weights == pytest.approx(expected.weights) and "bad" not in got.weights
    for key, value in expected.state_dict.items():
        torch.testing.assert_close(got.state_dict[key], value, rtol=0, atol=0)


# -- randomised FlexLoRA (Halko, Martinsson & Tropp 2011, arXiv 0909.4061) --------------------------------------------


@pytest.fixture
def one_thread():
    """One torch thread: on the shared 2-core machine OpenMP barriers make these small GEMMs 40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _known_spectrum_stack(sig, d_out=300, d_in=200, clients=20, rank=12, seed=0):
    """Client factors whose data-weighted mean (equal n_k) is W = U diag(sig) V^T exactly; stacked rank 240 > 200.

    B_cat = K U diag(sig) M and A_cat = M^+ V^T for a random full-row-rank M (n x R), so B_cat A_cat / K = W.
    (float64 torch.linalg under one thread: numpy's threaded LAPACK stalls for seconds on the shared machine.)
    """
    gen = torch.Generator().manual_seed(seed)
    n = min(d_out, d_in)
    u, _ = torch.linalg.qr(torch.randn((d_out, n), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn((d_in, n), generator=gen, dtype=torch.float64))
    mix = torch.randn((n, clients * rank), generator=gen, dtype=torch.float64)
    us = u * torch.from_numpy(sig)
    b_cat = clients * us @ mix
    a_cat = torch.linalg.pinv(mix) @ v.T
    updates = []
    for k in range(clients):
        sl = slice(k * rank, (k + 1) * rank)
        sd = {"m.lora_A.weight": a_cat[sl].float(), "m.lora_B.weight": b_cat[:, sl].float()}
        updates.append(ClientUpdate(f"c{k}", sd, rank, 7))
    return (us @ v.T).numpy(), updates


def _spectral_norm(matrix: np.ndarray) -> float:
    return float(torch.linalg.matrix_norm(torch.from_numpy(matrix), ord=2))


def _halko_bound(sig, k, p, q):
    """sigma_{k+1} + E||(I - QQ^T) W||: Halko et al. 2011, Cor. 10.10 (power scheme) plus Thm. 9.3 (truncation)."""
    t = 2 * q + 1
    tail = math.sqrt(float(np.sum(sig[k:] ** (2 * t))))
    range_err = ((1 + math.sqrt(k / (p - 1))) * sig[k] ** t + math.e * math.sqrt(k + p) / p * tail) ** (1 / t)
    return sig[k] + range_err


@pytest.mark.parametrize("decay", ["exp", "poly", "slow"])
@pytest.mark.parametrize("power_iters", [0, 1, 2])
def test_randomized_flexlora_error_bound(decay, power_iters, one_thread):
    from peft_hetlora.federated.aggregation.methods import register_aggregation, unregister_aggregation
    from peft_hetlora.federated.aggregation.methods.flexlora import FlexLoRA

    n, r_max, p = 200, 16, 16
    i = np.arange(n)
    sig = {"exp": np.exp(-i / 6.0), "poly": 1 / np.sqrt(1 + i), "slow": 1 / (1 + i) ** 0.2}[decay]
    dense, updates = _known_spectrum_stack(sig)
    register_aggregation("flex_rsvd_test", FlexLoRA(svd="randomized", oversample=p, power_iters=power_iters))
    try:
        res = aggregate(updates, method="flex_rsvd_test", r_max=r_max)
    finally:
        unregister_aggregation("flex_rsvd_test")
    a = res.state_dict["m.lora_A.weight"].double().numpy()
    b = res.state_dict["m.lora_B.weight"].double().numpy()
    err = _spectral_norm(dense - b @ a)
    assert err <= _halko_bound(sig, r_max, p, power_iters)
    if power_iters == 2 and decay != "slow":  # the default, on a decaying spectrum: near the optimum sigma_{r_max+1}
        assert err <= 1.05 * sig[r_max]
        np.testing.assert_allclose(np.linalg.norm(b, axis=0), sig[:r_max], rtol=0.05)
    np.testing.assert_allclose(a @ a.T, np.eye(r_max), atol=1e-4)  # A = V^T keeps orthonormal rows


def test_flexlora_auto_switches_to_randomized_above_the_matrix_rank(one_thread):
    """The built-in flexlora: exact factored path while sum r_k <= fold_at (146 here), the one-pass sketch above it
    (tests/test_flexlora_sketch.py checks the sketch's bound; HMT's sharper one is svd="randomized", tested above)."""
    from peft_hetlora.federated.aggregation.methods.flexlora import FactorStack

    sig = np.exp(-np.arange(200) / 6.0)
    dense, updates = _known_spectrum_stack(sig)
    stack = FactorStack("m", (12, 200), (300, 12), 16)
    assert stack.fold_at == 146  # (8 (300 x 33 + 67 x 200) + 4 (200 x 33 + 67 x 300)) // (4 x 500)
    for u in updates[:12]:  # 144 <= 146: exact
        stack.add(u.client_id, u.state_dict["m.lora_A.weight"], u.state_dict["m.lora_B.weight"], 1, 1.0)
    assert not stack.uses_randomized()
    for u in updates[12:]:  # 240 > 146: the sketch
        stack.add(u.client_id, u.state_dict["m.lora_A.weight"], u.state_dict["m.lora_B.weight"], 1, 1.0)
    assert stack.uses_randomized()
    assert not FactorStack("m", (12, 40), (30, 12), 16).uses_randomized()  # sketch not much smaller: exact
    res = aggregate(updates, method="flexlora", r_max=16)
    again = aggregate(updates, method="flexlora", r_max=16)
    assert all(torch.equal(res.state_dict[k], again.state_dict[k]) for k in res.state_dict)  # deterministic
    a = res.state_dict["m.lora_A.weight"].double().numpy()
    b = res.state_dict["m.lora_B.weight"].double().numpy()
    assert _spectral_norm(dense - b @ a) <= 1.05 * sig[16]
    assert res.summary()["factorization"]["m"]["path"] == "sketch"
    # Frobenius: within the sketch's expected bound tau + 2 sqrt(4) tau (docs/aggregation.md), a 1-in-4 Markov margin
    tau = float(np.sqrt(np.sum(sig[16:] ** 2)))
    assert np.linalg.norm(dense - b @ a) <= tau + 2 * 2 * tau * 2


def test_flexlora_rejects_bad_svd_settings():
    from peft_hetlora.federated.aggregation.methods.flexlora import FlexLoRA

    with pytest.raises(ValueError, match="svd mode"):
        FlexLoRA(svd="dense")
    with pytest.raises(ValueError, match="power_iters"):
        FlexLoRA(power_iters=-1)
