"""The aggregation registry, the influence bound of ``clip_norm`` and the weight cap, against tests/reference.py.

Every expected value is computed with numpy (dense products) or by hand, never by peft_hetlora itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference
import torch

from peft_hetlora.federated import (
    AGGREGATION_METHODS,
    AggregationMethod,
    ClientUpdate,
    StreamingAggregator,
    aggregate,
    aggregation_methods,
    get_aggregation,
    register_aggregation,
    truncate,
    unregister_aggregation,
)

R_MAX = 8
SCALE = 2.0
SHAPES = {"layers.0.q_proj": (6, 5), "layers.0.v_proj": (3, 5), "layers.1.down_proj": (5, 7)}
EXTRA = "score.modules_to_save.weight"


def state(rng, rank, scale_a=1.0, scale_b=1.0, extras=True):
    sd = {}
    for name, (d_out, d_in) in SHAPES.items():
        sd[f"{name}.lora_A.weight"] = torch.from_numpy(rng.standard_normal((rank, d_in)) * scale_a).float()
        sd[f"{name}.lora_B.weight"] = torch.from_numpy(rng.standard_normal((d_out, rank)) * scale_b).float()
    if extras:
        sd[EXTRA] = torch.from_numpy(rng.standard_normal((2, 4))).float()
    return sd


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------


class CoordinateMedian(AggregationMethod):
    """Coordinate-wise median of the padded factors (non-streaming: needs every client at once)."""

    weights = "data"
    streaming = False

    def combine(self, a_list, b_list, weights, previous):
        return torch.stack(a_list).median(dim=0).values, torch.stack(b_list).median(dim=0).values


@pytest.fixture
def median():
    method = register_aggregation("coord_median", CoordinateMedian)
    yield method
    unregister_aggregation("coord_median")


def test_builtins_are_registered_in_order():
    assert aggregation_methods()[:5] == ("hetlora", "zero_pad", "fedavg", "flexlora", "rankwise")
    assert get_aggregation("flexlora").weights == "data" and get_aggregation("hetlora").weights == "sparsity"


def test_registered_non_streaming_method_is_accepted_by_name(median):
    assert "coord_median" in AGGREGATION_METHODS and "coord_median" in tuple(AGGREGATION_METHODS)
    rng = np.random.default_rng(0)
    ranks = [2, 5, 3]
    updates = [ClientUpdate(f"c{i}", state(rng, r), r, 10 + i) for i, r in enumerate(ranks)]
    res = aggregate(updates, method="coord_median", r_max=R_MAX, scaling=SCALE)
    assert res.method == "coord_median"
    for name in SHAPES:
        padded = [reference.pad(*reference.np_modules(u.state_dict)[name], R_MAX) for u in updates]
        want_a = np.median(np.stack([p[0] for p in padded]), axis=0)  # odd count: the middle value, exactly
        want_b = np.median(np.stack([p[1] for p in padded]), axis=0)
        np.testing.assert_allclose(res.state_dict[f"{name}.lora_A.weight"].numpy(), want_a, rtol=0, atol=0)
        np.testing.assert_allclose(res.state_dict[f"{name}.lora_B.weight"].numpy(), want_b, rtol=0, atol=0)
    # dense extras: the data-weighted mean
    n = np.array([10, 11, 12.0])
    want = sum(w * reference.to_np(u.state_dict[EXTRA]) for w, u in zip(n / n.sum(), updates))
    np.testing.assert_allclose(res.state_dict[EXTRA].numpy(), want, rtol=1e-6)
    # streaming in another order gives the same median
    agg = StreamingAggregator("coord_median", R_MAX, SCALE)
    for u in updates:
        agg.observe(u)
    for u in reversed(updates):
        agg.add(u)
    for key, value in agg.result().state_dict.items():
        torch.testing.assert_close(value, res.state_dict[key])


def test_registry_errors_say_what_to_do(median):
    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        register_aggregation("coord_median", CoordinateMedian())
    assert register_aggregation("coord_median", CoordinateMedian(), overwrite=True).name == "coord_median"
    with pytest.raises(ValueError, match="built-in"):
        register_aggregation("hetlora", CoordinateMedian(), overwrite=True)
    with pytest.raises(ValueError, match="bad name"):
        register_aggregation("no spaces", CoordinateMedian())
    with pytest.raises(TypeError, match="AggregationMethod"):
        register_aggregation("x", object)
    with pytest.raises(ValueError, match="unknown aggregation method 'nope'.*register_aggregation"):
        get_aggregation("nope")
    with pytest.raises(ValueError, match="built-in"):
        unregister_aggregation("hetlora")


def test_unregistered_name_is_refused_again():
    register_aggregation("temp_median", CoordinateMedian)
    unregister_aggregation("temp_median")
    assert "temp_median" not in AGGREGATION_METHODS
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="unknown aggregation method"):
        aggregate([ClientUpdate("a", state(rng, 2), 2, 1)], method="temp_median", r_max=R_MAX)


# ---------------------------------------------------------------------------------------------------------------
# Influence bound (issue 10 item 6): unbalanced-factor attackers
# ---------------------------------------------------------------------------------------------------------------


def _federation(seed: int, attack: float, ranks=(2, 4, 8, 6), attacker_rank=R_MAX):
    """A previous global, honest clients near their truncation of it, one attacker scaling A by 1/attack, B by
    attack: its product ``B A`` equals an honest one (an old product-norm clip lets it through unchanged)."""
    rng = np.random.default_rng(seed)
    previous = state(rng, R_MAX, scale_a=0.3, scale_b=0.1)
    updates = []
    for i, r in enumerate(ranks):
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed * 10 + i))
              for k, v in truncate(previous, r).items()}
        updates.append(ClientUpdate(f"honest-{i}", sd, r, 100))
    honest_like = truncate(previous, attacker_rank)
    evil = {k: (v / attack if ".lora_A." in k else v * attack if ".lora_B." in k else v)
            for k, v in honest_like.items()}
    updates.append(ClientUpdate("attacker", evil, attacker_rank, 100))
    return previous, updates


def _scaled_norms(previous):
    mods = reference.np_modules(previous)
    a = math.sqrt(SCALE) * math.sqrt(sum(np.sum(a**2) for a, _ in mods.values()))
    b = math.sqrt(SCALE) * math.sqrt(sum(np.sum(b**2) for _, b in mods.values()))
    return a, b


def _published_delta_w(res):
    return reference.delta_w(reference.np_modules(res.state_dict), SCALE)


def _old_clip_global(updates, clip_norm, weights):
    """What the previous clip did: scale A and B by sqrt(c_k), c_k = min(1, C / ||s B A||), then zero-pad average."""
    mods_list = []
    for u in updates:
        mods = reference.np_modules(u.state_dict)
        c = min(1.0, clip_norm / reference.norm(mods, SCALE))
        mods_list.append({n: (a * math.sqrt(c), b * math.sqrt(c)) for n, (a, b) in mods.items()})
    out, _, _ = reference.weighted(updates, weights, R_MAX, mods_list)
    return reference.delta_w(out, SCALE)


@pytest.mark.parametrize("attack", [1e6, 1e15])
@pytest.mark.parametrize("method", ["hetlora", "zero_pad", "flexlora", "flexlora_held", "rankwise"])
def test_clip_norm_bounds_the_published_global_against_unbalanced_factors(method, attack):
    clip_norm = 5.0
    previous, updates = _federation(3, attack)
    res = aggregate(updates, method=method, r_max=R_MAX, scaling=SCALE, previous=previous, clip_norm=clip_norm)
    a, b = _scaled_norms(previous)
    c = math.sqrt(clip_norm)
    k = len(updates) if method == "rankwise" else 1  # rankwise: one weight per component (module docstring)
    bound = (a + math.sqrt(k) * c) * (b + math.sqrt(k) * c)
    published = reference.frob(_published_delta_w(res))
    assert published <= bound * (1 + 1e-5)
    assert res.clip_scales["attacker"] < 1e-5
    if method == "zero_pad":
        # the old product-norm clip leaves the attacker untouched: the same global blows far past the bound
        old = reference.frob(_old_clip_global(updates, clip_norm, [u.num_examples for u in updates]))
        assert old > 1e3 * bound


def test_clip_norm_bounds_one_clients_influence_at_fixed_weight():
    """zero_pad weights do not depend on the upload: replacing the attacker moves delta W by <= 2 p c (a + b + 2c)."""
    clip_norm = 0.5
    previous, updates = _federation(4, 1e6)
    a, b = _scaled_norms(previous)
    c = math.sqrt(clip_norm)
    with_attacker = aggregate(updates, method="zero_pad", r_max=R_MAX, scaling=SCALE, previous=previous,
                              clip_norm=clip_norm)
    for replacement in (truncate(previous, R_MAX), state(np.random.default_rng(9), R_MAX, 1e-9, 1e9)):
        swapped = updates[:-1] + [ClientUpdate("attacker", replacement, R_MAX, 100)]
        other = aggregate(swapped, method="zero_pad", r_max=R_MAX, scaling=SCALE, previous=previous,
                          clip_norm=clip_norm)
        p = with_attacker.weights["attacker"]
        assert p == pytest.approx(100 / 500) and other.weights["attacker"] == p
        w1, w2 = _published_delta_w(with_attacker), _published_delta_w(other)
        moved = reference.frob({n: w1[n] - w2[n] for n in w1})
        assert moved <= 2 * p * c * (a + b + 2 * c) * (1 + 1e-5)
        assert moved > 0


def test_clip_matches_reference_with_previous():
    previous, updates = _federation(5, 1e3)
    res = aggregate(updates, method="hetlora", r_max=R_MAX, scaling=SCALE, previous=previous, clip_norm=1.0)
    ref, extras, p = reference.hetlora(updates, R_MAX, SCALE, clip_norm=1.0, previous=previous)
    np.testing.assert_allclose([res.weights[u.client_id] for u in updates], p, rtol=1e-5)
    for name, (ra, rb) in ref.items():
        np.testing.assert_allclose(res.state_dict[f"{name}.lora_A.weight"].numpy(), ra, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.state_dict[f"{name}.lora_B.weight"].numpy(), rb, rtol=1e-5, atol=1e-6)
    # honest clients moved little from what they were sent: they are not clipped
    assert all(res.clip_scales[f"honest-{i}"] == 1.0 for i in range(4))


# ---------------------------------------------------------------------------------------------------------------
# Weight cap (issue 10 item 12)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["zero_pad", "fedavg"])
def test_weight_cap_limits_a_client_claiming_1e9_examples(method):
    rng = np.random.default_rng(6)
    ranks = [4, 4, 4, 4] if method == "fedavg" else [2, 4, 8, 3]
    sizes = [100, 120, 80, 10**9]
    updates = [ClientUpdate(f"c{i}", state(rng, r), r, n) for i, (r, n) in enumerate(zip(ranks, sizes))]
    res = aggregate(updates, method=method, r_max=R_MAX, scaling=SCALE)
    # by hand: median(80, 100, 120, 1e9) = 110, cap = 10 x 110 = 1100, total = 100 + 120 + 80 + 1100 = 1400
    expected = {"c0": 100 / 1400, "c1": 120 / 1400, "c2": 80 / 1400, "c3": 1100 / 1400}
    assert res.weights == pytest.approx(expected, rel=1e-12)
    assert res.capped == {"c3": 1100.0} and any("capped" in m for m in res.messages)
    ref, extras, _ = reference.weighted(updates, [100, 120, 80, 1100], R_MAX)
    for name, (ra, rb) in ref.items():
        np.testing.assert_allclose(res.state_dict[f"{name}.lora_A.weight"].numpy(), ra, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.state_dict[f"{name}.lora_B.weight"].numpy(), rb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.state_dict[EXTRA].numpy(), extras[EXTRA], rtol=1e-5, atol=1e-6)
    # streaming order does not matter, and the cap can be turned off (then the liar takes everything)
    agg = StreamingAggregator(method, R_MAX, SCALE)
    for u in updates:
        agg.observe(u)
    for u in (updates[3], updates[1], updates[0], updates[2]):
        agg.add(u)
    assert agg.result().weights == pytest.approx(expected, rel=1e-12)
    off = aggregate(updates, method=method, r_max=R_MAX, scaling=SCALE, max_weight_ratio=None)
    assert off.weights["c3"] > 0.999 and off.capped == {}


def test_weight_cap_applies_to_flexlora_sum():
    rng = np.random.default_rng(7)
    sizes = [50, 60, 10**9]
    updates = [ClientUpdate(f"c{i}", state(rng, r), r, n) for i, (r, n) in enumerate(zip([2, 3, 4], sizes))]
    res = aggregate(updates, method="flexlora", r_max=R_MAX, scaling=SCALE)
    assert res.weights["c2"] == pytest.approx(600 / 710)  # median 60, cap 600
    dense = reference.flexlora_dense(updates)  # caps at 10 x median too
    for name, w in dense.items():
        got = res.state_dict[f"{name}.lora_B.weight"].double().numpy() @ res.state_dict[
            f"{name}.lora_A.weight"].double().numpy()
        np.testing.assert_allclose(got, reference.best_rank_k(w, R_MAX), rtol=1e-4, atol=1e-5)


def test_weight_cap_leaves_ordinary_rounds_unchanged():
    rng = np.random.default_rng(8)
    updates = [ClientUpdate(f"c{i}", state(rng, 3), 3, n) for i, n in enumerate([5, 0, 20, 15])]
    capped = aggregate(updates, method="zero_pad", r_max=R_MAX)
    off = aggregate(updates, method="zero_pad", r_max=R_MAX, max_weight_ratio=None)
    for key, value in off.state_dict.items():
        torch.testing.assert_close(capped.state_dict[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_weight_ratio"):
        aggregate(updates, method="zero_pad", r_max=R_MAX, max_weight_ratio=0.5)


def test_aggregation_errors_share_the_project_base():
    from peft_hetlora.utils.errors import AggregationError, HetLoRAError

    rng = np.random.default_rng(10)
    with pytest.raises(HetLoRAError, match="no client updates"):
        aggregate([], r_max=R_MAX)
    with pytest.raises(AggregationError, match="declared rank 9 is outside \\[1, r_max=8\\]"):
        aggregate([ClientUpdate("x", state(rng, 2), R_MAX + 1, 1)], r_max=R_MAX)
    with pytest.raises(ValueError, match="unknown aggregation method"):  # still a ValueError for old callers
        StreamingAggregator("fedprox", R_MAX)


def test_live_names_work_where_names_are_checked(median):
    """`AGGREGATION_METHODS` is what the coordinator (`in`), argparse (`choices=`) and configs (`set(...)`) use."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=AGGREGATION_METHODS)
    assert parser.parse_args(["--method", "coord_median"]).method == "coord_median"
    with pytest.raises(SystemExit):
        parser.parse_args(["--method", "nope"])
    assert {"hetlora", "coord_median"} <= set(AGGREGATION_METHODS) and len(AGGREGATION_METHODS) >= 6
    assert AGGREGATION_METHODS[0] == "hetlora" and "coord_median" in repr(AGGREGATION_METHODS)
