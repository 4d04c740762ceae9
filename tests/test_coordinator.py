"""The federation round state machine (peft_hetlora.federated.coordinator) and `hetlora coordinate`.

Fake clients write random low-rank factors (safetensors + client.json) into a real `LocalStore`; the
coordinator's injectable `sleep` is where they upload, and its `clock` is a counter, so nothing sleeps.
Aggregates are checked against numpy computations straight from the formulas of docs/design.md#aggregation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file

from peft_hetlora.federated.coordinator import Coordinator
from peft_hetlora.federated.policies import RankPolicy
from peft_hetlora.federated.settings import global_adapter_config
from peft_hetlora.federated.stores import LocalStore
from peft_hetlora.utils.constants import SERVER_STATE_FILE
from peft_hetlora.utils.errors import CoordinatorError, FederationMismatch
from tests.coordinator_fakes import (  # noqa: F401  (the two fixtures register by import)
    ALPHA,
    CLIENTS,
    EXTRA,
    MODULES,
    Clock,
    FakeClients,
    Killed,
    _no_sleep,
    expected_aggregate,
    init_dir_fixture,
    initial_adapter,
    local_store_fixture,
    make_coordinator,
    np_upload,
    round_info,
)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({}, ("flexlora_held", "prefix")),  # the study's winner (benchmarks/README.md, issue 13)
        ({"method": "flexlora"}, ("flexlora", "prefix")),
        ({"method": "hetlora"}, ("hetlora", "prefix")),  # the paper's rule, one argument away
        ({"component_selection": "rolling"}, ("component", "rolling")),  # windows need the component rule
        ({"component_selection": "coverage"}, ("component", "coverage")),
    ],
)
def test_a_new_federation_gets_the_studys_method_unless_told(store, init_dir, given, expected):
    coord = make_coordinator(store, None, **{"method": None, **given})
    coord.init(init_dir)
    fed = store.read_federation()
    assert (fed["method"], fed["component_selection"]) == expected
    assert fed["client_sampling"] == "uniform"  # the default, recorded so a resume keeps it
    info = round_info(store, 0)
    if expected[1] == "prefix":
        assert "components" not in info
    else:  # each participant is assigned as many components as its rank
        assert {cid: len(c) for cid, c in info["components"].items()} == {
            cid: info["ranks"][cid] for cid in info["participants"]
        }


def test_default_method_under_dp_uploads_prefixes():
    from peft_hetlora.federated.round import default_method_and_selection, dp_method_for

    assert default_method_and_selection(None, None, dp=object()) == ("component", "prefix")
    assert dp_method_for("component") == "component"


def test_init_writes_federation_and_global_zero(store, init_dir):
    coord = make_coordinator(store, None)
    g0 = coord.init(init_dir)
    fed = store.read_federation()
    assert fed["method"] == "hetlora" and fed["r_max"] == 4 and fed["r_min"] == 1
    assert fed["base_model"] == "tiny/base" and fed["initial_ranks"] == {"a": 1, "b": 2, "c": 3, "d": 4}
    assert fed["modules"] == {name: [d_in, d_out] for name, (d_in, d_out) in MODULES.items()}
    assert fed["scaling"] == ALPHA / 4
    info = round_info(store, 0)
    assert info["round"] == 0 and len(info["participants"]) == 3
    assert info["ranks"] == {cid: fed["initial_ranks"][cid] for cid in info["participants"]}
    config = json.loads((Path(g0.path) / "adapter_config.json").read_text())
    assert config["peft_type"] == "HETLORA" and config["r"] == config["rank"] == 4
    published = load_file(str(Path(g0.path) / "adapter_model.safetensors"))
    original = load_file(str(init_dir / "adapter_model.safetensors"))
    assert all(torch.equal(published[k], original[k]) for k in original)
    # init is idempotent
    assert coord.init(init_dir).revision == g0.revision


@pytest.mark.parametrize("method", ["hetlora", "zero_pad", "rankwise"])
def test_rounds_end_to_end_match_numpy(store, init_dir, tmp_path, method):
    clients = FakeClients(store, tmp_path / "work", prune={"c", "d"})
    coord = make_coordinator(store, clients, method=method)
    coord.init(init_dir)
    for t in range(3):
        assert coord.step() == f"closed round {t}"
        info = round_info(store, t)
        uploads = {cid: np_upload(store, t, cid) for cid in info["participants"]}
        previous = np_load_file(str(Path(store.get_global(t).path) / "adapter_model.safetensors"))
        expected, weights = expected_aggregate(method, uploads, previous, 4, ALPHA / 4)
        got = np_load_file(str(Path(store.get_global(t + 1).path) / "adapter_model.safetensors"))
        assert set(got) == set(expected)
        for key, value in expected.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
        summary = store.read_summary(t)
        assert summary["accepted"] == sorted(info["participants"]) and summary["rejected"] == {}
        assert summary["weights"] == pytest.approx(weights, rel=1e-6)
        for cid in info["participants"]:
            rec = summary["clients"][cid]
            assert rec["rank_in"] == info["ranks"][cid]
            assert rec["rank_out"] == max(1, rec["rank_in"] - 1) if cid in {"c", "d"} else rec["rank_in"]
            assert summary["client_ranks"][cid] == rec["rank_out"]
        assert summary["metrics"]["bytes_uploaded"] == sum(r["upload_bytes"] for r in summary["clients"].values())
        # next round: a participant's rank is its reported rank_out (or its latest known rank)
        nxt = round_info(store, t + 1)
        assert nxt["ranks"] == {cid: summary["client_ranks"][cid] for cid in nxt["participants"]}
    assert coord.step() == "done"
    assert store.latest_global().round == 3 and round_info(store, 3)["final"] is True
    # the root holds the latest global adapter (PeftModel.from_pretrained(store path) loads it)
    assert (store.path / "adapter_model.safetensors").read_bytes() == (
        Path(store.get_global(3).path) / "adapter_model.safetensors").read_bytes()


def test_flexlora_and_fedavg(tmp_path):
    # flexlora: ranks 1 + 3 <= r_max = 4, so the global product equals the weighted sum of B_k A_k exactly
    store = LocalStore(tmp_path / "flex", create=True)
    clients = FakeClients(store, tmp_path / "w1")
    coord = make_coordinator(store, clients, method="flexlora", clients=["a", "c"], clients_per_round=2,
                             rank_policy={"a": 1, "c": 3}, rounds=1)
    coord.init(initial_adapter(tmp_path / "init", r_max=4))
    coord.run()
    uploads = {cid: np_upload(store, 0, cid) for cid in ("a", "c")}
    n = {cid: uploads[cid][1]["num_examples"] for cid in uploads}
    got = np_load_file(str(Path(store.get_global(1).path) / "adapter_model.safetensors"))
    for name in MODULES:
        want = sum(n[c] / sum(n.values()) * uploads[c][0][f"{name}.lora_B.weight"].astype(np.float64)
                   @ uploads[c][0][f"{name}.lora_A.weight"] for c in uploads)
        np.testing.assert_allclose(got[f"{name}.lora_B.weight"] @ got[f"{name}.lora_A.weight"], want, atol=1e-4)
    # fedavg is homogeneous: heterogeneous initial ranks are refused, a constant rank works
    with pytest.raises(ValueError, match="homogeneous"):
        make_coordinator(LocalStore(tmp_path / "f1", create=True), None, method="fedavg").init(tmp_path / "init")
    store2 = LocalStore(tmp_path / "f2", create=True)
    clients2 = FakeClients(store2, tmp_path / "w2", prune={"a"})  # a reports rank_out 1: not homogeneous
    coord2 = make_coordinator(store2, clients2, method="fedavg", rank_policy=RankPolicy("constant", rank=2),
                              clients_per_round=4, min_clients=3, rounds=1)
    coord2.init(tmp_path / "init")
    coord2.run()
    summary = store2.read_summary(0)
    assert summary["accepted"] == ["b", "c", "d"]
    assert "differs from the rank 2 this method requires" in summary["rejected"]["a"]
    assert summary["weights"] == pytest.approx({c: summary["clients"][c]["num_examples"] / summary["metrics"][
        "num_examples"] for c in ["b", "c", "d"]})


def test_rejected_uploads_are_recorded_and_the_round_goes_on(store, init_dir, tmp_path):
    coord = make_coordinator(store, None, clients=[*CLIENTS, "e"], clients_per_round=5,
                             rank_policy={"a": 1, "b": 2, "c": 3, "d": 4, "e": 2})
    coord.init(init_dir)
    clients = FakeClients(store, tmp_path / "work", poison={"a": "nan", "b": "pickle", "c": "rank", "e": "overflow"})
    for cid in [*CLIENTS, "e"]:
        clients.upload(0, cid)
    summary = coord.close_round(0)
    assert "aggregation refused it" in summary["rejected"].pop("e")  # finite, but B A overflows
    assert summary["accepted"] == ["d"]
    assert "non-finite" in summary["rejected"]["a"]
    assert "pickle" in summary["rejected"]["b"]
    assert "r_max=4" in summary["rejected"]["c"]
    assert summary["weights"] == {"d": pytest.approx(1.0)}
    assert summary["metrics"]["num_rejected"] == 4
    # the new global is exactly d's upload, zero-padded (it is the only accepted client)
    d_state, _ = np_upload(store, 0, "d")
    got = np_load_file(str(Path(store.get_global(1).path) / "adapter_model.safetensors"))
    np.testing.assert_allclose(got[EXTRA], d_state[EXTRA], rtol=1e-6)
    # rejected clients keep their previous rank
    assert summary["client_ranks"]["c"] == 3


def test_non_participants_and_empty_rounds(store, init_dir, tmp_path):
    coord = make_coordinator(store, None, clients_per_round=2, min_clients=1)
    coord.init(init_dir)
    info = round_info(store, 0)
    outsider = next(c for c in CLIENTS if c not in info["participants"])
    clients = FakeClients(store, tmp_path / "work", poison={info["participants"][0]: "nan"})
    clients.upload(0, outsider, rank_in=2)
    clients.upload(0, info["participants"][0])
    status = coord.collect(0, wait=False)
    assert status.uploaded == [info["participants"][0]] and status.others == [outsider] and status.ready
    summary = coord.close_round(0)
    assert summary["accepted"] == []
    assert summary["rejected"][outsider] == "not a participant of round 0"
    assert "carried over" in summary["note"]
    g0 = load_file(str(Path(store.get_global(0).path) / "adapter_model.safetensors"))
    g1 = load_file(str(Path(store.get_global(1).path) / "adapter_model.safetensors"))
    assert all(torch.equal(g0[k], g1[k]) for k in g0)


# ------------------------------------------------------------------------------------------------ waiting
def test_collect_waits_for_min_clients_and_deadline_without_sleeping(store, init_dir, tmp_path):
    clock = Clock()
    clients = FakeClients(store, tmp_path / "work")
    coord = make_coordinator(store, None, clock=clock, clients_per_round=3, min_clients=2, deadline_s=100.0)
    coord.init(init_dir)
    participants = round_info(store, 0)["participants"]
    assert coord.step(wait=False) == "waiting"
    for cid in participants[:2]:
        clients.upload(0, cid)
    status = coord.collect(0, wait=False)
    assert status.uploaded == participants[:2] and not status.ready and not status.deadline_passed
    # waiting: each poll "sleeps" by advancing the fake clock; ready once the deadline passed
    sleeps = []

    def fake_sleep(seconds):
        sleeps.append(seconds)
        clock.advance(seconds)

    coord.sleep = fake_sleep
    coord.poll_interval_s = 10.0
    status = coord.collect(0)
    assert status.ready and status.deadline_passed and 5 <= len(sleeps) <= 11
    # timeout of a single call on a round that cannot close (only 1 of min 2 uploads in round 1)
    coord.close_round(0)
    clients.upload(1, round_info(store, 1)["participants"][0])
    sleeps.clear()
    status = coord.collect(1, timeout_s=30.0)
    assert not status.ready and len(sleeps) >= 1
    # all participants uploaded: ready at once, deadline or not
    for cid in round_info(store, 1)["participants"]:
        clients.upload(1, cid)
    assert coord.collect(1, wait=False).ready


def test_run_waits_through_all_rounds(store, init_dir, tmp_path):
    clients = FakeClients(store, tmp_path / "work", prune={"d"})
    coord = make_coordinator(store, clients, rounds=4)
    coord.init(init_dir)
    final = coord.run()
    assert final.round == 4 and clients.sleeps == 4
    assert all(store.read_summary(t) is not None for t in range(4))
    # resuming a finished federation is a no-op, with settings from federation.json only
    again = Coordinator(store, clock=Clock(), sleep=_no_sleep, progress=False)
    assert again.run().revision == final.revision and again.method == "hetlora" and again.rounds == 4


# ------------------------------------------------------------------------------------------------ resume


class FlakyStore:
    """Forwards to a store and dies before its `kill_at`-th operation."""

    def __init__(self, inner: LocalStore, kill_at: int | None) -> None:
        self.inner, self.kill_at, self.ops = inner, kill_at, 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.kill_at is not None and self.ops >= self.kill_at:
                raise Killed(name)
            self.ops += 1
            return attr(*args, **kwargs)

        return call


ROUNDS_UNDER_KILL = 2  # covers every kind of step pair: init, open, collect, close, publish, the final round


def _run_federation(root: Path, init_dir: Path, kill_at: int | None, **settings):
    inner = LocalStore(root / "fed", create=True)
    clients = FakeClients(inner, root / "work", prune={"b", "d"})
    flaky = FlakyStore(inner, kill_at)
    try:
        coord = make_coordinator(flaky, clients, rounds=ROUNDS_UNDER_KILL, **settings)
        coord.init(init_dir)
        coord.run()
    except Killed:
        return inner, clients, flaky.ops, True
    return inner, clients, flaky.ops, False


def _server_state(store: LocalStore, t: int) -> dict[str, torch.Tensor]:
    path = Path(store.get_global(t).path) / SERVER_STATE_FILE
    return load_file(str(path)) if path.is_file() else {}


def _final_state(store: LocalStore):
    latest = store.latest_global()
    tensors = load_file(str(Path(latest.path) / "adapter_model.safetensors"))
    summaries = [store.read_summary(t) for t in range(latest.round)]
    return latest.round, tensors, summaries


@pytest.fixture
def fast_tmp(tmp_path):
    """A scratch folder in RAM when the machine has /dev/shm (the kill test runs dozens of small federations)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    root = Path(tempfile.mkdtemp(prefix="hetlora-test-", dir=shm))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


