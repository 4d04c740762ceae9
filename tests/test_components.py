"""Component-indexed uploads (docs/design.md#component-rule): index checks, the general component rule and what every
method does
with a non-prefix index set, each against the independent numpy reference in tests/reference.py."""

from __future__ import annotations

import numpy as np
import pytest
import reference
import torch

from peft_hetlora.federated.adapter import check_components, coverage_counts, is_prefix
from peft_hetlora.federated.aggregation import ClientUpdate, StreamingAggregator, aggregate, clip_to_sent_factors
from peft_hetlora.federated.aggregation.methods import AggregationMethod, register_aggregation, unregister_aggregation
from peft_hetlora.utils.errors import AggregationError, HetLoRAError, RankError

R_MAX = 8
SCALE = 0.5
SHAPES = {"layers.0.q_proj": (6, 5), "layers.0.v_proj": (3, 5), "layers.1.down_proj": (5, 7)}
EXTRA = "score.modules_to_save.weight"
FIRST = "layers.0.q_proj"


def make_sd(rng, rank, module_rank=None, extras=True):
    """Random adapter at ``rank``; ``module_rank`` overrides the first module's rank (a module that self-pruned)."""
    sd = {}
    for name, (d_out, d_in) in SHAPES.items():
        r = module_rank if (module_rank is not None and name == FIRST) else rank
        sd[f"{name}.lora_A.weight"] = torch.from_numpy(rng.standard_normal((r, d_in))).float()
        sd[f"{name}.lora_B.weight"] = torch.from_numpy(rng.standard_normal((d_out, r))).float()
    if extras:
        sd[EXTRA] = torch.from_numpy(rng.standard_normal((2, 3))).float()
    return sd


# Mixed index sets. "gap": nobody trains component 4; a window that wraps (6, 7, 0); r_k = 1; a prefix; a module that
# pruned below its client's declared rank. "full": one client holds all r_max components.
SCENARIOS = {
    "gap": [(None, 2, None), ((6, 7, 0), 3, 2), ((3,), 1, None), ((5, 1), 2, None)],
    "full": [(tuple(range(R_MAX)), R_MAX, None), ((7, 0), 2, None), ((2,), 1, None), ((1, 2, 3), 3, 1)],
}


def make_updates(scenario, seed=0, sizes=None):
    rng = np.random.default_rng(seed)
    out = []
    for k, (comps, rank, module_rank) in enumerate(SCENARIOS[scenario]):
        n = (sizes or [10 * (k + 1) for k in range(len(SCENARIOS[scenario]))])[k]
        out.append(ClientUpdate(f"c{k}", make_sd(rng, rank, module_rank), rank, n, components=comps))
    return out


def make_previous(seed=99):
    return make_sd(np.random.default_rng(seed), R_MAX, extras=False)


def assert_factors(result, ref, atol=1e-5):
    for name, (a_ref, b_ref) in ref.items():
        np.testing.assert_allclose(result.state_dict[f"{name}.lora_A.weight"].double().numpy(), a_ref, atol=atol)
        np.testing.assert_allclose(result.state_dict[f"{name}.lora_B.weight"].double().numpy(), b_ref, atol=atol)


# -- check_components / ClientUpdate.components ---------------------------------------------------------------------


def test_check_components_accepts_any_order_and_returns_a_tuple():
    assert check_components([5, 0, 7], r_max=8, budget=3) == (5, 0, 7)
    assert check_components(np.array([1, 2]), r_max=4, budget=2) == (1, 2)


@pytest.mark.parametrize(
    ("indices", "budget", "needle"),
    [
        ([0, 0], 4, "more than once"),
        ([8], 4, "outside [0, 8)"),
        ([-1], 4, "negative"),
        ([0, 1, 2], 2, "budget is 2"),
        ([], 4, "empty"),
        ([1.0], 4, "ints only"),
        ([True], 4, "ints only"),
        ("01", 4, "list of ints"),
        ({0: 1}, 4, "list of ints"),
    ],
)
def test_check_components_refuses_bad_indices(indices, budget, needle):
    with pytest.raises(RankError, match=None) as err:
        check_components(indices, r_max=8, budget=budget)
    assert needle in str(err.value)
    assert isinstance(err.value, HetLoRAError)


