"""Initial rank policies and per-round client sampling (peft_hetlora.federated.policies.rank_policy)."""

from __future__ import annotations

import pytest

from peft_hetlora.federated.policies import (
    ADAM_STATE_COPIES,
    RankPolicy,
    adapter_params,
    budget_ranks,
    cap_ranks,
    default_tier_ranks,
    explicit_ranks,
    parse_bytes,
    rank_for_budget,
    sample_clients,
    tier_ranks,
    training_memory_bytes,
    uniform_ranks,
)

# Two modules: q (d_in 64 -> d_out 64) and v (d_in 64 -> d_out 32).
DIMS = {"layers.0.q_proj": (64, 64), "layers.0.v_proj": (64, 32)}
PER_RANK = (64 + 64) + (64 + 32)  # parameters per rank, straight from params(r) = r * sum_m (d_in + d_out)
CLIENTS = [f"client-{i:02d}" for i in range(40)]


def test_adapter_params_and_memory_follow_the_formulas():
    assert adapter_params(1, DIMS) == PER_RANK
    assert adapter_params(7, DIMS) == 7 * PER_RANK
    # Adam: weight + grad + two moments, 4 bytes each in fp32
    assert ADAM_STATE_COPIES == 4
    assert training_memory_bytes(3, DIMS) == 3 * PER_RANK * 4 * 4
    assert training_memory_bytes(3, DIMS, bytes_per_param=2) == 3 * PER_RANK * 2 * 4


@pytest.mark.parametrize("kind,bytes_per_rank", [("memory", PER_RANK * 16), ("params", PER_RANK * 4)])
def test_rank_for_budget_is_the_largest_rank_that_fits(kind, bytes_per_rank):
    for rank in range(2, 9):
        exact = rank * bytes_per_rank
        assert rank_for_budget(exact, DIMS, r_min=2, r_max=8, kind=kind) == rank
        assert rank_for_budget(exact + bytes_per_rank - 1, DIMS, r_min=2, r_max=8, kind=kind) == rank
        if rank > 2:
            assert rank_for_budget(exact - 1, DIMS, r_min=2, r_max=8, kind=kind) == rank - 1
    # a huge budget is capped at r_max
    assert rank_for_budget(10**15, DIMS, r_min=2, r_max=8, kind=kind) == 8


def test_budget_too_small_names_client_and_minimum():
    needed = 2 * PER_RANK * 16
    with pytest.raises(ValueError, match=r"'phone-3'.*at least 7,168 bytes") as err:
        rank_for_budget(needed - 1, DIMS, r_min=2, r_max=8, client_id="phone-3")
    assert needed == 7168
    assert "r_min=2" in str(err.value)


def test_budget_ranks_per_client_and_missing_budget():
    budgets = {"phone": 3 * PER_RANK * 16, "laptop": 10**12}
    assert budget_ranks(budgets, ["phone", "laptop"], DIMS, r_min=1, r_max=16) == {"phone": 3, "laptop": 16}
    with pytest.raises(ValueError, match="no budget for client"):
        budget_ranks(budgets, ["phone", "laptop", "watch"], DIMS, r_min=1, r_max=16)
    with pytest.raises(ValueError, match="module shapes"):
        rank_for_budget(100, {}, r_min=1, r_max=4)


def test_uniform_is_seeded_in_range_and_order_independent():
    a = uniform_ranks(CLIENTS, r_min=2, r_max=16, seed=3)
    b = uniform_ranks(list(reversed(CLIENTS)), r_min=2, r_max=16, seed=3)
    assert a == b
    assert all(2 <= r <= 16 for r in a.values())
    assert len(set(a.values())) > 5  # actually spread over the range
    assert uniform_ranks(CLIENTS, r_min=2, r_max=16, seed=4) != a
    # adding a client does not change the others
    more = uniform_ranks([*CLIENTS, "newcomer"], r_min=2, r_max=16, seed=3)
    assert {c: more[c] for c in CLIENTS} == a
    # both bounds are reachable
    many = uniform_ranks([f"c{i}" for i in range(400)], r_min=1, r_max=3, seed=0)
    assert set(many.values()) == {1, 2, 3}