# issue 24: a server step's state (momentum, factored second moments, residual) resumes bit-identically too
SERVER_STEPS = {"no_server_step": {},
                "fedavgm_ef": {"method": "flexlora_held", "server_optimizer": {"name": "fedavgm", "momentum": 0.5},
                               "error_feedback": True},
                "fedadam": {"server_optimizer": {"name": "fedadam", "lr": 0.05}}}


@pytest.mark.parametrize("server", list(SERVER_STEPS))
def test_resume_after_a_kill_between_any_two_store_operations(fast_tmp, init_dir, monkeypatch, server):
    # durability is the store's own test; here fsync only costs time (dozens of federations run below)
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    tmp_path = fast_tmp
    extra = SERVER_STEPS[server]
    reference, _, total_ops, killed = _run_federation(tmp_path / "ref", init_dir, None, **extra)
    assert not killed and total_ops > 15
    ref_round, ref_tensors, ref_summaries = _final_state(reference)
    assert ref_round == ROUNDS_UNDER_KILL
    resumed_from_summary = 0
    for kill_at in range(total_ops):
        root = tmp_path / f"k{kill_at}"
        inner, clients, _, killed = _run_federation(root, init_dir, kill_at, **extra)
        assert killed, kill_at
        latest = inner.latest_global()
        if latest is not None and inner.read_summary(latest.round) is not None:
            resumed_from_summary += 1  # killed after summary t, before global t+1
        coord = make_coordinator(inner, clients, rounds=ROUNDS_UNDER_KILL, **extra)
        coord.init(init_dir)
        final = coord.run()
        round_idx, tensors, summaries = _final_state(inner)
        assert round_idx == ref_round == final.round
        assert set(tensors) == set(ref_tensors)
        for key, value in ref_tensors.items():
            assert torch.equal(tensors[key], value), (kill_at, key)
        for t in range(1, round_idx + 1):  # every published server state, not only the last
            assert _server_state(inner, t).keys() == _server_state(reference, t).keys()
            for key, value in _server_state(reference, t).items():
                assert torch.equal(_server_state(inner, t)[key], value), (kill_at, t, key)
        for got, want in zip(summaries, ref_summaries):
            assert got["accepted"] == want["accepted"] and len(set(got["accepted"])) == len(got["accepted"])
            assert got["weights"] == want["weights"] and got["client_ranks"] == want["client_ranks"]
            assert sum(got["weights"].values()) == pytest.approx(1.0)
    assert resumed_from_summary >= ROUNDS_UNDER_KILL  # "summary t without global t+1" resumed in every round
    assert bool(_server_state(reference, ROUNDS_UNDER_KILL)) == bool(extra)