def test_is_prefix_and_coverage_counts():
    assert is_prefix(None) and is_prefix((0, 1, 2)) and not is_prefix((0, 2)) and not is_prefix((1, 0))
    assert coverage_counts([(0, 1), (1, 3), range(2)], 4) == [2, 3, 0, 1]


def test_client_update_normalises_a_prefix_and_checks_the_length():
    sd = make_sd(np.random.default_rng(0), 2)
    assert ClientUpdate("a", sd, 2, 1, components=[0, 1]).components is None
    assert ClientUpdate("a", sd, 2, 1, components=[3, 1]).components == (3, 1)
    with pytest.raises(AggregationError, match="len\\(components\\) == rank"):
        ClientUpdate("a", sd, 3, 1, components=[3, 1])
    with pytest.raises(AggregationError, match="more than once"):
        ClientUpdate("a", sd, 2, 1, components=[1, 1])


def test_aggregator_refuses_indices_beyond_r_max():
    sd = make_sd(np.random.default_rng(0), 2)
    with pytest.raises(AggregationError, match="outside \\[0, 8\\)"):
        aggregate([ClientUpdate("a", sd, 2, 1, components=[3, 8])], method="component", r_max=R_MAX)


# -- the general rule -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("with_previous", [True, False])
@pytest.mark.parametrize(("method", "data"), [("component", False), ("component_data", True), ("rankwise", False)])
def test_component_rule_matches_the_reference(scenario, with_previous, method, data):
    updates = make_updates(scenario)
    previous = make_previous() if with_previous else None
    res = aggregate(updates, method=method, r_max=R_MAX, scaling=SCALE, previous=previous)
    ref = reference.component_rule(updates, R_MAX, SCALE, previous=previous, data_weights=data)
    assert_factors(res, ref)
    if scenario == "gap":  # component 4 is nobody's: previous value (zeros without one), in every module
        for name in SHAPES:
            expect = previous[f"{name}.lora_A.weight"][4] if with_previous else torch.zeros(SHAPES[name][1])
            assert torch.equal(res.state_dict[f"{name}.lora_A.weight"][4], expect)
        assert res.coverage == [2, 2, 0, 1, 0, 1, 1, 1]
        assert res.summary()["components"]["c1"] == [6, 7, 0]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("with_previous", [True, False])
def test_component_fedavg_matches_the_reference(scenario, with_previous):
    """Every client votes on every component: its own slot where it trained it, the previous value elsewhere."""
    updates = make_updates(scenario, sizes=[10, 25, 7, 40])
    previous = make_previous() if with_previous else None
    res = aggregate(updates, method="component_fedavg", r_max=R_MAX, scaling=SCALE, previous=previous)
    assert_factors(res, reference.component_fedavg(updates, R_MAX, SCALE, previous=previous))
    if with_previous and scenario == "gap":  # nobody trained component 4: it keeps its previous value exactly
        for name in SHAPES:
            np.testing.assert_allclose(res.state_dict[f"{name}.lora_A.weight"][4],
                                       previous[f"{name}.lora_A.weight"][4], rtol=1e-6)


def test_component_fedavg_caps_a_liar_at_its_indices():
    updates = make_updates("gap", sizes=[10, 1_000_000_000, 12, 9])
    res = aggregate(updates, method="component_fedavg", r_max=R_MAX, scaling=SCALE, previous=make_previous())
    assert "c1" in res.capped
    assert_factors(res, reference.component_fedavg(updates, R_MAX, SCALE, previous=make_previous()))


def test_component_fedavg_moves_a_component_by_the_rounds_mean_update():
    """Hand formula: one of two equal-weight clients trains component 0 to x; the other trained only component 1.
    FedAvg's step puts component 0 half-way from its previous value to x (the component rule puts it at x)."""
    rng = np.random.default_rng(5)
    prev = make_previous()
    one, two = make_sd(rng, 1, extras=False), make_sd(rng, 1, extras=False)
    updates = [ClientUpdate("a", one, 1, 10, components=(0,)), ClientUpdate("b", two, 1, 10, components=(1,))]
    res = aggregate(updates, method="component_fedavg", r_max=R_MAX, scaling=SCALE, previous=prev)
    key = f"{FIRST}.lora_A.weight"
    np.testing.assert_allclose(res.state_dict[key][0], (prev[key][0] + one[key][0]) / 2, rtol=1e-6)
    np.testing.assert_allclose(res.state_dict[key][1], (prev[key][1] + two[key][0]) / 2, rtol=1e-6)
    np.testing.assert_allclose(res.state_dict[key][2:], prev[key][2:], rtol=1e-6)
    plain = aggregate(updates, method="component", r_max=R_MAX, scaling=SCALE, previous=prev)
    np.testing.assert_allclose(plain.state_dict[key][0], one[key][0], rtol=1e-6)


