"""Client sampling (issue 24): ``client_sampling="uniform"`` (today's draw, bit for bit) and ``"rank"`` (successive
sampling in proportion to rank), checked against an independent reference, and wired through the settings record,
``plan_round``, the coordinator (persisted, resumed) and the CLI.

The rank sampler's inclusion frequencies are compared with an exact enumeration of ordered draws written here, never
with the code's own output.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_hetlora.federated import Coordinator, FederationSettings, LocalStore
from peft_hetlora.federated.aggregation.privacy import DPConfig
from peft_hetlora.federated.policies import (
    CLIENT_SAMPLING,
    DEFAULT_CLIENT_SAMPLING,
    check_client_sampling,
    check_rank_sampling_rounds,
    choose_participants,
    rank_sample_clients,
    sample_clients,
    sampling_for_round,
)
from peft_hetlora.federated.round import plan_round
from peft_hetlora.utils.errors import FederationMismatch
from tests.coordinator_fakes import (  # noqa: F401  (the two fixtures register by import)
    CLIENTS,
    Clock,
    FakeClients,
    init_dir_fixture,
    initial_adapter,
    local_store_fixture,
    make_coordinator,
    round_info,
)

IDS = st.lists(st.text("abcdefxyz0123", min_size=1, max_size=4), min_size=1, max_size=12, unique=True)


# ------------------------------------------------------------------------------------------------ references
def todays_uniform_draw(client_ids, clients_per_round, seed, round_idx):
    """The draw `sample_clients` made before client sampling had a policy (written out independently)."""
    pool = sorted(client_ids)
    key = int.from_bytes(hashlib.sha256(f"{seed}:sample".encode()).digest()[:8], "little")
    chosen = np.random.default_rng([key, int(round_idx)]).choice(len(pool), size=clients_per_round, replace=False)
    return sorted(pool[i] for i in chosen)


def successive_inclusion(ranks: list[int], m: int) -> list[float]:
    """Exact inclusion probabilities of successive sampling of m of len(ranks) items in proportion to rank: the
    sum over every ordered draw (i_1, ..., i_m) of prod_t r_{i_t} / (total - r_{i_1} - ... - r_{i_{t-1}})."""
    total = float(sum(ranks))
    pi = [0.0] * len(ranks)
    for order in itertools.permutations(range(len(ranks)), m):
        p, left = 1.0, total
        for i in order:
            p *= ranks[i] / left
            left -= ranks[i]
        for i in order:
            pi[i] += p
    return pi


def frequencies(ids, ranks, m, rounds, seed=0):
    counts = dict.fromkeys(ids, 0)
    for t in range(rounds):
        for cid in rank_sample_clients(ids, ranks, m, seed=seed, round_idx=t):
            counts[cid] += 1
    return [counts[cid] / rounds for cid in ids]


# ------------------------------------------------------------------------------------------------ uniform
@settings(max_examples=200, deadline=None)
@given(ids=IDS, data=st.data(), seed=st.integers(0, 2**31), round_idx=st.integers(0, 10_000))
def test_uniform_is_todays_draw_bit_for_bit(ids, data, seed, round_idx):
    m = data.draw(st.integers(1, len(ids)))
    expected = todays_uniform_draw(ids, m, seed, round_idx)
    assert sample_clients(ids, m, seed=seed, round_idx=round_idx) == expected
    assert choose_participants("uniform", ids, m, seed=seed, round_idx=round_idx) == expected
    ranks = {cid: 1 + i for i, cid in enumerate(ids)}  # ranks do not enter a uniform draw
    assert choose_participants("uniform", ids, m, ranks=ranks, seed=seed, round_idx=round_idx) == expected
    plan = plan_round(round_idx, ids, ranks, clients_per_round=m, seed=seed)  # the default policy
    assert plan.participants == expected and plan.client_sampling == DEFAULT_CLIENT_SAMPLING == "uniform"


# ------------------------------------------------------------------------------------------------ rank: the math
def test_one_per_round_is_drawn_in_proportion_to_rank():
    ids, r = ["a", "b", "c", "d", "e"], [2, 2, 6, 16, 3]
    rounds = 20_000
    got = frequencies(ids, dict(zip(ids, r)), 1, rounds)
    for f, rk in zip(got, r):
        p = rk / sum(r)
        assert abs(f - p) <= 5 * math.sqrt(p * (1 - p) / rounds), (got, p)


@pytest.mark.parametrize(("ranks", "m"), [([2, 2, 6, 16, 3], 2), ([2, 2, 6, 16, 3], 3), ([1, 1, 1, 8, 30], 2),
                                          ([5, 5, 5, 5, 5], 2)])
def test_inclusion_frequencies_match_the_enumeration_of_ordered_draws(ranks, m):
    ids = ["p", "q", "r", "s", "t"]
    expected = successive_inclusion(ranks, m)
    assert sum(expected) == pytest.approx(m)  # each draw includes exactly m clients
    rounds = 12_000
    got = frequencies(ids, dict(zip(ids, ranks)), m, rounds, seed=3)
    for f, p in zip(got, expected):
        assert abs(f - p) <= 5 * math.sqrt(p * (1 - p) / rounds) + 1e-12, (got, expected)
    if len(set(ranks)) > 1:  # the test can tell rank sampling from uniform sampling (m / n each)
        sigma = max(math.sqrt(p * (1 - p) / rounds) for p in expected)
        assert max(abs(p - m / len(ids)) for p in expected) > 10 * sigma


def test_tiers_mix_puts_about_two_capable_clients_in_a_round():
    """Issue 24's mix: 10 clients at rank 2, 6 at 6, 4 at 16, 4 a round. Uniform sampling averages 4 * 4 / 20 = 0.8
    rank-16 clients a round; rank sampling the sum of their exact inclusion probabilities (1.95)."""
    ids = [f"c{i:02d}" for i in range(20)]
    r = [2] * 10 + [6] * 6 + [16] * 4
    ranks = dict(zip(ids, r))
    exact = sum(successive_inclusion(r, 4)[16:])
    assert 1.9 < exact < 2.0
    rounds = 4000
    per_round = [sum(ranks[c] == 16 for c in rank_sample_clients(ids, ranks, 4, seed=1, round_idx=t))
                 for t in range(rounds)]
    assert abs(np.mean(per_round) - exact) <= 5 * np.std(per_round) / math.sqrt(rounds)
    uniform = [sum(ranks[c] == 16 for c in sample_clients(ids, 4, seed=1, round_idx=t)) for t in range(rounds)]
    assert abs(np.mean(uniform) - 0.8) <= 5 * np.std(uniform) / math.sqrt(rounds)


# ------------------------------------------------------------------------------------------------ rank: determinism
@settings(max_examples=100, deadline=None)
@given(ids=IDS, data=st.data(), seed=st.integers(0, 2**31), round_idx=st.integers(0, 10_000))
def test_same_seed_round_and_set_give_the_same_draw_whatever_the_order(ids, data, seed, round_idx):
    m = data.draw(st.integers(1, len(ids)))
    ranks = {cid: data.draw(st.integers(1, 64)) for cid in ids}
    first = rank_sample_clients(ids, ranks, m, seed=seed, round_idx=round_idx)
    shuffled = data.draw(st.permutations(ids))
    reordered = {cid: ranks[cid] for cid in reversed(shuffled)}
    assert rank_sample_clients(shuffled, reordered, m, seed=seed, round_idx=round_idx) == first
    assert first == sorted(first) and len(set(first)) == m and set(first) <= set(ids)
    # extra ranks of clients outside the pool change nothing
    assert rank_sample_clients(ids, {**ranks, "zz-outsider": 99}, m, seed=seed, round_idx=round_idx) == first


def test_different_rounds_and_seeds_draw_differently():
    ids = [f"c{i}" for i in range(10)]
    ranks = {cid: 2 + i for i, cid in enumerate(ids)}
    draws = {tuple(rank_sample_clients(ids, ranks, 3, seed=0, round_idx=t)) for t in range(30)}
    assert len(draws) > 10
    assert any(rank_sample_clients(ids, ranks, 3, seed=s, round_idx=0) != rank_sample_clients(
        ids, ranks, 3, seed=0, round_idx=0) for s in range(1, 6))


# ------------------------------------------------------------------------------------------------ hostile input
JUNK_RANKS = st.one_of(st.integers(-5, 0), st.booleans(), st.floats(allow_nan=True), st.none(), st.text(max_size=3),
                       st.lists(st.integers(), max_size=2))


@settings(max_examples=150, deadline=None)
@given(ids=IDS, junk=JUNK_RANKS, data=st.data())
def test_bad_ranks_are_refused_with_a_clear_error(ids, junk, data):
    ranks = {cid: 4 for cid in ids}
    victim = data.draw(st.sampled_from(ids))
    ranks[victim] = junk
    with pytest.raises(ValueError, match="positive integers") as err:
        choose_participants("rank", ids, 1, ranks=ranks, seed=0, round_idx=0)
    assert repr(victim) in str(err.value)


@settings(max_examples=50, deadline=None)
@given(ids=IDS, data=st.data())
def test_missing_ranks_and_bad_sizes_are_refused(ids, data):
    gone = data.draw(st.sampled_from(ids))
    ranks = {cid: 3 for cid in ids if cid != gone}
    with pytest.raises(ValueError, match="no rank for client"):
        rank_sample_clients(ids, ranks, 1, seed=0, round_idx=0)
    full = {cid: 3 for cid in ids}
    for bad in (0, -1, True, 1.0, len(ids) + 1):
        with pytest.raises(ValueError, match="clients_per_round"):
            rank_sample_clients(ids, full, bad, seed=0, round_idx=0)
    with pytest.raises(ValueError, match="needs every client's current rank"):
        choose_participants("rank", ids, 1, ranks=None, seed=0, round_idx=0)


def test_duplicate_ids_unknown_policies_and_dp_are_refused():
    with pytest.raises(ValueError, match="unique"):
        rank_sample_clients(["a", "a"], {"a": 2}, 1, seed=0, round_idx=0)
    for bad in ("ranked", "", None, 1, "Rank"):
        with pytest.raises(ValueError, match="client_sampling must be one of"):
            check_client_sampling(bad)
    assert CLIENT_SAMPLING == ("uniform", "rank")
    with pytest.raises(ValueError, match="Poisson"):
        plan_round(0, ["a", "b"], {"a": 2, "b": 4}, clients_per_round=1, seed=0, sampling_rate=0.5,
                   client_sampling="rank")
    # a DP federation keeps its uniform Poisson sampling
    assert plan_round(0, ["a", "b"], {"a": 2, "b": 4}, clients_per_round=1, seed=0, sampling_rate=1.0).participants \
        == ["a", "b"]


# ------------------------------------------------------------------------------------------------ the record
DP = DPConfig(clip=0.5, noise_multiplier=1.0, delta=1e-5, sampling_rate=0.5, expected_clients=2)


def test_the_settings_record_takes_checks_and_round_trips_client_sampling():
    record = FederationSettings(method="flexlora_held", clients=("a", "b"), client_sampling="rank")
    assert record.to_json()["client_sampling"] == "rank"
    assert FederationSettings.from_json(record.to_json()) == record
    assert "client_sampling" not in FederationSettings(rounds=2).to_json()  # not given: not recorded
    with pytest.raises(ValueError, match="client_sampling must be one of"):
        FederationSettings(client_sampling="capable")
    with pytest.raises(ValueError, match="accountant assumes uniform Poisson"):
        FederationSettings(method="rankwise", dp=DP, client_sampling="rank")
    assert FederationSettings(method="rankwise", dp=DP, client_sampling="uniform").client_sampling == "uniform"


# ------------------------------------------------------------------------------------------------ coordinator
def _participants(store: LocalStore, rounds: int) -> list[list[str]]:
    return [round_info(store, t)["participants"] for t in range(rounds)]


def _expected_participants(store: LocalStore, rounds: int, per_round: int, seed: int) -> list[list[str]]:
    """Each round's draw from the ranks the round was planned with (initial ranks, then the previous summary's)."""
    fed = store.read_federation()
    ranks = dict(fed["initial_ranks"])
    out = []
    for t in range(rounds):
        if t > 0:
            ranks.update(store.read_summary(t - 1)["client_ranks"])
        out.append(rank_sample_clients(CLIENTS, ranks, per_round, seed=seed, round_idx=t))
    return out


def test_coordinator_persists_rank_sampling_and_a_resumed_one_draws_the_same(tmp_path):
    init = initial_adapter(tmp_path / "init", r_max=4)
    options = dict(method="flexlora_held", clients_per_round=2, rounds=4, client_sampling="rank")

    ref_store = LocalStore(tmp_path / "ref", create=True)
    ref = make_coordinator(ref_store, FakeClients(ref_store, tmp_path / "ref-work", prune={"d"}), **options)
    ref.init(init)
    ref.run()
    fed = ref_store.read_federation()
    assert fed["client_sampling"] == "rank" and ref.client_sampling == "rank"
    drawn = _participants(ref_store, 4)
    assert drawn == _expected_participants(ref_store, 4, 2, seed=7)
    assert all(round_info(ref_store, t)["client_sampling"] == "rank" for t in range(4))
    assert all(ref_store.read_summary(t)["client_sampling"] == "rank" for t in range(4))

    # stop after round 1, resume with a new coordinator that is told nothing but the store
    store = LocalStore(tmp_path / "fed", create=True)
    fake = FakeClients(store, tmp_path / "work", prune={"d"})
    first = make_coordinator(store, fake, **{**options, "rounds": 4})
    first.init(init)
    assert first.step() == "closed round 0" and first.step() == "closed round 1"
    resumed = Coordinator(store, clock=Clock(), sleep=fake.sleep, poll_interval_s=1.0, progress=False)
    assert resumed.client_sampling == "rank"
    resumed.run()
    assert _participants(store, 4) == drawn
    with pytest.raises(FederationMismatch, match="client_sampling"):
        Coordinator(store, client_sampling="uniform", progress=False).federation  # noqa: B018


def test_a_uniform_federation_records_uniform_and_publishes_what_it_did_before(store, init_dir):
    coord = make_coordinator(store, None)
    coord.init(init_dir)
    assert store.read_federation()["client_sampling"] == "uniform"
    info = round_info(store, 0)
    assert "client_sampling" not in info  # round.json of a uniform round is unchanged
    assert info["participants"] == todays_uniform_draw(CLIENTS, 3, 7, 0)


def test_a_dp_coordinator_refuses_rank_sampling(tmp_path):
    with pytest.raises(ValueError, match="client_sampling='uniform'"):
        Coordinator(LocalStore(tmp_path / "fed", create=True), method="rankwise", dp=DP, client_sampling="rank",
                    clients=["a", "b"], progress=False)


def test_cli_takes_client_sampling(tmp_path, init_dir):
    from peft_hetlora.commands.coordinate import main

    fed = tmp_path / "fed"
    args = ["--store", str(fed), "--init-adapter", str(init_dir), "--rounds", "2", "--clients", "a,b,c,d",
            "--clients-per-round", "2", "--r-min", "1", "--rank-policy", "explicit", "--ranks", "a=1,b=1,c=1,d=4",
            "--client-sampling", "rank", "--no-progress", "--log-level", "WARNING"]
    assert main(args) == 0
    record = json.loads((Path(fed) / "federation.json").read_text())
    assert record["client_sampling"] == "rank"
    assert round_info(LocalStore(fed), 0)["participants"] == rank_sample_clients(
        ["a", "b", "c", "d"], {"a": 1, "b": 1, "c": 1, "d": 4}, 2, seed=0, round_idx=0)
    with pytest.raises(SystemExit):
        main(["--store", str(fed), "--client-sampling", "capable"])


# ------------------------------------------------------------------------------------------------ rank, then uniform
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 50), st.integers(0, 200))
def test_rank_sampling_rounds_draws_the_first_n_rounds_by_rank_and_the_rest_uniformly(n, round_idx):
    expected = "rank" if round_idx < n else "uniform"  # rounds 0 .. n-1 by rank (docs/methods.md#client-sampling)
    assert sampling_for_round("rank", round_idx, n) == expected
    assert sampling_for_round("rank", round_idx, None) == "rank"
    assert sampling_for_round("uniform", round_idx, None) == "uniform"


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.integers(max_value=0), st.booleans(), st.floats(allow_nan=True), st.text(max_size=3),
                 st.lists(st.integers(1, 3), max_size=2)))
def test_junk_rank_sampling_rounds_is_refused_with_what_to_do(junk):
    with pytest.raises(ValueError, match="positive integer"):
        check_rank_sampling_rounds(junk, "rank")
    with pytest.raises(ValueError, match="positive integer"):
        FederationSettings(client_sampling="rank", rank_sampling_rounds=junk)


def test_rank_sampling_rounds_needs_rank_sampling():
    with pytest.raises(ValueError, match="set client_sampling='rank'"):
        check_rank_sampling_rounds(3, "uniform")
    with pytest.raises(ValueError, match="set client_sampling='rank'"):
        FederationSettings(client_sampling="uniform", rank_sampling_rounds=3)
    with pytest.raises(ValueError, match="set client_sampling='rank'"):
        plan_round(0, ["a", "b"], {"a": 1, "b": 2}, clients_per_round=1, seed=0, rank_sampling_rounds=3)
    with pytest.raises(ValueError, match="accountant assumes uniform Poisson"):
        FederationSettings(method="rankwise", dp=DP, client_sampling="rank", rank_sampling_rounds=3)
    record = FederationSettings(method="flexlora_held", clients=("a", "b"), client_sampling="rank",
                                rank_sampling_rounds=4)
    assert record.to_json()["rank_sampling_rounds"] == 4
    assert FederationSettings.from_json(record.to_json()) == record


def test_plan_round_switches_from_the_rank_draw_to_todays_uniform_draw_at_round_n():
    ids = [f"c{i}" for i in range(12)]
    ranks = {cid: (16 if i < 3 else 2) for i, cid in enumerate(ids)}
    for t in range(8):
        plan = plan_round(t, ids, ranks, clients_per_round=4, seed=5, client_sampling="rank", rank_sampling_rounds=3)
        if t < 3:
            assert plan.participants == rank_sample_clients(ids, ranks, 4, seed=5, round_idx=t)
            assert plan.client_sampling == "rank"
        else:
            assert plan.participants == todays_uniform_draw(ids, 4, 5, t)
            assert plan.client_sampling == "uniform"
        info = plan.to_json(_round_settings())
        assert info.get("client_sampling", "uniform") == plan.client_sampling  # round.json names who drew it


def _round_settings():
    from peft_hetlora.federated.round import RoundSettings

    return RoundSettings(method="flexlora_held", r_max=16, r_min=2, scaling=2.0)


def test_coordinator_persists_the_schedule_and_a_resumed_one_switches_at_the_same_round(tmp_path):
    init = initial_adapter(tmp_path / "init", r_max=4)
    options = dict(method="flexlora_held", clients_per_round=2, rounds=5, client_sampling="rank",
                   rank_sampling_rounds=2)
    store = LocalStore(tmp_path / "fed", create=True)
    fake = FakeClients(store, tmp_path / "work", prune={"d"})
    first = make_coordinator(store, fake, **options)
    first.init(init)
    assert first.step() == "closed round 0"
    assert store.read_federation()["rank_sampling_rounds"] == 2
    resumed = Coordinator(store, clock=Clock(), sleep=fake.sleep, poll_interval_s=1.0, progress=False)
    assert (resumed.client_sampling, resumed.rank_sampling_rounds) == ("rank", 2)
    resumed.run()
    fed = store.read_federation()
    ranks = dict(fed["initial_ranks"])
    for t in range(5):
        if t > 0:
            ranks.update(store.read_summary(t - 1)["client_ranks"])
        drawn = round_info(store, t)["participants"]
        if t < 2:
            assert drawn == rank_sample_clients(CLIENTS, ranks, 2, seed=7, round_idx=t)
            assert round_info(store, t)["client_sampling"] == store.read_summary(t)["client_sampling"] == "rank"
        else:
            assert drawn == todays_uniform_draw(CLIENTS, 2, 7, t)
            assert "client_sampling" not in round_info(store, t)  # a uniform round's round.json is as before
            assert "client_sampling" not in store.read_summary(t)
    with pytest.raises(FederationMismatch, match="rank_sampling_rounds"):
        Coordinator(store, rank_sampling_rounds=3, progress=False).federation  # noqa: B018


def test_an_old_federation_json_reads_as_every_round_by_rank(tmp_path):
    init = initial_adapter(tmp_path / "init", r_max=4)
    store = LocalStore(tmp_path / "fed", create=True)
    coord = make_coordinator(store, None, method="flexlora_held", clients_per_round=2, rounds=3,
                             client_sampling="rank")
    coord.init(init)
    fed = store.read_federation()
    assert fed["rank_sampling_rounds"] is None
    del fed["rank_sampling_rounds"]  # a federation.json written before the setting existed
    store.write_federation(fed)
    resumed = Coordinator(store, progress=False)
    assert (resumed.client_sampling, resumed.rank_sampling_rounds) == ("rank", None)


def test_cli_takes_rank_sampling_rounds(tmp_path, init_dir):
    from peft_hetlora.commands.coordinate import main

    fed = tmp_path / "fed"
    args = ["--store", str(fed), "--init-adapter", str(init_dir), "--rounds", "3", "--clients", "a,b,c,d",
            "--clients-per-round", "2", "--r-min", "1", "--rank-policy", "explicit", "--ranks", "a=1,b=1,c=1,d=4",
            "--client-sampling", "rank", "--rank-sampling-rounds", "1", "--no-progress", "--log-level", "WARNING"]
    assert main(args) == 0
    assert json.loads((Path(fed) / "federation.json").read_text())["rank_sampling_rounds"] == 1
    store = LocalStore(fed)
    assert round_info(store, 0)["participants"] == rank_sample_clients(
        ["a", "b", "c", "d"], {"a": 1, "b": 1, "c": 1, "d": 4}, 2, seed=0, round_idx=0)
    assert round_info(store, 0)["client_sampling"] == "rank"
    assert Coordinator(store, progress=False).rank_sampling_rounds == 1  # resumed from federation.json
    with pytest.raises(SystemExit):
        main(["--store", str(fed), "--rank-sampling-rounds", "two"])