def test_summary_without_next_global_reaggregates_exactly_the_accepted_ids(store, init_dir, tmp_path):
    coord = make_coordinator(store, None, clients_per_round=4)
    coord.init(init_dir)
    clients = FakeClients(store, tmp_path / "work")
    for cid in ["a", "b", "c"]:
        clients.upload(0, cid)
    flaky = FlakyStore(store, None)
    dying = make_coordinator(flaky, None, clients_per_round=4)
    original_publish = store.publish_global

    def die_on_publish(*args, **kwargs):
        raise Killed("publish")

    store.publish_global = die_on_publish
    with pytest.raises(Killed):
        dying.close_round(0, uploads=["a", "b", "c"])
    store.publish_global = original_publish
    assert store.read_summary(0)["accepted"] == ["a", "b", "c"] and store.latest_global().round == 0
    # a late upload from d must not sneak into the decided round
    clients.upload(0, "d")
    summary = make_coordinator(store, None, clients_per_round=4).close_round(0)
    assert summary["accepted"] == ["a", "b", "c"]
    uploads = {cid: np_upload(store, 0, cid) for cid in ["a", "b", "c"]}
    expected, _ = expected_aggregate("hetlora", uploads, {}, 4, ALPHA / 4)
    got = np_load_file(str(Path(store.get_global(1).path) / "adapter_model.safetensors"))
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6)