def test_component_rule_per_module_weighting_matches_the_reference():
    updates = make_updates("gap", seed=2)
    prev = make_previous()
    res = aggregate(updates, method="component", r_max=R_MAX, scaling=SCALE, previous=prev, weighting="per_module")
    assert_factors(res, reference.component_rule(updates, R_MAX, SCALE, previous=prev, per_module=True))


def test_component_rule_weight_cap_keeps_the_indices_of_held_out_clients():
    """A liar with 1e9 examples is held out for the cap and added back later: at its indices, not as a prefix."""
    updates = make_updates("gap", sizes=[10, 1_000_000_000, 12, 9])
    res = aggregate(updates, method="component_data", r_max=R_MAX, scaling=SCALE, previous=make_previous())
    assert "c1" in res.capped
    ref = reference.component_rule(updates, R_MAX, SCALE, previous=make_previous(), data_weights=True)
    assert_factors(res, ref)


@pytest.mark.parametrize(("method", "data"), [("hetlora", False), ("zero_pad", True)])
def test_padding_methods_scatter_then_pad(method, data):
    updates = make_updates("gap")
    res = aggregate(updates, method=method, r_max=R_MAX, scaling=SCALE)
    assert_factors(res, reference.scatter_pad(updates, R_MAX, SCALE, data_weights=data))


@pytest.mark.parametrize("method", ["fedavg", "flexlora"])
def test_methods_without_a_placement_refuse_non_prefix_uploads(method):
    sd = make_sd(np.random.default_rng(0), 2)
    ups = [ClientUpdate("a", sd, 2, 5, components=(2, 3)), ClientUpdate("b", sd, 2, 5)]
    with pytest.raises(AggregationError, match="'component'"):
        aggregate(ups, method=method, r_max=R_MAX)


def test_prefix_uploads_are_bit_identical_with_and_without_explicit_indices():
    rng = np.random.default_rng(3)
    sds = [make_sd(rng, r) for r in (2, 5, 8)]
    prev = make_previous()
    for method in ("hetlora", "zero_pad", "rankwise", "component", "component_data", "flexlora", "flexlora_held"):
        plain = aggregate([ClientUpdate(f"c{i}", sd, sd[f"{FIRST}.lora_A.weight"].shape[0], 10 + i)
                           for i, sd in enumerate(sds)], method=method, r_max=R_MAX, scaling=SCALE, previous=prev)
        explicit = aggregate([ClientUpdate(f"c{i}", sd, r, 10 + i, components=list(range(r)))
                              for i, (sd, r) in enumerate(zip(sds, (2, 5, 8)))],
                             method=method, r_max=R_MAX, scaling=SCALE, previous=prev)
        for key, value in plain.state_dict.items():
            assert torch.equal(value, explicit.state_dict[key]), (method, key)
        assert "components" not in plain.summary()
    # rankwise is the prefix case of the component rule: the same numbers, bit for bit
    ups = [ClientUpdate(f"c{i}", sd, r, 10) for i, (sd, r) in enumerate(zip(sds, (2, 5, 8)))]
    a = aggregate(ups, method="rankwise", r_max=R_MAX, scaling=SCALE, previous=prev)
    b = aggregate(ups, method="component", r_max=R_MAX, scaling=SCALE, previous=prev)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_streaming_order_does_not_matter():
    updates = make_updates("gap")
    prev = make_previous()
    fwd = aggregate(updates, method="component", r_max=R_MAX, scaling=SCALE, previous=prev)
    rev = aggregate(updates[::-1], method="component", r_max=R_MAX, scaling=SCALE, previous=prev)
    for key, value in fwd.state_dict.items():
        torch.testing.assert_close(value, rev.state_dict[key], atol=1e-6, rtol=1e-6)


