"""Client-level DP: Opacus's own worked examples, exactness without noise, the clip against unbalanced factors,
and the noise calibration (seeded, deterministic tolerances).

References are independent: numpy loops over components and clients, dense ``B @ A`` products for delta W.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("opacus")

from peft_hetlora.federated.aggregation import ClientUpdate, aggregate  # noqa: E402
from peft_hetlora.federated.aggregation.privacy import (  # noqa: E402
    DPConfig,
    DPConfigError,
    dp_aggregate,
    privacy_spent,
    privatize_update,
)

try:  # pytest puts tests/ on sys.path when tests/ is not a package ...
    from lora_keys import EXTRA, ak, bk
except ImportError:  # ... and the repository root when it is
    from tests.lora_keys import EXTRA, ak, bk

R_MAX = 6
SCALE = 2.0
SHAPES = {"layers.0.q_proj": (5, 4), "layers.1.v_proj": (3, 7)}  # name -> (d_out, d_in)


def random_sd(rng, rank: int, shapes=SHAPES, extra=True, scale: float = 1.0) -> dict:
    sd = {}
    for name, (d_out, d_in) in shapes.items():
        sd[ak(name)] = torch.from_numpy(rng.standard_normal((rank, d_in)) * scale).float()
        sd[bk(name)] = torch.from_numpy(rng.standard_normal((d_out, rank)) * scale).float()
    if extra:
        sd[EXTRA] = torch.from_numpy(rng.standard_normal((2, 3)) * scale).float()
    return sd


def np_(t) -> np.ndarray:
    return np.asarray(t, dtype=np.float64)


def ref_component_mean(updates, previous):
    """Component j: plain mean over the clients with rank > j; uncovered: previous (extras: mean over all)."""
    out = {}
    for name in SHAPES:
        a, b = np_(previous[ak(name)]).copy(), np_(previous[bk(name)]).copy()
        for j in range(R_MAX):
            cover = [u.state_dict for u in updates if u.state_dict[ak(name)].shape[0] > j]
            if cover:
                a[j] = np.mean([np_(sd[ak(name)][j]) for sd in cover], axis=0)
                b[:, j] = np.mean([np_(sd[bk(name)][:, j]) for sd in cover], axis=0)
        out[ak(name)], out[bk(name)] = a, b
    out[EXTRA] = np.mean([np_(u.state_dict[EXTRA]) for u in updates], axis=0)
    return out


def ref_zero_pad_mean(updates):
    out = {}
    for name, (d_out, d_in) in SHAPES.items():
        a, b = np.zeros((R_MAX, d_in)), np.zeros((d_out, R_MAX))
        for u in updates:
            r = u.state_dict[ak(name)].shape[0]
            a[:r] += np_(u.state_dict[ak(name)]) / len(updates)
            b[:, :r] += np_(u.state_dict[bk(name)]) / len(updates)
        out[ak(name)], out[bk(name)] = a, b
    out[EXTRA] = np.mean([np_(u.state_dict[EXTRA]) for u in updates], axis=0)
    return out


def mixed_round(seed: int, ranks=(R_MAX, 1, 3, 3, 4)):
    rng = np.random.default_rng(seed)
    ups = [ClientUpdate(f"c{k}", random_sd(rng, r), r, 10 * (k + 1)) for k, r in enumerate(ranks)]
    return ups, random_sd(rng, R_MAX)


# --- accounting: Opacus's own worked examples (opacus/tests/accountants_test.py, opacus 1.6.0) -----------------


def test_rdp_epsilon_matches_opacus_worked_example():
    cfg = DPConfig(clip=1.0, noise_multiplier=1.5, sampling_rate=0.04, delta=1e-5)
    rec = privacy_spent(cfg, int(90 / 0.04))  # AccountingTest.test_rdp_accountant: 7.32911117143
    assert rec["epsilon"] == pytest.approx(7.32911117143, abs=1e-7)
    assert rec["rounds"] == 2250 and rec["library"].startswith("opacus ")
    json.dumps(rec, allow_nan=False)


def test_target_epsilon_matches_opacus_worked_example():
    # AccountingTest.test_get_noise_multiplier_rdp_steps: epsilon 8, delta 1e-5, q 0.04, 2000 steps -> 1.3562
    cfg = DPConfig(clip=1.0, target_epsilon=8.0, rounds=2000, sampling_rate=0.04, delta=1e-5)
    assert cfg.noise_multiplier == pytest.approx(1.3562, abs=5e-5)
    assert privacy_spent(cfg, 2000)["epsilon"] <= 8.0


def test_prv_epsilon_matches_opacus_worked_example():
    cfg = DPConfig(clip=1.0, noise_multiplier=1.5, sampling_rate=0.04, delta=1e-5, accountant="prv")
    assert privacy_spent(cfg, int(90 // 0.04))["epsilon"] == pytest.approx(6.777395712150674, abs=1e-6)


def test_accounting_edges_and_local_model():
    cfg = DPConfig(clip=1.0, noise_multiplier=0.0, population=1000)
    assert cfg.delta == pytest.approx(1000**-1.1)
    assert privacy_spent(cfg, 3)["epsilon"] is None and privacy_spent(cfg, 0)["epsilon"] == 0.0
    local = DPConfig(clip=1.0, noise_multiplier=3.0, delta=1e-5, sampling_rate=0.04, model="local")
    central_equiv = DPConfig(clip=1.0, noise_multiplier=1.5, delta=1e-5, sampling_rate=1.0)
    # local: replace-one sensitivity 2C (sigma / 2) and no amplification by sampling
    assert privacy_spent(local, 5)["epsilon"] == pytest.approx(privacy_spent(central_equiv, 5)["epsilon"])


# --- exactness without noise --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_off_large_clip_component_equals_plain_mean(seed):
    ups, previous = mixed_round(seed)
    counts = [sum(u.state_dict[ak("layers.0.q_proj")].shape[0] > j for u in ups) for j in range(R_MAX)]
    cfg = DPConfig(
        clip=1e9,
        noise_multiplier=0.0,
        delta=1e-5,
        expected_clients=len(ups),
        expected_coverage=tuple(c / len(ups) for c in counts),
    )
    res = dp_aggregate(ups, config=cfg, r_max=R_MAX, previous=previous, generator=torch.Generator().manual_seed(0))
    ref = ref_component_mean(ups, previous)
    for key, value in ref.items():
        np.testing.assert_allclose(np_(res.state_dict[key]), value, rtol=1e-6, atol=1e-6)
    summary = res.summary()
    json.dumps(summary, allow_nan=False)
    assert summary["privacy"]["epsilon"] is None and summary["norms"] == {}


def test_noise_off_large_clip_zero_pad_equals_plain_path():
    ups, previous = mixed_round(2)
    equal = [ClientUpdate(u.client_id, u.state_dict, u.rank, 7) for u in ups]
    cfg = DPConfig(clip=1e9, noise_multiplier=0.0, delta=1e-5, expected_clients=len(ups))
    res = dp_aggregate(ups, config=cfg, r_max=R_MAX, previous=previous, method="zero_pad")
    plain = aggregate(equal, method="zero_pad", r_max=R_MAX).state_dict
    for key, value in ref_zero_pad_mean(ups).items():
        np.testing.assert_allclose(np_(res.state_dict[key]), value, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np_(res.state_dict[key]), np_(plain[key]), rtol=1e-6, atol=1e-6)


# --- the clip bounds one client's influence, unbalanced factors included ------------------------------------


def spectral(x: np.ndarray) -> float:
    return float(np.linalg.norm(x, 2))


@pytest.mark.parametrize("method", ["component", "zero_pad"])
def test_clip_bounds_unbalanced_attacker_on_factors_and_delta_w(method):
    ups, previous = mixed_round(3)
    rng = np.random.default_rng(9)
    evil = random_sd(rng, R_MAX)
    for name in SHAPES:  # B A stays moderate, the factors are absurd
        evil[ak(name)] = evil[ak(name)] * 1e-6
        evil[bk(name)] = evil[bk(name)] * 1e6
    attacker = ClientUpdate("evil", evil, R_MAX, 10)
    clip, d = 0.5, 4.0
    cfg = DPConfig(clip=clip, noise_multiplier=0.0, delta=1e-5, expected_clients=d)
    without = dp_aggregate(ups, config=cfg, r_max=R_MAX, previous=previous, method=method).state_dict
    with_evil = dp_aggregate(ups + [attacker], config=cfg, r_max=R_MAX, previous=previous, method=method).state_dict
    e = clip / d  # w_max C / min_j D_j
    moved = math.sqrt(sum(float(((with_evil[k].double() - without[k].double()) ** 2).sum()) for k in without))
    assert moved <= e * (1 + 1e-5)
    assert moved > 0.5 * e  # the attacker is clipped, not dropped
    for name in SHAPES:
        a, b = np_(without[ak(name)]), np_(without[bk(name)])
        dw = SCALE * (np_(with_evil[bk(name)]) @ np_(with_evil[ak(name)]) - b @ a)
        assert np.linalg.norm(dw) <= SCALE * (e * (spectral(a) + spectral(b)) + e * e) * (1 + 1e-5)
    # without the clip the same attacker moves delta W by orders of magnitude more
    loose = DPConfig(clip=1e12, noise_multiplier=0.0, delta=1e-5, expected_clients=d)
    blown = dp_aggregate(ups + [attacker], config=loose, r_max=R_MAX, previous=previous, method=method).state_dict
    name = "layers.0.q_proj"
    gap = np.linalg.norm(np_(blown[bk(name)]) @ np_(blown[ak(name)]) - np_(without[bk(name)]) @ np_(without[ak(name)]))
    assert gap > 1e3


# --- noise calibration ------------------------------------------------------------------------------------------


def test_noise_std_matches_calibration_per_component():
    big = {"big.proj": (120, 90)}
    rng = np.random.default_rng(5)
    ups = [ClientUpdate(f"c{k}", random_sd(rng, r, big, extra=False), r, 1) for k, r in enumerate([8, 2, 5])]
    previous = random_sd(rng, 8, big, extra=False)
    coverage = (1.0, 1.0, 0.8, 0.6, 0.6, 0.4, 0.3, 0.2)
    sigma, clip, expected = 1.7, 0.3, 5.0
    kwargs = dict(delta=1e-5, expected_clients=expected, expected_coverage=coverage)
    clean = dp_aggregate(ups, config=DPConfig(clip=clip, noise_multiplier=0.0, **kwargs), r_max=8, previous=previous)
    noisy = dp_aggregate(
        ups,
        config=DPConfig(clip=clip, noise_multiplier=sigma, **kwargs),
        r_max=8,
        previous=previous,
        generator=torch.Generator().manual_seed(1234),
    )
    den = expected * np.asarray(coverage)
    z_a = (
        (np_(noisy.state_dict[ak("big.proj")]) - np_(clean.state_dict[ak("big.proj")])) * den[:, None] / (sigma * clip)
    )
    z_b = (
        (np_(noisy.state_dict[bk("big.proj")]) - np_(clean.state_dict[bk("big.proj")])) * den[None, :] / (sigma * clip)
    )
    z = np.concatenate([z_a.ravel(), z_b.ravel()])  # 1680 standard normals if calibrated (float32 output)
    assert abs(z.mean()) < 0.08
    assert 0.95 < z.std() < 1.05
    assert 0.65 < np.mean(np.abs(z) < 1.0) < 0.72
    for j in range(8):  # each component divided by its own public denominator
        assert 0.85 < np.concatenate([z_a[j], z_b[:, j]]).std() < 1.15


# --- local model ------------------------------------------------------------------------------------------------


def test_local_privatize_clips_and_noises_then_server_averages():
    ups, previous = mixed_round(6)
    cfg0 = DPConfig(clip=0.25, noise_multiplier=0.0, delta=1e-5, model="local", expected_clients=len(ups))
    priv = [ClientUpdate(u.client_id, privatize_update(u.state_dict, previous, config=cfg0), u.rank, 0) for u in ups]
    for u, p in zip(ups, priv):
        delta_sq = 0.0
        for key, t in p.state_dict.items():
            ref = (
                previous[key]
                if key == EXTRA
                else (previous[key][: t.shape[0]] if key.endswith("lora_A.weight") else previous[key][:, : t.shape[1]])
            )
            assert t.shape == u.state_dict[key].shape
            delta_sq += float(((t.double() - ref.double()) ** 2).sum())
        assert math.sqrt(delta_sq) <= 0.25 * (1 + 1e-5)
    counts = [sum(u.state_dict[ak("layers.0.q_proj")].shape[0] > j for u in ups) for j in range(R_MAX)]
    cfg = DPConfig(
        clip=0.25,
        noise_multiplier=0.0,
        delta=1e-5,
        model="local",
        expected_clients=len(ups),
        expected_coverage=tuple(c / len(ups) for c in counts),
    )
    res = dp_aggregate(priv, config=cfg, r_max=R_MAX, previous=previous)
    for key, value in ref_component_mean(priv, previous).items():
        np.testing.assert_allclose(np_(res.state_dict[key]), value, rtol=1e-5, atol=1e-6)

    noisy_cfg = DPConfig(clip=0.25, noise_multiplier=2.0, delta=1e-5, model="local")
    big = {"big.proj": (100, 80)}
    rng = np.random.default_rng(2)
    g = random_sd(rng, 8, big, extra=False)
    mine = {k: v[:4].clone() if k.endswith("A.weight") else v[:, :4].clone() for k, v in g.items()}  # no change
    out = privatize_update(mine, g, config=noisy_cfg, generator=torch.Generator().manual_seed(7))
    z = np.concatenate([(np_(out[k]) - np_(mine[k])).ravel() for k in out]) / (2.0 * 0.25)
    assert z.size == 720 and 0.93 < z.std() < 1.07


# --- refusals ---------------------------------------------------------------------------------------------------


def test_refusals_say_what_to_do():
    ups, previous = mixed_round(7)
    cfg = DPConfig(clip=1.0, noise_multiplier=1.0, delta=1e-5, expected_clients=5)
    with pytest.raises(DPConfigError, match="sparsity weights"):
        dp_aggregate(ups, config=cfg, r_max=R_MAX, previous=previous, method="hetlora")
    with pytest.raises(DPConfigError, match="previous"):
        dp_aggregate(ups, config=cfg, r_max=R_MAX, previous=None)
    with pytest.raises(DPConfigError, match="public weight"):
        dp_aggregate(ups, config=cfg, r_max=R_MAX, previous=previous, weights={"c0": 2.0})
    with pytest.raises(DPConfigError, match="exactly one"):
        DPConfig(clip=1.0, delta=1e-5)
    with pytest.raises(DPConfigError, match="rounds"):
        DPConfig(clip=1.0, target_epsilon=4.0, delta=1e-5)
    with pytest.raises(DPConfigError, match="population"):
        DPConfig(clip=1.0, noise_multiplier=1.0)
    with pytest.raises(DPConfigError, match="expected_coverage"):
        bad = DPConfig(clip=1.0, noise_multiplier=1.0, delta=1e-5, expected_clients=5, expected_coverage=(1.0,))
        dp_aggregate(ups, config=bad, r_max=R_MAX, previous=previous)
    with pytest.raises(DPConfigError, match="model='local'"):
        privatize_update(ups[0].state_dict, previous, config=cfg)


def test_round_summary_records_spent_budget_and_overrun():
    ups, previous = mixed_round(8)
    cfg = DPConfig(clip=1.0, target_epsilon=4.0, rounds=2, sampling_rate=0.5, delta=1e-5, expected_clients=5)
    on_plan = dp_aggregate(ups, config=cfg, r_max=R_MAX, previous=previous, rounds_so_far=2)
    past = dp_aggregate(ups, config=cfg, r_max=R_MAX, previous=previous, rounds_so_far=3)
    assert on_plan.privacy["epsilon"] <= 4.0 < past.privacy["epsilon"]
    assert any("past the planned" in m for m in past.messages)
    assert json.loads(json.dumps(past.summary(), allow_nan=False))["privacy"]["rounds"] == 3


def test_capped_sparsity_weights_keep_the_sensitivity_and_match_numpy():
    ups, previous = mixed_round(12)
    norms = [
        math.sqrt(
            sum(np.linalg.norm(SCALE * np_(u.state_dict[bk(n)]) @ np_(u.state_dict[ak(n)])) ** 2 for n in SHAPES)
        )
        for u in ups
    ]
    cap, d = float(np.median(norms)), 4.0  # any constant works; the median makes half the clients reach it
    cfg = DPConfig(clip=1e9, noise_multiplier=0.0, delta=1e-5, expected_clients=d)
    res = dp_aggregate(
        ups, config=cfg, r_max=R_MAX, previous=previous, weights="sparsity", sparsity_cap=cap, scaling=SCALE
    )
    w = [min(1.0, s / cap) for s in norms]
    assert min(w) < 1.0 < max(norms) / cap  # some weights are capped, some are not
    for name in SHAPES:  # theta + sum_k w_k (theta_k - theta[:r_k]) / D on each client's components
        a, b = np_(previous[ak(name)]).copy(), np_(previous[bk(name)]).copy()
        for wk, u in zip(w, ups):
            r = u.state_dict[ak(name)].shape[0]
            a[:r] += wk * (np_(u.state_dict[ak(name)]) - np_(previous[ak(name)][:r])) / d
            b[:, :r] += wk * (np_(u.state_dict[bk(name)]) - np_(previous[bk(name)][:, :r])) / d
        np.testing.assert_allclose(np_(res.state_dict[ak(name)]), a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np_(res.state_dict[bk(name)]), b, rtol=1e-5, atol=1e-6)
    assert res.weights == {}  # data-dependent: never published
    # one client's influence is still at most C / D whatever its S_k
    clip = 0.5
    tight = DPConfig(clip=clip, noise_multiplier=0.0, delta=1e-5, expected_clients=d)
    kw = dict(config=tight, r_max=R_MAX, previous=previous, weights="sparsity", sparsity_cap=cap, scaling=SCALE)
    without = dp_aggregate(ups[1:], **kw).state_dict
    with_all = dp_aggregate(ups, **kw).state_dict
    moved = math.sqrt(sum(float(((with_all[k].double() - without[k].double()) ** 2).sum()) for k in without))
    assert moved <= clip / d * (1 + 1e-5)
    with pytest.raises(DPConfigError, match="sparsity_cap"):
        dp_aggregate(ups, config=tight, r_max=R_MAX, previous=previous, weights="sparsity")