def test_reupload_after_the_decision_is_detected(store, init_dir, tmp_path):
    # a store without staging (a third-party AdapterStore) re-aggregates on resume and detects a changed upload
    coord = make_coordinator(NoStaging(store), None, clients_per_round=4, min_clients=2)
    coord.init(init_dir)
    clients = FakeClients(store, tmp_path / "work")
    clients.upload(0, "a")
    clients.upload(0, "b")
    real_publish = store.publish_global
    store.publish_global = lambda *a, **k: (_ for _ in ()).throw(Killed("publish"))
    with pytest.raises(Killed):
        coord.close_round(0)
    store.publish_global = real_publish
    clients.upload(0, "a", noise_seed=1)  # a replaces its upload after the summary was written
    with pytest.raises(CoordinatorError, match="sha256"):
        make_coordinator(NoStaging(store), None, clients_per_round=4, min_clients=2).step()


class NoStaging:
    """A store that only has the AdapterStore protocol's methods (no staging, no cleaning)."""

    _METHODS = ("read_federation", "write_federation", "publish_global", "latest_global", "get_global",
                "upload_client", "list_client_uploads", "download_client", "write_summary", "read_summary")

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        if name not in self._METHODS:
            raise AttributeError(name)
        return getattr(self.inner, name)


def test_reupload_after_the_decision_does_not_stop_the_coordinator(store, init_dir, tmp_path):
    # issue 10 item 12: a crash between summary and publish, then a re-upload, stopped every restart. The
    # aggregate is staged before the summary names it, so the restart publishes exactly the decided global.
    coord = make_coordinator(store, None, clients_per_round=4, min_clients=2)
    coord.init(init_dir)
    clients = FakeClients(store, tmp_path / "work")
    clients.upload(0, "a")
    clients.upload(0, "b")
    decided = {cid: np_upload(store, 0, cid) for cid in ["a", "b"]}
    real_publish = store.publish_global
    store.publish_global = lambda *a, **k: (_ for _ in ()).throw(Killed("publish"))
    with pytest.raises(Killed):
        coord.close_round(0)
    store.publish_global = real_publish
    assert store.latest_global().round == 0 and store.read_summary(0)["accepted"] == ["a", "b"]
    clients.upload(0, "a", noise_seed=1)  # a replaces its upload after the summary was written
    for _ in range(2):  # every restart works (and the second finds nothing left to do for round 0)
        make_coordinator(store, None, clients_per_round=4, min_clients=2).step(wait=False)
    assert store.latest_global().round == 1
    expected, _ = expected_aggregate("hetlora", decided, {}, 4, ALPHA / 4)
    got = np_load_file(str(Path(store.get_global(1).path) / "adapter_model.safetensors"))
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6)
    summary = store.read_summary(0)
    assert summary["next_global"] == {"round": 1, "sha256": store.get_global(1).revision}


