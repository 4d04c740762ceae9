"""Client component selection policies: prefix, rolling (FedRolex windows), coverage (least-covered-first)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from peft_hetlora.federated.policies import SELECTION_POLICIES, select_components
from peft_hetlora.utils.errors import RankError


def coverage(selection, r_max):
    counts = np.zeros(r_max, dtype=int)
    for idx in selection.values():
        counts[list(idx)] += 1
    return counts


def random_ranks(rng, n, r_max):
    return {f"c{i}": int(rng.integers(1, r_max + 1)) for i in range(n)}


@pytest.mark.parametrize("policy", SELECTION_POLICIES)
def test_every_policy_gives_each_client_its_budget_of_unique_valid_indices(policy):
    rng = np.random.default_rng(0)
    for trial in range(30):
        r_max = int(rng.integers(1, 17))
        anchor = int(rng.integers(0, r_max + 1))
        ranks = random_ranks(rng, int(rng.integers(1, 9)), r_max + 3)  # some above r_max
        sel = select_components(policy, ranks, r_max=r_max, round_idx=trial, seed=7, anchor=anchor)
        assert list(sel) == list(ranks)
        for cid, idx in sel.items():
            k = min(ranks[cid], r_max)
            assert len(idx) == k and len(set(idx)) == k and list(idx) == sorted(idx)
            assert all(0 <= j < r_max for j in idx)
            assert set(range(min(anchor, k))) <= set(idx)  # the anchors come first


def test_prefix_is_hetlora_truncation():
    sel = select_components("prefix", {"a": 2, "b": 5, "c": 20}, r_max=8, round_idx=3, seed=1)
    assert sel == {"a": (0, 1), "b": (0, 1, 2, 3, 4), "c": tuple(range(8))}


def test_rolling_windows_tile_the_components_over_rounds():
    """Default step: a window of w moves by w per round, so r_max / w rounds visit every component exactly once."""
    r_max, w = 12, 3
    seen = []
    for t in range(r_max // w):
        seen += select_components("rolling", {"a": w}, r_max=r_max, round_idx=t, seed=0)["a"]
    assert sorted(seen) == list(range(r_max))
    # the offset wraps around: round 3 of a window of 5 over 8 components starts at 15 mod 8 = 7
    assert select_components("rolling", {"a": 5}, r_max=8, round_idx=3, seed=0)["a"] == (0, 1, 2, 3, 7)


def test_rolling_with_a_shared_step_is_fedrolex():
    """step=1: every client's window starts at round_idx mod (r_max - anchor), past the anchors."""
    ranks = {"a": 2, "b": 4}
    for t in range(10):
        sel = select_components("rolling", ranks, r_max=6, round_idx=t, seed=0, step=1, anchor=1)
        start = t % 5
        assert sel["a"] == tuple(sorted({0, 1 + start}))
        assert sel["b"] == tuple(sorted({0} | {1 + (start + i) % 5 for i in range(3)}))


def test_coverage_is_as_even_as_possible():
    """Max - min coverage over the non-anchor components is 0 when the windows divide evenly, else 1 (optimal), and
    every component is covered once the windows add up to the number of components."""
    rng = np.random.default_rng(1)
    for trial in range(200):
        r_max = int(rng.integers(1, 17))
        anchor = int(rng.integers(0, r_max))
        ranks = random_ranks(rng, int(rng.integers(1, 11)), r_max)
        sel = select_components("coverage", ranks, r_max=r_max, round_idx=trial, seed=trial, anchor=anchor)
        counts = coverage(sel, r_max)[anchor:]
        total = sum(max(0, k - anchor) for k in ranks.values())
        assert counts.sum() == total
        assert counts.max() - counts.min() == (0 if total % (r_max - anchor) == 0 else 1), (ranks, anchor, counts)
        if total >= r_max - anchor:
            assert counts.min() >= 1


def test_coverage_beats_prefix_and_matches_brute_force_on_small_cases():
    ranks = {"w0": 2, "w1": 2, "w2": 2, "s": 6}
    prefix = coverage(select_components("prefix", ranks, r_max=8, round_idx=0, seed=0), 8)
    cov = coverage(select_components("coverage", ranks, r_max=8, round_idx=0, seed=0), 8)
    assert prefix.min() == 0 and cov.min() == 1 and cov.max() == 2
    # brute force over every assignment of distinct components: none has a smaller spread (max - min coverage)
    for budgets, r_max in [((1, 2, 2), 4), ((2, 2, 2), 3), ((1, 1, 3), 5), ((3, 1), 4), ((2, 3, 1, 1), 5)]:
        best = min(
            int(np.ptp(coverage(dict(enumerate(combo)), r_max)))
            for combo in itertools.product(*[itertools.combinations(range(r_max), k) for k in budgets])
        )
        sel = select_components("coverage", {f"c{i}": k for i, k in enumerate(budgets)}, r_max=r_max, round_idx=0,
                                seed=0)
        assert int(np.ptp(coverage(sel, r_max))) == best


def test_coverage_is_deterministic_given_seed_and_round():
    ranks = {f"c{i}": k for i, k in enumerate([2, 2, 3, 5, 1])}
    a = select_components("coverage", ranks, r_max=16, round_idx=4, seed=11)
    assert a == select_components("coverage", dict(ranks), r_max=16, round_idx=4, seed=11)
    others = {
        str(select_components("coverage", ranks, r_max=16, round_idx=t, seed=s)) for t in range(3) for s in range(3)
    }
    assert len(others) > 1  # the tie order changes with (seed, round)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"policy": "random"}, "unknown component selection policy"),
        ({"client_ranks": {"a": 0}}, "ints >= 1"),
        ({"client_ranks": {"a": True}}, "ints >= 1"),
        ({"anchor": 9}, "anchor"),
        ({"round_idx": -1}, "round_idx"),
        ({"step": 0}, "step"),
        ({"r_max": 0}, "r_max"),
    ],
)
def test_bad_arguments_are_refused(kwargs, needle):
    args = {"policy": "rolling", "client_ranks": {"a": 2}, "r_max": 8, "round_idx": 0, "seed": 0, **kwargs}
    policy, ranks = args.pop("policy"), args.pop("client_ranks")
    with pytest.raises(RankError, match=needle):
        select_components(policy, ranks, **args)