def test_zero_norm_clients_fall_back_per_component():
    """Sparsity weights are 0 for an all-zero B; the components only such clients cover use data weights there."""
    rng = np.random.default_rng(5)
    zero = make_sd(rng, 2)
    for name in SHAPES:
        zero[f"{name}.lora_B.weight"].zero_()
    live = make_sd(rng, 2)
    ups = [ClientUpdate("z", zero, 2, 4, components=(6, 7)), ClientUpdate("l", live, 2, 4, components=(0, 7))]
    res = aggregate(ups, method="component", r_max=R_MAX, scaling=SCALE)
    a = res.state_dict[f"{FIRST}.lora_A.weight"]
    torch.testing.assert_close(a[6], zero[f"{FIRST}.lora_A.weight"][0])  # only "z" trained 6 (data weight)
    torch.testing.assert_close(a[7], live[f"{FIRST}.lora_A.weight"][1])  # sparsity level wins: "z" has weight 0
    assert FIRST in res.fallback_modules


# -- the influence clip uses the components the client was sent ------------------------------------------------------


def test_clip_is_around_the_sent_components():
    prev = make_previous()
    comps = (5, 2)
    sent = {}
    for name in SHAPES:
        sent[f"{name}.lora_A.weight"] = prev[f"{name}.lora_A.weight"][list(comps)].clone()
        sent[f"{name}.lora_B.weight"] = prev[f"{name}.lora_B.weight"][:, list(comps)].clone()
    modules = {name: (f"{name}.lora_A.weight", f"{name}.lora_B.weight") for name in SHAPES}
    # a client that uploads exactly what it was sent moved nothing: no clip, however small C
    _, scale = clip_to_sent_factors(modules, sent, prev, 1e-9, SCALE, components=comps)
    assert scale == 1.0
    _, prefix_scale = clip_to_sent_factors(modules, sent, prev, 1e-9, SCALE)
    assert prefix_scale < 1.0  # around the prefix it would have been clipped: the indices matter


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_clipped_component_rule_matches_the_reference(scenario):
    updates = make_updates(scenario, seed=4)
    prev = make_previous()
    res = aggregate(updates, method="component", r_max=R_MAX, scaling=SCALE, previous=prev, clip_norm=0.3)
    assert min(res.clip_scales.values()) < 1.0
    ref = reference.component_rule(updates, R_MAX, SCALE, previous=prev, clip_norm=0.3)
    assert_factors(res, ref)


# -- user methods -----------------------------------------------------------------------------------------------------


class _ScatteredMean(AggregationMethod):
    weights, streaming, accepts_components = "data", False, True

    def combine(self, a_list, b_list, weights, previous):
        w = torch.tensor(weights) / sum(weights)
        return sum(wk * a for wk, a in zip(w, a_list)), sum(wk * b for wk, b in zip(w, b_list))


class _Legacy(AggregationMethod):
    weights, streaming = "data", False

    def combine(self, a_list, b_list, weights, previous):
        return a_list[0], b_list[0]


def test_user_methods_opt_in_to_indexed_uploads():
    register_aggregation("scattered_mean", _ScatteredMean)
    register_aggregation("legacy_first", _Legacy)
    try:
        updates = make_updates("gap")
        res = aggregate(updates, method="scattered_mean", r_max=R_MAX, scaling=SCALE)
        assert_factors(res, reference.scatter_pad(updates, R_MAX, SCALE, data_weights=True))
        with pytest.raises(AggregationError, match="cannot place"):
            aggregate(updates, method="legacy_first", r_max=R_MAX)
    finally:
        unregister_aggregation("scattered_mean")
        unregister_aggregation("legacy_first")


def test_a_rejected_indexed_update_leaves_the_aggregator_unchanged():
    agg = StreamingAggregator("flexlora", r_max=R_MAX)
    sd = make_sd(np.random.default_rng(0), 2)
    with pytest.raises(AggregationError):
        agg.add(ClientUpdate("a", sd, 2, 3, components=(4, 5)))
    assert agg.num_clients == 0


def test_gather_components_is_the_sent_window_and_truncate_is_its_prefix_case():
    from peft_hetlora.federated.adapter import gather_components, truncate

    prev = make_sd(np.random.default_rng(7), R_MAX)
    got = gather_components(prev, (6, 7, 0))
    for name in SHAPES:
        a, b = prev[f"{name}.lora_A.weight"].numpy(), prev[f"{name}.lora_B.weight"].numpy()
        np.testing.assert_array_equal(got[f"{name}.lora_A.weight"].numpy(), a[[6, 7, 0]])
        np.testing.assert_array_equal(got[f"{name}.lora_B.weight"].numpy(), b[:, [6, 7, 0]])
    assert torch.equal(got[EXTRA], prev[EXTRA])
    prefix = gather_components(prev, range(3))
    assert all(torch.equal(prefix[k], v) for k, v in truncate(prev, 3).items())
    with pytest.raises(AggregationError, match="do not exist"):
        gather_components(prev, [R_MAX])
    with pytest.raises(AggregationError, match="more than once"):
        gather_components(prev, [1, 1])


