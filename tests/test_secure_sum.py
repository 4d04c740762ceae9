"""Secure-aggregation-ready sums: combining only summed shares equals the plain aggregate and a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peft_hetlora.federated.aggregation import ClientUpdate, aggregate
from peft_hetlora.federated.aggregation.privacy import SecureSumError, client_share, combine, sum_shares
from peft_hetlora.utils.errors import RankError

try:  # pytest puts tests/ on sys.path when tests/ is not a package ...
    from lora_keys import EXTRA, ak, bk
except ImportError:  # ... and the repository root when it is
    from tests.lora_keys import EXTRA, ak, bk

R_MAX = 6
SCALE = 0.5
SHAPES = {"layers.0.q_proj": (5, 4), "layers.1.v_proj": (3, 7)}  # name -> (d_out, d_in)


def random_sd(rng, rank: int, zero_b: bool = False) -> dict:
    sd = {}
    for name, (d_out, d_in) in SHAPES.items():
        sd[ak(name)] = torch.from_numpy(rng.standard_normal((rank, d_in))).float()
        b = np.zeros((d_out, rank)) if zero_b else rng.standard_normal((d_out, rank))
        sd[bk(name)] = torch.from_numpy(b).float()
    sd[EXTRA] = torch.from_numpy(rng.standard_normal((2, 3))).float()
    return sd


def np_(t) -> np.ndarray:
    return np.asarray(t, dtype=np.float64)


def ref_norm(sd) -> float:
    return float(np.sqrt(sum(np.linalg.norm(SCALE * np_(sd[bk(n)]) @ np_(sd[ak(n)])) ** 2 for n in SHAPES)))


def ref_weighted_components(state_dicts, weights, indices, previous):
    """Component j of module m: sum_k w_k A_k[row of j] / sum_k w_k over clients k with j in indices[k][m]."""
    out = {}
    for name, (d_out, d_in) in SHAPES.items():
        a = np.zeros((R_MAX, d_in)) if previous is None else np_(previous[ak(name)]).copy()
        b = np.zeros((d_out, R_MAX)) if previous is None else np_(previous[bk(name)]).copy()
        for j in range(R_MAX):
            num_a, num_b, den = 0.0, 0.0, 0.0
            for sd, w, idx in zip(state_dicts, weights, indices):
                if j in idx[name]:
                    row = idx[name].index(j)
                    num_a = num_a + w * np_(sd[ak(name)][row])
                    num_b = num_b + w * np_(sd[bk(name)][:, row])
                    den += w
            if den > 0:
                a[j], b[:, j] = num_a / den, num_b / den
        out[ak(name)], out[bk(name)] = a, b
    total = sum(weights)
    out[EXTRA] = sum(w * np_(sd[EXTRA]) for sd, w in zip(state_dicts, weights)) / total
    return out


def prefix(updates):
    return [{n: list(range(u.state_dict[ak(n)].shape[0])) for n in SHAPES} for u in updates]


def full(updates):
    return [{n: list(range(R_MAX)) for n in SHAPES} for _ in updates]


def make_round(seed, ranks=(R_MAX, 1, 3, 4, 3), zero_b=()):
    rng = np.random.default_rng(seed)
    ups = [ClientUpdate(f"c{k}", random_sd(rng, r, zero_b=k in zero_b), r, 5 * (k + 1)) for k, r in enumerate(ranks)]
    return ups, random_sd(rng, R_MAX)


def secure(updates, method, previous=None, **kwargs):
    shares = [client_share(u, method=method, r_max=R_MAX, scaling=SCALE, **kwargs) for u in updates]
    return combine(sum_shares(shares), method=method, r_max=R_MAX, previous=previous)


def assert_close(state_dict, ref):
    for key, value in ref.items():
        np.testing.assert_allclose(np_(state_dict[key]), value, rtol=1e-5, atol=1e-6, err_msg=key)


def ref_hetlora(updates):
    """p_k = S_k / sum S_j; A = sum_k p_k pad(A_k): zero-padding makes every client cover every component."""
    padded = []
    for u in updates:
        sd = dict(u.state_dict)
        for name, (d_out, d_in) in SHAPES.items():
            a, b = np.zeros((R_MAX, d_in)), np.zeros((d_out, R_MAX))
            a[: u.rank], b[:, : u.rank] = np_(sd[ak(name)]), np_(sd[bk(name)])
            sd[ak(name)], sd[bk(name)] = a, b
        padded.append(sd)
    return ref_weighted_components(padded, [ref_norm(u.state_dict) for u in updates], full(updates), None)


@pytest.mark.parametrize("seed", [0, 1])
def test_hetlora_from_sums_equals_plain_and_numpy(seed):
    ups, _ = make_round(seed)
    res = secure(ups, "hetlora")
    assert_close(res.state_dict, ref_hetlora(ups))
    assert_close(res.state_dict, {k: np_(v) for k, v in aggregate(ups, "hetlora", R_MAX, SCALE).state_dict.items()})
    assert res.weights == {} and res.fallback is None


@pytest.mark.parametrize("use_previous", [False, True])
def test_rankwise_from_sums_equals_plain_and_numpy(use_previous):
    ups, previous = make_round(2, ranks=(4, 1, 3, 4, 2))  # components 4, 5 covered by nobody
    previous = previous if use_previous else None
    res = secure(ups, "rankwise", previous)
    ref = ref_weighted_components(
        [u.state_dict for u in ups], [ref_norm(u.state_dict) for u in ups], prefix(ups), previous
    )
    assert_close(res.state_dict, ref)
    plain = aggregate(ups, "rankwise", R_MAX, SCALE, previous=previous).state_dict
    assert_close(res.state_dict, {k: np_(v) for k, v in plain.items()})


def test_component_rule_with_windows_matches_numpy():
    ups, previous = make_round(3, ranks=(2, 3, 2, 1))
    windows = [{n: w for n in SHAPES} for w in ([4, 5], [0, 1, 2], [1, 4], [3])]
    shares = [
        client_share(u, method="component", r_max=R_MAX, scaling=SCALE, components=w) for u, w in zip(ups, windows)
    ]
    res = combine(sum_shares(shares), method="component", r_max=R_MAX, previous=previous)
    weights = [ref_norm(u.state_dict) for u in ups]
    assert_close(res.state_dict, ref_weighted_components([u.state_dict for u in ups], weights, windows, previous))


@pytest.mark.parametrize("method", ["zero_pad", "fedavg"])
def test_data_size_methods_from_sums(method):
    ranks = (3, 3, 3) if method == "fedavg" else (R_MAX, 2, 5)
    ups, _ = make_round(4, ranks=ranks)
    res = secure(ups, method)
    assert_close(res.state_dict, {k: np_(v) for k, v in aggregate(ups, method, R_MAX).state_dict.items()})


def test_per_module_weighting_matches_plain():
    ups, previous = make_round(5)
    for method in ("hetlora", "rankwise"):
        res = secure(ups, method, previous, weighting="per_module")
        plain = aggregate(ups, method, R_MAX, SCALE, previous=previous, weighting="per_module").state_dict
        assert_close(res.state_dict, {k: np_(v) for k, v in plain.items()})


@pytest.mark.parametrize("zero_b,counts", [((0, 1, 2, 3, 4), None), ((1, 3), None), ((0, 1, 2, 3, 4), "zero")])
def test_fallback_levels_match_plain(zero_b, counts):
    ups, previous = make_round(6, zero_b=zero_b)
    if counts == "zero":
        ups = [ClientUpdate(u.client_id, u.state_dict, u.rank, 0) for u in ups]
    for method in ("hetlora", "rankwise"):
        res = secure(ups, method, previous)
        plain = aggregate(ups, method, R_MAX, SCALE, previous=previous)
        assert_close(res.state_dict, {k: np_(v) for k, v in plain.state_dict.items()})
        assert res.fallback == plain.fallback


def test_combine_is_invariant_to_a_common_factor_like_a_mean():
    ups, previous = make_round(7)
    sums = sum_shares(client_share(u, method="rankwise", r_max=R_MAX, scaling=SCALE) for u in ups)
    mean = {k: v / len(ups) for k, v in sums.items()}  # what Flower's SecAgg+ hands back with num_examples = 1
    a = combine(sums, method="rankwise", r_max=R_MAX, previous=previous).state_dict
    b = combine(mean, method="rankwise", r_max=R_MAX, previous=previous).state_dict
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-6, atol=1e-7)


def test_shares_have_public_keys_and_shapes_whatever_the_rank():
    ups, _ = make_round(8, ranks=(1, R_MAX))
    s1, s2 = (client_share(u, method="rankwise", r_max=R_MAX, scaling=SCALE) for u in ups)
    assert set(s1) == set(s2) and all(s1[k].shape == s2[k].shape for k in s1)
    assert float(s1["sparsity/__coverage__/layers.0.q_proj"][1:].abs().sum()) == 0.0  # rank 1: only component 0


def test_bad_inputs_are_rejected():
    ups, _ = make_round(9, ranks=(2, 3))
    with pytest.raises(SecureSumError, match="unknown method"):
        client_share(ups[0], method="flexlora", r_max=R_MAX)
    with pytest.raises(RankError, match="distinct global indices"):
        client_share(ups[0], method="component", r_max=R_MAX, components={"layers.0.q_proj": [0, 0]})
    with pytest.raises(RankError):
        client_share(ups[1], method="rankwise", r_max=2)
    a = client_share(ups[0], method="rankwise", r_max=R_MAX, levels=("sparsity",))
    b = client_share(ups[1], method="rankwise", r_max=R_MAX)
    with pytest.raises(SecureSumError, match="different keys"):
        sum_shares([a, b])
    with pytest.raises(SecureSumError, match="levels"):
        client_share(ups[0], method="zero_pad", r_max=R_MAX, levels=("sparsity",))


def test_sums_survive_flower_secaggplus_fixed_point_arithmetic():
    """Flower 1.42 SecAgg+ quantizes each client's vector, sums the integers mod 2^32 (the masks cancel exactly) and
    dequantizes; with num_examples = 1 for every client it returns the mean share. Replay that arithmetic with
    Flower's own quantize / dequantize and check the combined global against the plain path."""
    quant = pytest.importorskip("flwr.common.secure_aggregation.quantization")
    ups, previous = make_round(10)
    bound = max(ref_norm(u.state_dict) for u in ups) * 1.5  # a public bound on S_k keeps shares in range
    shares = [client_share(u, method="rankwise", r_max=R_MAX, scaling=SCALE, weight_scale=bound) for u in ups]
    keys = sorted(shares[0])
    clipping, target, modulus = 8.0, 2**22, 2**32
    assert max(float(s[k].abs().max()) for s in shares for k in keys) < clipping
    np.random.seed(0)  # Flower's stochastic rounding draws from numpy's global generator
    ints = [quant.quantize([s[k].numpy() for k in keys], clipping, target) for s in shares]
    summed = [np.mod(sum(q[i].astype(np.int64) for q in ints), modulus) for i in range(len(keys))]
    deq = quant.dequantize(summed, clipping, target)
    offset = -(len(ups) - 1) * clipping
    mean = {k: torch.from_numpy((arr + offset) / len(ups)) for k, arr in zip(keys, deq)}
    res = combine(mean, method="rankwise", r_max=R_MAX, previous=previous).state_dict
    plain = aggregate(ups, "rankwise", R_MAX, SCALE, previous=previous).state_dict
    for key in plain:  # quantization step 2 * 8 / 2^22 ~ 4e-6 per client and value
        np.testing.assert_allclose(res[key].numpy(), plain[key].numpy(), atol=2e-3, rtol=0)
