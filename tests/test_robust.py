"""Robust per-component aggregation against an independent numpy reference, and a 20 % Byzantine test.

The reference loops over every component and calls ``np.median`` / an explicit sort-and-trim; the bound is the
formula of docs/privacy.md computed from the honest clients with dense ``B @ A`` products.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peft_hetlora.federated.aggregation import ClientUpdate, aggregate
from peft_hetlora.federated.aggregation.methods.robust import RobustConfigError, robust_aggregate, robust_stat
from peft_hetlora.utils.errors import HetLoRAError, RankError

try:  # pytest puts tests/ on sys.path when tests/ is not a package ...
    from lora_keys import EXTRA, ak, bk
except ImportError:  # ... and the repository root when it is
    from tests.lora_keys import EXTRA, ak, bk

R_MAX = 8
SCALE = 2.0
SHAPES = {"layers.0.q_proj": (6, 5), "layers.1.v_proj": (4, 7)}  # name -> (d_out, d_in)


def random_sd(rng: np.random.Generator, rank: int, center: dict | None = None, spread: float = 1.0) -> dict:
    sd = {}
    for name, (d_out, d_in) in SHAPES.items():
        a = rng.standard_normal((rank, d_in)) * spread
        b = rng.standard_normal((d_out, rank)) * spread
        if center is not None:
            a = a + center[ak(name)][:rank].numpy()
            b = b + center[bk(name)][:, :rank].numpy()
        sd[ak(name)] = torch.from_numpy(a).float()
        sd[bk(name)] = torch.from_numpy(b).float()
    extra = rng.standard_normal((2, 3)) * spread + (0 if center is None else center[EXTRA].numpy())
    sd[EXTRA] = torch.from_numpy(extra).float()
    return sd


def np_stat(values: np.ndarray, rule: str, trim: float) -> np.ndarray:
    if rule == "median":
        return np.median(values, axis=0)
    n = values.shape[0]
    k = int(math.floor(trim * n))
    return np.sort(values, axis=0)[k : n - k].mean(axis=0)


def ref_robust(updates, rule, trim, previous=None, min_clients=1):
    """Component by component, client by client: the rule over the clients with rank > j."""
    out = {}
    for name, (d_out, d_in) in SHAPES.items():
        a = np.zeros((R_MAX, d_in)) if previous is None else previous[ak(name)].double().numpy().copy()
        b = np.zeros((d_out, R_MAX)) if previous is None else previous[bk(name)].double().numpy().copy()
        for j in range(R_MAX):
            cover = [u for u in updates if u.state_dict[ak(name)].shape[0] > j]
            if len(cover) < min_clients:
                continue
            a[j] = np_stat(np.stack([u.state_dict[ak(name)][j].double().numpy() for u in cover]), rule, trim)
            b[:, j] = np_stat(np.stack([u.state_dict[bk(name)][:, j].double().numpy() for u in cover]), rule, trim)
        out[ak(name)], out[bk(name)] = a, b
    out[EXTRA] = np_stat(np.stack([u.state_dict[EXTRA].double().numpy() for u in updates]), rule, trim)
    return out


def delta_w(sd, name) -> np.ndarray:
    a = np.asarray(sd[ak(name)], dtype=np.float64)
    b = np.asarray(sd[bk(name)], dtype=np.float64)
    return SCALE * b @ a


def honest_bound(honest, previous, name) -> float:
    """s (||R_B|| ||M_A|| + ||M_B|| ||R_A||) with R the honest range, M the honest max |.| per coordinate."""
    d_out, d_in = SHAPES[name]
    r_a, m_a = np.zeros((R_MAX, d_in)), np.abs(previous[ak(name)].double().numpy())
    r_b, m_b = np.zeros((d_out, R_MAX)), np.abs(previous[bk(name)].double().numpy())
    for j in range(R_MAX):
        cover = [u for u in honest if u.state_dict[ak(name)].shape[0] > j]
        if not cover:
            continue
        av = np.stack([u.state_dict[ak(name)][j].double().numpy() for u in cover])
        bv = np.stack([u.state_dict[bk(name)][:, j].double().numpy() for u in cover])
        r_a[j], m_a[j] = av.max(0) - av.min(0), np.abs(av).max(0)
        r_b[:, j], m_b[:, j] = bv.max(0) - bv.min(0), np.abs(bv).max(0)
    return SCALE * (np.linalg.norm(r_b) * np.linalg.norm(m_a) + np.linalg.norm(m_b) * np.linalg.norm(r_a))


@pytest.mark.parametrize("rule,trim", [("median", 0.2), ("trimmed_mean", 0.2), ("trimmed_mean", 0.0)])
@pytest.mark.parametrize("use_previous", [False, True])
@pytest.mark.parametrize(
    "ranks",
    [
        [R_MAX, 1, 3, 3, 5, 1, 6],  # r_k = r_max and r_k = 1; component 7 covered by one client
        [2, 1, 5, 5, 3, 1],  # components 5..7 covered by nobody: previous (or zeros)
    ],
)
def test_matches_numpy_reference_with_mixed_ranks(rule, trim, use_previous, ranks):
    rng = np.random.default_rng(3)
    ups = [ClientUpdate(f"c{k}", random_sd(rng, r), r, 10) for k, r in enumerate(ranks)]
    previous = random_sd(rng, R_MAX) if use_previous else None
    res = robust_aggregate(ups, rule=rule, r_max=R_MAX, previous=previous, trim=trim, scaling=SCALE)
    ref = ref_robust(ups, rule, trim, previous)
    for key, value in ref.items():
        assert res.state_dict[key].dtype == torch.float32
        np.testing.assert_allclose(res.state_dict[key].double().numpy(), value, rtol=1e-6, atol=1e-6)
    assert res.method == rule and set(res.ranks) == {u.client_id for u in ups}


def test_uncovered_components_keep_previous_and_min_clients():
    rng = np.random.default_rng(4)
    ups = [ClientUpdate(f"c{k}", random_sd(rng, r), r, 1) for k, r in enumerate([2, 2, 2, 4])]
    previous = random_sd(rng, R_MAX)
    res = robust_aggregate(ups, rule="median", r_max=R_MAX, previous=previous, min_clients=2)
    for name in SHAPES:
        # components 2, 3 are covered by one client only (< min_clients), 4.. by none: all keep previous
        np.testing.assert_array_equal(res.state_dict[ak(name)][2:].numpy(), previous[ak(name)][2:].numpy())
        np.testing.assert_array_equal(res.state_dict[bk(name)][:, 2:].numpy(), previous[bk(name)][:, 2:].numpy())
    assert any("kept previous" in m for m in res.messages)
    np.testing.assert_allclose(
        res.state_dict[ak("layers.0.q_proj")].numpy(),
        ref_robust(ups, "median", 0.2, previous, 2)[ak("layers.0.q_proj")],
        atol=1e-6,
    )


def attack(kind: str, honest_like: dict) -> dict:
    out = {}
    for key, t in honest_like.items():
        if kind == "scaled":
            out[key] = t * 1e3
        elif kind == "sign_flip":
            out[key] = -t if key.endswith("lora_A.weight") or key == EXTRA else t.clone()
        elif kind == "unbalanced":  # B A unchanged, factors absurd: ||B A|| clip checks cannot see it
            out[key] = t * (1e-6 if key.endswith("lora_A.weight") else 1e6)
    return out


@pytest.mark.parametrize("kind", ["scaled", "sign_flip", "unbalanced"])
@pytest.mark.parametrize("rule,trim", [("median", 0.2), ("trimmed_mean", 0.35)])
def test_two_byzantine_of_ten_stay_within_stated_bound(kind, rule, trim):
    rng = np.random.default_rng(11)
    center = random_sd(rng, R_MAX)
    previous = random_sd(rng, R_MAX)
    honest_ranks = [8, 8, 8, 8, 6, 6, 4, 4]  # 2 attackers at r_max: component 7 has 4 honest + 2 Byzantine
    honest = [ClientUpdate(f"h{k}", random_sd(rng, r, center, 0.01), r, 10) for k, r in enumerate(honest_ranks)]
    byz = [ClientUpdate(f"b{k}", attack(kind, random_sd(rng, R_MAX, center, 0.01)), R_MAX, 10) for k in range(2)]
    everyone = honest[:4] + byz[:1] + honest[4:] + byz[1:]

    robust = robust_aggregate(everyone, rule=rule, r_max=R_MAX, previous=previous, trim=trim).state_dict
    honest_only = robust_aggregate(honest, rule=rule, r_max=R_MAX, previous=previous, trim=trim).state_dict
    mean = aggregate(everyone, method="zero_pad", r_max=R_MAX, scaling=SCALE).state_dict
    honest_mean = aggregate(honest, method="zero_pad", r_max=R_MAX, scaling=SCALE).state_dict
    for name in SHAPES:
        bound = honest_bound(honest, previous, name)
        robust_gap = np.linalg.norm(delta_w(robust, name) - delta_w(honest_only, name))
        mean_gap = np.linalg.norm(delta_w(mean, name) - delta_w(honest_mean, name))
        assert robust_gap <= bound * (1 + 1e-6), (name, robust_gap, bound)
        assert mean_gap > bound, (name, mean_gap, bound)
        # the bound is meaningful: far below the size of the honest update itself
        assert bound < 0.5 * np.linalg.norm(delta_w(honest_only, name))


def test_attackers_alone_on_a_component_need_min_clients():
    rng = np.random.default_rng(5)
    center = random_sd(rng, R_MAX)
    honest = [ClientUpdate(f"h{k}", random_sd(rng, 4, center, 0.01), 4, 1) for k in range(5)]
    byz = [ClientUpdate(f"b{k}", attack("scaled", random_sd(rng, R_MAX, center, 0.01)), R_MAX, 1) for k in range(2)]
    previous = random_sd(rng, R_MAX)
    loose = robust_aggregate(honest + byz, rule="median", r_max=R_MAX, previous=previous).state_dict
    safe = robust_aggregate(honest + byz, rule="median", r_max=R_MAX, previous=previous, min_clients=5).state_dict
    key = ak("layers.0.q_proj")
    assert float(loose[key][4:].abs().max()) > 100  # only attackers cover 4..7: they own it (condition violated)
    np.testing.assert_array_equal(safe[key][4:].numpy(), previous[key][4:].numpy())


def test_robust_stat_even_median_and_trim_edges():
    v = torch.tensor([[4.0], [1.0], [3.0], [2.0]])
    assert robust_stat(v, "median").item() == 2.5
    assert robust_stat(v, "trimmed_mean", 0.0).item() == 2.5
    assert robust_stat(v, "trimmed_mean", 0.25).item() == 2.5  # drops 1 and 4


def test_bad_settings_and_uploads_are_rejected():
    rng = np.random.default_rng(0)
    ups = [ClientUpdate("a", random_sd(rng, 2), 2, 1)]
    with pytest.raises(RobustConfigError, match="unknown robust rule"):
        robust_aggregate(ups, rule="krum", r_max=4)
    with pytest.raises(RobustConfigError, match="trim"):
        robust_aggregate(ups, rule="trimmed_mean", r_max=4, trim=0.5)
    with pytest.raises(RankError, match="r_max=1"):
        robust_aggregate(ups, rule="median", r_max=1)
    bad = random_sd(rng, 2)
    bad[ak("layers.0.q_proj")][0, 0] = float("nan")
    with pytest.raises(HetLoRAError, match="non-finite"):
        robust_aggregate(ups + [ClientUpdate("b", bad, 2, 1)], rule="median", r_max=4)
    with pytest.raises(HetLoRAError, match="twice"):
        robust_aggregate(ups + ups, rule="median", r_max=4)