def test_check_components_keeps_a_client_to_its_assignment():
    assert check_components([6, 1], r_max=8, budget=3, allowed=[1, 6, 7]) == (6, 1)
    with pytest.raises(RankError, match="not assigned"):
        check_components([6, 2], r_max=8, budget=3, allowed=[1, 6, 7])


# -- flexlora_held: FlexLoRA over the adapters the clients held ------------------------------------------------------


def assert_best_rank(result, dense_by_module, r_max=R_MAX):
    """The global's product is the best rank-r_max approximation of the reference's dense sum (products, since
    singular vectors are defined up to sign)."""
    for name, dense in dense_by_module.items():
        a = result.state_dict[f"{name}.lora_A.weight"].double().numpy()
        b = result.state_dict[f"{name}.lora_B.weight"].double().numpy()
        best = reference.best_rank_k(dense, r_max)
        assert np.linalg.norm(b @ a - best) <= 1e-5 * max(np.linalg.norm(best), 1e-12), name


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("with_previous", [False, True])
def test_flexlora_held_matches_the_reference(scenario, with_previous):
    updates = make_updates(scenario, sizes=[10, 25, 7, 40])
    previous = make_previous() if with_previous else None
    res = aggregate(updates, method="flexlora_held", r_max=R_MAX, scaling=SCALE, previous=previous)
    assert_best_rank(res, reference.flexlora_held_dense(updates, R_MAX, previous))


def test_flexlora_held_is_flexlora_without_a_previous_global():
    rng = np.random.default_rng(4)
    ups = [ClientUpdate(f"c{i}", make_sd(rng, r), r, 10 + 5 * i) for i, r in enumerate((2, 5, 8))]
    assert_best_rank(aggregate(ups, method="flexlora_held", r_max=R_MAX, scaling=SCALE), reference.flexlora_dense(ups))


def test_flexlora_held_caps_a_liar_and_keeps_its_indices():
    updates = make_updates("gap", sizes=[10, 1_000_000_000, 12, 9])
    res = aggregate(updates, method="flexlora_held", r_max=R_MAX, scaling=SCALE, previous=make_previous())
    assert "c1" in res.capped
    assert_best_rank(res, reference.flexlora_held_dense(updates, R_MAX, make_previous()))


def test_flexlora_held_keeps_what_plain_flexlora_erases():
    """Hand formula: the previous global is e1 e1^T + 2 e2 e2^T (components 0 and 1). Two equal clients: one
    uploads rank 1 (component 0 moved to 3 e1 e1^T), the other rank 2 and left the previous global as it was.
    FlexLoRA averages their products: component 1 (2 e2 e2^T) comes back at half its value; held, the rank-1 client
    held it frozen, so it stays whole and only component 0 moves half-way: (1 + 3) / 2 = 2."""

    def adapter(rank, scales):
        out = {}
        for name, (d_out, d_in) in SHAPES.items():
            a, b = torch.zeros(rank, d_in), torch.zeros(d_out, rank)
            for j, scale in enumerate(scales):
                a[j, j], b[j, j] = 1.0, scale
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = a, b
        return out

    prev = adapter(R_MAX, [1.0, 2.0])
    ups = [ClientUpdate("weak", adapter(1, [3.0]), 1, 10), ClientUpdate("strong", adapter(2, [1.0, 2.0]), 2, 10)]
    for method, expected in (("flexlora_held", [2.0, 2.0]), ("flexlora", [2.0, 1.0])):
        res = aggregate(ups, method=method, r_max=R_MAX, scaling=SCALE, previous=prev)
        for name, (d_out, d_in) in SHAPES.items():
            w = res.state_dict[f"{name}.lora_B.weight"].numpy() @ res.state_dict[f"{name}.lora_A.weight"].numpy()
            want = np.zeros((d_out, d_in))
            want[0, 0], want[1, 1] = expected
            np.testing.assert_allclose(w, want, atol=1e-6, err_msg=f"{method} {name}")