def test_explicit_ranks_checks():
    assert explicit_ranks({"a": 2, "b": 16}, ["a", "b"], r_min=2, r_max=16) == {"a": 2, "b": 16}
    with pytest.raises(ValueError, match=r"'b': rank 17 is outside \[r_min=2, r_max=16\]"):
        explicit_ranks({"a": 2, "b": 17}, ["a", "b"], r_min=2, r_max=16)
    with pytest.raises(ValueError, match=r"'a': rank 1 is outside"):
        explicit_ranks({"a": 1, "b": 2}, ["a", "b"], r_min=2, r_max=16)
    with pytest.raises(ValueError, match=r"no rank for client\(s\) \['b'\]"):
        explicit_ranks({"a": 2}, ["a", "b"], r_min=2, r_max=16)
    with pytest.raises(ValueError, match="unknown client"):
        explicit_ranks({"a": 2, "b": 2, "z": 3}, ["a", "b"], r_min=2, r_max=16)
    with pytest.raises(TypeError, match="must be an integer"):
        explicit_ranks({"a": 2.5}, ["a"], r_min=2, r_max=16)


def test_tiers_counts_and_ranks():
    clients = [f"c{i}" for i in range(10)]
    ranks = tier_ranks(clients, r_min=2, r_max=16, ranks={"small": 2, "medium": 8, "large": 16}, seed=1)
    assert sorted(ranks.values()) == [2] * 5 + [8] * 3 + [16] * 2
    assert list(ranks) == clients
    assert tier_ranks(clients, r_min=2, r_max=16, seed=1) == tier_ranks(list(reversed(clients)), r_min=2, r_max=16,
                                                                         seed=1)
    # default tier ranks: geometric from r_min to r_max
    assert default_tier_ranks(["small", "medium", "large"], r_min=2, r_max=16) == {"small": 2, "medium": 6,
                                                                                  "large": 16}
    # largest remainder rounding: 7 clients at 1/3 each -> 3, 2, 2
    thirds = tier_ranks([f"c{i}" for i in range(7)], r_min=1, r_max=4, fractions={"x": 1, "y": 1, "z": 1},
                        ranks={"x": 1, "y": 2, "z": 4})
    assert sorted(thirds.values()) == [1, 1, 1, 2, 2, 4, 4]
    with pytest.raises(ValueError, match="outside"):
        tier_ranks(clients, r_min=2, r_max=16, ranks={"small": 1, "medium": 8, "large": 16})
    with pytest.raises(ValueError, match="No rank given for tier"):
        tier_ranks(clients, r_min=2, r_max=16, ranks={"small": 2})


def test_rank_policy_object():
    assert RankPolicy("constant", rank=4).assign(["a", "b"], r_min=1, r_max=8) == {"a": 4, "b": 4}
    assert RankPolicy("constant").assign(["a"], r_min=1, r_max=8) == {"a": 8}
    budget = RankPolicy("budget", budgets={"a": 10**12}, budget_kind="params")
    assert budget.assign(["a"], r_min=1, r_max=8, module_dims=DIMS) == {"a": 8}
    assert RankPolicy.coerce({"a": 3}).assign(["a"], r_min=1, r_max=8) == {"a": 3}
    assert RankPolicy.coerce("uniform").kind == "uniform"
    for policy in (budget, RankPolicy("tiers", tiers={"s": 0.5, "l": 0.5}, tier_ranks={"s": 1, "l": 8}),
                   RankPolicy("explicit", ranks={"a": 2})):
        assert RankPolicy.from_dict(policy.to_dict()) == policy
    with pytest.raises(ValueError, match="Unknown rank policy"):
        RankPolicy("random")
    with pytest.raises(ValueError, match="needs `budgets"):
        RankPolicy("budget")
    with pytest.raises(ValueError, match="outside"):
        RankPolicy("constant", rank=9).assign(["a"], r_min=1, r_max=8)


def test_sample_clients_seeded_without_replacement():
    first = sample_clients(CLIENTS, 7, seed=0, round_idx=0)
    assert first == sample_clients(list(reversed(CLIENTS)), 7, seed=0, round_idx=0)
    assert len(first) == len(set(first)) == 7 and set(first) <= set(CLIENTS)
    assert first == sorted(first)
    rounds = [tuple(sample_clients(CLIENTS, 7, seed=0, round_idx=t)) for t in range(10)]
    assert len(set(rounds)) > 1
    assert sample_clients(CLIENTS, 7, seed=1, round_idx=0) != first
    assert sample_clients(CLIENTS, 40, seed=0, round_idx=3) == sorted(CLIENTS)
    # every client gets picked eventually
    seen = {c for t in range(60) for c in sample_clients(CLIENTS, 7, seed=0, round_idx=t)}
    assert seen == set(CLIENTS)
    with pytest.raises(ValueError, match="exceeds the 40 clients"):
        sample_clients(CLIENTS, 41, seed=0, round_idx=0)
    with pytest.raises(ValueError, match="positive integer"):
        sample_clients(CLIENTS, 0, seed=0, round_idx=0)
    with pytest.raises(ValueError, match="unique"):
        sample_clients(["a", "a"], 1, seed=0, round_idx=0)