def test_refuses_a_different_federation(store, init_dir, tmp_path):
    make_coordinator(store, None).init(init_dir)
    with pytest.raises(FederationMismatch, match="method: store has 'hetlora'"):
        make_coordinator(store, None, method="zero_pad").step(wait=False)
    with pytest.raises(FederationMismatch, match="r_max"):
        make_coordinator(store, None, r_max=8).step(wait=False)
    with pytest.raises(FederationMismatch, match="base_model"):
        make_coordinator(store, None).init(initial_adapter(tmp_path / "other", r_max=4, base="other/model"))
    with pytest.raises(FederationMismatch, match="clients"):
        make_coordinator(store, None, clients=["a", "b", "c", "x"]).step(wait=False)
    # the same settings (or none) resume fine
    assert make_coordinator(store, None).step(wait=False) == "waiting"
    assert Coordinator(store, progress=False).step(wait=False) == "waiting"


def test_errors_that_say_what_to_do(store, tmp_path):
    with pytest.raises(CoordinatorError, match="init"):
        make_coordinator(store, None).step()
    with pytest.raises(ValueError, match="full rank"):
        make_coordinator(store, None, r_max=8).init(initial_adapter(tmp_path / "i4", r_max=4))
    with pytest.raises(ValueError, match="outside"):
        make_coordinator(store, None, rank_policy={"a": 1, "b": 2, "c": 3, "d": 9}).init(
            initial_adapter(tmp_path / "i", r_max=4))
    with pytest.raises(ValueError, match="clients_per_round"):
        make_coordinator(store, None, clients_per_round=9).init(tmp_path / "i")