def test_parse_bytes():
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("1000") == 1000
    assert parse_bytes(" 1.5 kib ") == 1536
    with pytest.raises(ValueError, match="byte size"):
        parse_bytes("lots")


def test_cap_ranks_never_exceeds_a_reported_max_rank():
    ranks = {"phone": 8, "tablet": 3, "laptop": 16}
    assert cap_ranks(ranks, {"phone": 4, "tablet": 6}, r_min=2) == {"phone": 4, "tablet": 3, "laptop": 16}
    # every policy's ranks are capped the same way
    for policy in (RankPolicy("uniform"), RankPolicy("constant"), RankPolicy("tiers")):
        initial = policy.assign(["a", "b", "c", "d"], r_min=2, r_max=16, seed=3)
        capped = cap_ranks(initial, {"a": 2, "c": 5}, r_min=2)
        assert capped["a"] == 2 and capped["c"] == min(initial["c"], 5)
        assert capped["b"] == initial["b"] and capped["d"] == initial["d"]


# ------------------------------------------------------------------ measured-memory budgets (device_memory table)
def _hand_fit(peaks):
    """Least squares of peak = a + b r over the medians by hand (b clipped at 0), as numbers."""
    import numpy as np

    ranks = np.array(sorted(peaks), dtype=float)
    values = np.array([peaks[r] for r in sorted(peaks)], dtype=float)
    b, a = np.polyfit(ranks, values, 1)
    if b < 0:
        b, a = 0.0, values.mean()
    return a, b


def test_measured_memory_budget_uses_the_shipped_table_numbers():
    import pytest

    from peft_hetlora.federated.policies import RankPolicy
    from peft_hetlora.utils.errors import RankError

    # SmolLM2-135M float32 hetlora peaks (device_memory._SMOLLM2_135M), copied here as plain numbers
    f32 = {2: 1166559232, 8: 1162876928, 16: 1165776896}
    a, b = _hand_fit(f32)
    assert b == 0.0  # the rank does not move the peak measurably: every rank costs the mean
    need = round(a)
    policy = RankPolicy("budget", budgets={"big": need, "small": need - 1, "huge": 4 * 2**30},
                        memory_model="smollm2-135m", quantize="float32")
    with pytest.raises(RankError, match="'small'.*fits no rank"):
        policy.assign(["big", "small", "huge"], r_min=2, r_max=16)
    ok = RankPolicy("budget", budgets={"big": need, "huge": 4 * 2**30}, memory_model="smollm2-135m")
    assert ok.assign(["big", "huge"], r_min=2, r_max=16) == {"big": 16, "huge": 16}
    # 8-bit: the least-squares slope is positive (about 0.58 MB per rank), so the budget picks a rank in between
    q8 = {2: 912431104, 8: 904892416, 16: 919582720}
    a8, b8 = _hand_fit(q8)
    assert b8 > 0
    budget = round(a8 + b8 * 9)  # exactly the estimate at rank 9: ranks 2..9 fit, 10 does not
    eight = RankPolicy("budget", budgets={"mid": budget}, memory_model="smollm2-135m", quantize="8bit")
    assert eight.assign(["mid"], r_min=2, r_max=16) == {"mid": 9}
    assert RankPolicy.from_dict(eight.to_dict()) == eight


def test_measured_memory_table_from_a_file_and_misuse(tmp_path):
    import json

    import pytest

    from peft_hetlora.federated.policies import DeviceMemoryTable, RankPolicy

    table = DeviceMemoryTable()
    table.add("mine", "8bit", 2, 1000)
    table.add("mine", "8bit", 10, 1800)  # 800 + 100 r
    path = tmp_path / "mem.json"
    path.write_text(json.dumps(table.to_json()))
    policy = RankPolicy("budget", budgets={"a": 1450, "b": 5000}, memory_model="mine", quantize="8bit",
                        memory_table=str(path))
    assert policy.assign(["a", "b"], r_min=1, r_max=16) == {"a": 6, "b": 16}  # 800 + 100*6 = 1400 <= 1450 < 1500
    with pytest.raises(ValueError, match="budget_kind='memory'"):
        RankPolicy("budget", budgets={"a": 1}, budget_kind="params", memory_model="mine")
    with pytest.raises(ValueError, match="needs memory_model"):
        RankPolicy("budget", budgets={"a": 1}, memory_table=str(path))