def test_plain_lora_initial_config_is_converted():
    config = global_adapter_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": True}, r_max=8,
                                   r_min=2)
    assert config["peft_type"] == "HETLORA" and config["rank_scaling"] == "rslora" and not config["use_rslora"]
    with pytest.raises(ValueError, match="rank_pattern"):
        global_adapter_config({"peft_type": "LORA", "r": 8, "rank_pattern": {"q": 2}}, r_max=8, r_min=1)
    with pytest.raises(ValueError, match="peft_type"):
        global_adapter_config({"peft_type": "IA3", "r": 8}, r_max=8, r_min=1)


# ------------------------------------------------------------------------------------------------ concurrency
def test_concurrent_client_uploads_both_land(store, init_dir, tmp_path):
    coord = make_coordinator(store, None, clients_per_round=4, min_clients=2)
    coord.init(init_dir)
    folders = {cid: FakeClients(store, tmp_path / "stage").upload(0, cid) for cid in ("a", "b")}
    # clear the round again so the threads upload into an empty round
    shutil.rmtree(store.path / "rounds" / "0" / "clients")
    barrier = threading.Barrier(2)
    errors = []

    def worker(cid):
        try:
            own = LocalStore(store.path)  # as if from another process
            barrier.wait()
            for _ in range(5):
                own.upload_client(0, cid, folders[cid])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(cid,)) for cid in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert store.list_client_uploads(0) == ["a", "b"]
    status = coord.collect(0, wait=False)
    assert status.uploaded == ["a", "b"] and status.ready
    assert coord.close_round(0)["accepted"] == ["a", "b"]


# ------------------------------------------------------------------------------------------------ Hub
