"""The federation round state machine (peft_hetlora.federated.coordinator) and `hetlora coordinate`.

Fake clients write random low-rank factors (safetensors + client.json) into a real `LocalStore`; the
coordinator's injectable `sleep` is where they upload, and its `clock` is a counter, so nothing sleeps.
Aggregates are checked against numpy computations straight from the formulas of DESIGN.md 1.4.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file, save_file

from peft_hetlora.commands.coordinate import add_coordinate_parser, main
from peft_hetlora.federated.coordinator import (
    Coordinator,
    CoordinatorError,
    FederationMismatch,
    global_adapter_config,
)
from peft_hetlora.federated.local_store import LocalStore
from peft_hetlora.federated.rank_policy import RankPolicy

MODULES = {  # name -> (d_in, d_out)
    "base_model.model.model.layers.0.self_attn.q_proj": (12, 10),
    "base_model.model.model.layers.0.self_attn.v_proj": (12, 6),
    "base_model.model.model.layers.1.self_attn.q_proj": (12, 10),
}
EXTRA = "base_model.model.score.modules_to_save.default.weight"
ALPHA = 8
CLIENTS = ["a", "b", "c", "d"]


# ------------------------------------------------------------------------------------------------ helpers
class Clock:
    """A fake clock: every reading advances one second; `advance` jumps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def initial_adapter(folder: Path, r_max: int, *, seed: int = 0, peft_type: str = "HETLORA",
                    base: str = "tiny/base") -> Path:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (d_in, d_out) in MODULES.items():
        sd[f"{name}.lora_A.weight"] = torch.randn(r_max, d_in, generator=g) * 0.3
        sd[f"{name}.lora_B.weight"] = torch.zeros(d_out, r_max)
    sd[EXTRA] = torch.randn(3, 12, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": peft_type, "r": r_max, "lora_alpha": ALPHA, "base_model_name_or_path": base,
              "target_modules": ["q_proj", "v_proj"]}
    if peft_type == "HETLORA":
        config.update(rank=r_max, r_min=1, rank_scaling="fixed")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def round_info(store: LocalStore, t: int) -> dict:
    return json.loads((Path(store.get_global(t).path) / "round.json").read_text())


class FakeClients:
    """Clients that train by adding seeded noise to their truncated global and upload to the store.

    `prune`: clients that report rank_out = rank_in - 1 (pruned); `poison`: {client_id: kind} bad uploads.
    """

    def __init__(self, store: LocalStore, workdir: Path, *, prune=(), poison=None, r_min: int = 1,
                 skip=(), store_for=None, meta=None, rank_cap=None) -> None:
        self.store, self.workdir = store, workdir
        self.meta = dict(meta or {})  # {client_id: client.json overrides}
        self.rank_cap = dict(rank_cap or {})  # {client_id: max_rank}: trains at min(assigned, max_rank), reports it
        self.store_for = store_for or (lambda cid: store)  # the store as client `cid` sees it (its own token)
        self.prune, self.poison, self.r_min, self.skip = set(prune), dict(poison or {}), r_min, set(skip)
        self.sleeps = 0

    def upload(self, t: int, cid: str, rank_in: int | None = None, *, noise_seed: int = 0) -> Path:
        g_adapter = self.store.get_global(t)
        info = round_info(self.store, t)
        rank_in = info["ranks"].get(cid, 2) if rank_in is None else rank_in
        if cid in self.rank_cap:
            rank_in = min(rank_in, self.rank_cap[cid])
        rank_out = max(self.r_min, rank_in - 1) if cid in self.prune else rank_in
        sd = load_file(str(Path(g_adapter.path) / "adapter_model.safetensors"))
        gen = torch.Generator().manual_seed(zlib.crc32(f"{cid}:{t}:{noise_seed}".encode()))
        out = {}
        for key, value in sorted(sd.items()):
            if key.endswith("lora_A.weight"):
                out[key] = (value[:rank_in] + 0.2 * torch.randn(value[:rank_in].shape, generator=gen))[:rank_out]
            elif key.endswith("lora_B.weight"):
                v = value[:, :rank_in]
                out[key] = (v + 0.2 * torch.randn(v.shape, generator=gen))[:, :rank_out]
            else:
                out[key] = value + 0.1 * torch.randn(value.shape, generator=gen)
        out = {k: v.contiguous() for k, v in out.items()}
        meta = {"client_id": cid, "round": t, "rank_in": rank_in, "rank_out": rank_out,
                "num_examples": 10 + zlib.crc32(cid.encode()) % 50, "train_loss": 2.0 - 0.1 * t,
                "tail_norm_start": 1.0, "tail_norm_end": 0.5, "global_revision": g_adapter.revision,
                "peft_hetlora_version": "0.1.0"}
        if cid in self.rank_cap:
            meta["max_rank"] = self.rank_cap[cid]
        meta.update(self.meta.get(cid, {}))
        kind = self.poison.get(cid)
        if kind == "nan":
            first = next(k for k in out if k.endswith("lora_B.weight"))
            out[first][0, 0] = float("nan")
        elif kind == "rank":
            meta["rank_in"] = meta["rank_out"] = 99
        elif kind == "overflow":  # finite values whose product B A overflows float32
            for key in out:
                if key.endswith("lora_B.weight") or key.endswith("lora_A.weight"):
                    out[key] = torch.full_like(out[key], 3e38)
        folder = self.workdir / f"upload-{cid}-{t}-{noise_seed}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(out, str(folder / "adapter_model.safetensors"))
        (folder / "client.json").write_text(json.dumps(meta))
        self.store_for(cid).upload_client(t, cid, folder)
        if kind == "pickle":  # smuggle a pickle next to the files inside the store
            torch.save({"x": 1}, Path(self.store.download_client(t, cid)) / "adapter_model.bin")
        return folder

    def upload_open_round(self) -> None:
        latest = self.store.latest_global()
        if latest is None:
            return
        done = set(self.store.list_client_uploads(latest.round))
        for cid in round_info(self.store, latest.round)["participants"]:
            if cid not in done and cid not in self.skip:
                self.upload(latest.round, cid)

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.upload_open_round()


def make_coordinator(store, fake: FakeClients | None, clock=None, **kwargs) -> Coordinator:
    options = dict(method="hetlora", r_max=4, r_min=1, clients=CLIENTS, clients_per_round=3, rounds=3, seed=7,
                   rank_policy={"a": 1, "b": 2, "c": 3, "d": 4}, poll_interval_s=1.0, progress=False)
    options.update(kwargs)
    return Coordinator(store, clock=clock or Clock(), sleep=fake.sleep if fake else _no_sleep, **options)


def _no_sleep(seconds: float) -> None:  # pragma: no cover - a test that waits without clients is a bug
    raise AssertionError("the coordinator waited although no client can upload")


def np_upload(store: LocalStore, t: int, cid: str) -> tuple[dict[str, np.ndarray], dict]:
    folder = Path(store.download_client(t, cid))
    return np_load_file(str(folder / "adapter_model.safetensors")), json.loads((folder / "client.json").read_text())


def expected_aggregate(method: str, uploads: dict, previous: dict[str, np.ndarray], r_max: int, scale: float):
    """Independent numpy aggregation of {cid: (state, meta)} (per-client weights, DESIGN.md 1.4)."""
    ids = sorted(uploads)
    norms, sizes, ranks = {}, {}, {}
    for cid in ids:
        sd, meta = uploads[cid]
        total = 0.0
        for name in MODULES:
            delta = scale * sd[f"{name}.lora_B.weight"].astype(np.float64) @ sd[f"{name}.lora_A.weight"].astype(
                np.float64)
            total += float((delta**2).sum())
        norms[cid], sizes[cid], ranks[cid] = np.sqrt(total), meta["num_examples"], meta["rank_out"]
    if method in ("hetlora", "rankwise"):
        weights = {cid: norms[cid] / sum(norms.values()) for cid in ids}
    else:
        weights = {cid: sizes[cid] / sum(sizes.values()) for cid in ids}
    out = {}
    for name, (d_in, d_out) in MODULES.items():
        a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        a_sum, b_sum = np.zeros((r_max, d_in)), np.zeros((d_out, r_max))
        for cid in ids:
            sd = uploads[cid][0]
            k = sd[a_key].shape[0]
            a_sum[:k] += weights[cid] * sd[a_key]
            b_sum[:, :k] += weights[cid] * sd[b_key]
        if method == "rankwise":
            for j in range(r_max):
                cover = [cid for cid in ids if ranks[cid] > j]
                if not cover:
                    a_sum[j], b_sum[:, j] = previous[a_key][j], previous[b_key][:, j]
                    continue
                den = sum(norms[c] for c in cover)
                a_sum[j] = sum(norms[c] / den * uploads[c][0][a_key][j] for c in cover)
                b_sum[:, j] = sum(norms[c] / den * uploads[c][0][b_key][:, j] for c in cover)
        out[a_key], out[b_key] = a_sum, b_sum
    out[EXTRA] = sum(weights[cid] * uploads[cid][0][EXTRA] for cid in ids)
    return out, weights


@pytest.fixture
def init_dir(tmp_path) -> Path:
    return initial_adapter(tmp_path / "init", r_max=4)


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "fed", create=True)


# ------------------------------------------------------------------------------------------------ end to end
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
class Killed(BaseException):
    """A simulated crash (BaseException, so nothing in the coordinator can swallow it)."""


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


def _run_federation(root: Path, init_dir: Path, kill_at: int | None):
    inner = LocalStore(root / "fed", create=True)
    clients = FakeClients(inner, root / "work", prune={"b", "d"})
    flaky = FlakyStore(inner, kill_at)
    try:
        coord = make_coordinator(flaky, clients, rounds=ROUNDS_UNDER_KILL)
        coord.init(init_dir)
        coord.run()
    except Killed:
        return inner, clients, flaky.ops, True
    return inner, clients, flaky.ops, False


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


def test_resume_after_a_kill_between_any_two_store_operations(fast_tmp, init_dir, monkeypatch):
    # durability is the store's own test; here fsync only costs time (dozens of federations run below)
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    tmp_path = fast_tmp
    reference, _, total_ops, killed = _run_federation(tmp_path / "ref", init_dir, None)
    assert not killed and total_ops > 15
    ref_round, ref_tensors, ref_summaries = _final_state(reference)
    assert ref_round == ROUNDS_UNDER_KILL
    resumed_from_summary = 0
    for kill_at in range(total_ops):
        root = tmp_path / f"k{kill_at}"
        inner, clients, _, killed = _run_federation(root, init_dir, kill_at)
        assert killed, kill_at
        latest = inner.latest_global()
        if latest is not None and inner.read_summary(latest.round) is not None:
            resumed_from_summary += 1  # killed after summary t, before global t+1
        coord = make_coordinator(inner, clients, rounds=ROUNDS_UNDER_KILL)
        coord.init(init_dir)
        final = coord.run()
        round_idx, tensors, summaries = _final_state(inner)
        assert round_idx == ref_round == final.round
        assert set(tensors) == set(ref_tensors)
        for key, value in ref_tensors.items():
            assert torch.equal(tensors[key], value), (kill_at, key)
        for got, want in zip(summaries, ref_summaries):
            assert got["accepted"] == want["accepted"] and len(set(got["accepted"])) == len(got["accepted"])
            assert got["weights"] == want["weights"] and got["client_ranks"] == want["client_ranks"]
            assert sum(got["weights"].values()) == pytest.approx(1.0)
    assert resumed_from_summary >= ROUNDS_UNDER_KILL  # "summary t without global t+1" resumed in every round


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
@pytest.mark.parametrize("mode", ["client_repo", "pr"])
def test_rounds_on_a_hub_store(hub_double, tmp_path, init_dir, mode):
    """The same state machine on HubStore (Hub test double): clients write with their own tokens."""
    from peft_hetlora.federated.hub_store import HubStore

    store = HubStore("hetlora/fed", endpoint=hub_double.endpoint, token=hub_double.token, client_mode=mode,
                     cache_dir=tmp_path / "hf-coordinator")

    def store_for(cid):
        write = [store.client_repo_for(cid)] if mode == "client_repo" else []
        hub_double.add_token(f"tok-{cid}", f"user-{cid}", write=write)
        return HubStore(store.repo_id, endpoint=store.endpoint, token=f"tok-{cid}", client_mode=mode,
                        cache_dir=tmp_path / f"hf-{cid}")

    fake = FakeClients(store, tmp_path / "work", prune={"b"}, poison={"c": "nan"}, store_for=store_for)
    coord = make_coordinator(store, fake, rounds=2, clients_per_round=4, min_clients=3)
    coord.init(init_dir)
    final = coord.run()
    assert final.round == 2
    for t in range(2):
        summary = store.read_summary(t)
        assert summary["accepted"] == ["a", "b", "d"] and "non-finite" in summary["rejected"]["c"]
        uploads = {cid: np_upload(store, t, cid) for cid in summary["accepted"]}
        expected, weights = expected_aggregate("hetlora", uploads, {}, 4, ALPHA / 4)
        assert summary["weights"] == pytest.approx(weights, rel=1e-6)
        got = np_load_file(str(Path(store.get_global(t + 1).path) / "adapter_model.safetensors"))
        for key, value in expected.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6)
    assert round_info(store, 1)["ranks"]["b"] == 1  # b pruned 2 -> 1 in round 0


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_runs_and_resumes(tmp_path, init_dir, capsys):
    fed = tmp_path / "fed"
    args = ["--store", str(fed), "--init-adapter", str(init_dir), "--rounds", "2", "--clients", "a,b,c",
            "--r-min", "1", "--rank-policy", "explicit", "--ranks", "a=1,b=2,c=4", "--no-progress",
            "--log-level", "WARNING"]
    assert main(args) == 0
    assert "Round 0 waits for uploads: 0/3" in capsys.readouterr().out
    store = LocalStore(fed)
    clients = FakeClients(store, tmp_path / "work")
    clients.upload_open_round()
    assert main(["--store", str(fed), "--no-progress"]) == 0  # resume with settings from federation.json
    assert "Round 1 waits" in capsys.readouterr().out
    clients.upload_open_round()
    assert main(["--store", str(fed), "--no-progress"]) == 0
    assert "Federation done: global 2" in capsys.readouterr().out
    assert main(["--store", str(fed), "--method", "fedavg", "--no-progress"]) == 1
    assert "different federation" in capsys.readouterr().err
    assert main(["--store", str(tmp_path / "empty"), "--no-progress"]) == 1
    assert "init" in capsys.readouterr().err


def test_cli_parser_wiring_and_num_clients(tmp_path, init_dir):
    parser = argparse.ArgumentParser(prog="hetlora")
    sub = parser.add_subparsers(dest="command")
    add_coordinate_parser(sub)
    args = parser.parse_args(["coordinate", "--store", str(tmp_path / "fed"), "--init-adapter", str(init_dir),
                              "--num-clients", "12", "--clients-per-round", "4", "--rank-policy", "budget",
                              "--budgets", ",".join(f"client-{i:03d}=1MB" for i in range(12)), "--no-progress",
                              "--max-upload-bytes", "1MiB"])
    assert args.func(args) == 0
    fed = LocalStore(tmp_path / "fed").read_federation()
    assert fed["clients"][0] == "client-000" and len(fed["clients"]) == 12
    assert set(fed["initial_ranks"].values()) == {4} and fed["max_upload_bytes"] == 2**20


# ------------------------------------------------------------------------------------------------ real PEFT side
def test_global_is_a_hetlora_adapter_that_peft_loads(tmp_path):
    """A real HETLORA adapter goes through a round: clients load global 0 with PeftModel.from_pretrained, train
    (here: randomise) at their rank, upload what get_peft_model_state_dict gives; global 1 loads again."""
    peft = pytest.importorskip("peft")
    from tiny_models import randomize_adapter, tiny_llama

    import peft_hetlora

    base_config = dict(r=4, rank=4, r_min=1, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(tiny_llama(), peft_hetlora.HetLoRAConfig(**base_config))
    randomize_adapter(model, seed=1)
    model.save_pretrained(tmp_path / "init")
    store = LocalStore(tmp_path / "fed", create=True)
    coord = Coordinator(store, r_min=1, clients=["a", "b"], rank_policy={"a": 2, "b": 4}, rounds=1,
                        progress=False, clock=Clock(), sleep=_no_sleep)
    g0 = coord.init(tmp_path / "init")
    for seed, cid in enumerate(["a", "b"]):
        client = peft.PeftModel.from_pretrained(tiny_llama(), g0.path, is_trainable=True)
        rank = round_info(store, 0)["ranks"][cid]
        client.base_model.set_rank(rank)
        randomize_adapter(client, seed=10 + seed)
        state = {k: v.detach().contiguous() for k, v in peft.get_peft_model_state_dict(client).items()}
        folder = tmp_path / f"up-{cid}"
        folder.mkdir()
        save_file(state, str(folder / "adapter_model.safetensors"))
        (folder / "client.json").write_text(json.dumps({
            "client_id": cid, "round": 0, "rank_in": rank, "rank_out": rank, "num_examples": 8,
            "train_loss": 1.0, "global_revision": g0.revision}))
        store.upload_client(0, cid, folder)
    summary = coord.close_round(0)
    assert summary["accepted"] == ["a", "b"] and summary["clients"]["a"]["rank_out"] == 2
    g1 = store.get_global(1)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), g1.path)
    assert loaded.base_model.get_rank() == 4
    on_disk = load_file(str(Path(g1.path) / "adapter_model.safetensors"))
    in_model = peft.get_peft_model_state_dict(loaded)
    assert set(in_model) == set(on_disk)
    assert all(torch.equal(in_model[k].float(), on_disk[k]) for k in on_disk)
    # the store root holds the same latest adapter
    assert peft.PeftModel.from_pretrained(tiny_llama(), str(store.path)).base_model.get_rank() == 4


def test_cli_on_a_hub_store(hub_double, tmp_path, init_dir, capsys):
    from peft_hetlora.federated.hub_store import HubStore

    hub = ["--store", "hf://hetlora/cli-fed", "--hub-endpoint", hub_double.endpoint, "--hub-token",
           hub_double.token, "--no-progress", "--log-level", "WARNING"]
    assert main([*hub, "--init-adapter", str(init_dir), "--clients", "a,b", "--rounds", "1", "--rank", "2"]) == 0
    assert "Round 0 waits for uploads: 0/2" in capsys.readouterr().out
    store = HubStore("hetlora/cli-fed", endpoint=hub_double.endpoint, token=hub_double.token,
                     cache_dir=tmp_path / "c")
    assert store.read_federation()["initial_ranks"] == {"a": 2, "b": 2}
    FakeClients(store, tmp_path / "work").upload_open_round()
    assert main(hub) == 0
    assert "Federation done: global 1" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ issue 10 defects
def _strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_changed_settings_on_an_existing_store_are_refused_naming_each(store, init_dir, tmp_path, capsys):
    # issue 10 item 3: rerunning with another --rank-policy printed "nothing to do"
    make_coordinator(store, None).init(init_dir)
    with pytest.raises(FederationMismatch) as err:
        make_coordinator(store, None, rank_policy=RankPolicy("tiers"), r_min=2, clip_norm=5.0, seed=8,
                         clients_per_round=2).init(init_dir)
    message = str(err.value)
    for name, stored, given in (("rank_policy", "'explicit'", "'tiers'"), ("r_min", "1", "2"),
                                ("clip_norm", "None", "5.0"), ("seed", "7", "8"), ("clients_per_round", "3", "2")):
        assert f"{name}: store has" in message, name
        part = message.split(f"{name}: store has", 1)[1].split(";")[0]
        assert stored in part.split("this coordinator")[0] and given in part.split("this coordinator")[1], name
    with pytest.raises(FederationMismatch, match="next_rank"):
        make_coordinator(store, None, next_rank="initial").step(wait=False)
    with pytest.raises(FederationMismatch, match="lora_alpha"):
        other = initial_adapter(tmp_path / "alpha", r_max=4)
        config = json.loads((other / "adapter_config.json").read_text())
        (other / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 32}))
        make_coordinator(store, None).init(other)
    reordered = initial_adapter(tmp_path / "reordered", r_max=4)  # same set of target modules, other order
    config = json.loads((reordered / "adapter_config.json").read_text())
    (reordered / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["v_proj", "q_proj"]}))
    make_coordinator(store, None).init(reordered)
    with pytest.raises(FederationMismatch, match="rounds can only be extended"):
        make_coordinator(store, None, rounds=2).step(wait=False)
    # extending rounds stays allowed and is recorded
    assert make_coordinator(store, None, rounds=5).step(wait=False) == "waiting"
    assert store.read_federation()["rounds"] == 5
    if isinstance(store, LocalStore):  # the CLI says it in one line and exits 1
        code = main(["--store", str(store.path), "--rank-policy", "uniform", "--no-progress"])
        assert code == 1 and "rank_policy: store has" in capsys.readouterr().err


def test_summary_is_strict_json_when_reported_losses_overflow(store, init_dir, tmp_path):
    # issue 10 item 9: finite train_loss 1.7e308 x num_examples 1e9 overflowed the weighted mean to Infinity
    losses = {"a": (1.7e308, 10**9), "b": (1.0e308, 10**9), "c": (1.5e308, 3)}
    clients = FakeClients(store, tmp_path / "work",
                          meta={c: {"train_loss": x, "num_examples": n} for c, (x, n) in losses.items()})
    coord = make_coordinator(store, clients, rounds=1)
    coord.init(init_dir)
    info = round_info(store, 0)
    for cid in info["participants"]:
        clients.upload(0, cid)
    summary = coord.close_round(0)
    used = {c: losses[c] for c in summary["accepted"]}
    total = sum(n for _, n in used.values())
    expected = sum(x / total * n for x, n in used.values())  # each term <= max loss: no overflow here either
    assert summary["metrics"]["train_loss"] == pytest.approx(expected, rel=1e-12)
    if isinstance(store, LocalStore):
        text = (store.path / "rounds" / "0" / "summary.json").read_text()
        assert _strict_loads(text)["metrics"]["train_loss"] == pytest.approx(expected, rel=1e-12)


def test_weighted_mean_is_overflow_safe_and_non_finite_becomes_null_with_a_reason():
    from peft_hetlora.federated.round_summary import finite_or_null as _finite_or_null
    from peft_hetlora.federated.round_summary import weighted_mean

    assert weighted_mean([(1.7e308, 10**9), (1.7e308, 1)]) == pytest.approx(1.7e308, rel=1e-15)
    assert weighted_mean([(2.0, 1), (5.0, 3)]) == pytest.approx((2.0 + 15.0) / 4)
    assert weighted_mean([]) is None
    found = {}
    out = _finite_or_null({"metrics": {"norm": float("inf"), "ok": 1.0}, "w": [float("nan")]}, "", found)
    assert out == {"metrics": {"norm": None, "ok": 1.0}, "w": [None]}
    assert set(found) == {"metrics.norm", "w[0]"} and all("null" in r for r in found.values())


def _kill_root_refresh_of(monkeypatch, round_idx: int) -> None:
    from peft_hetlora.federated import local_store

    real = local_store.LocalStore._refresh_root

    def dies(self, global_dir):
        if global_dir.parent.name == str(round_idx):
            raise Killed("refresh root")
        return real(self, global_dir)

    monkeypatch.setattr(local_store.LocalStore, "_refresh_root", dies)


def test_final_publish_interrupted_before_the_root_is_finished_on_restart(tmp_path, init_dir, monkeypatch, capsys):
    # issue 10 item 10: a kill between rounds/T/global and the root left the root at T-1 and the restart
    # printed "Federation done" over it
    fed = tmp_path / "fed"
    assert main(["--store", str(fed), "--init-adapter", str(init_dir), "--rounds", "1", "--clients", "a,b",
                 "--rank-policy", "explicit", "--ranks", "a=1,b=4", "--no-progress", "--log-level", "WARNING"]) == 0
    store = LocalStore(fed)
    FakeClients(store, tmp_path / "work").upload_open_round()
    with monkeypatch.context() as patch:
        _kill_root_refresh_of(patch, 1)
        with pytest.raises(Killed):
            main(["--store", str(fed), "--no-progress", "--log-level", "WARNING"])
    assert store.latest_global().round == 1
    assert json.loads((fed / "round.json").read_text())["round"] == 0  # the root is stale
    capsys.readouterr()
    assert main(["--store", str(fed), "--no-progress", "--log-level", "WARNING"]) == 0
    assert "Federation done: global 1" in capsys.readouterr().out
    assert json.loads((fed / "round.json").read_text())["round"] == 1
    final = store.get_global(1)
    assert (fed / "adapter_model.safetensors").read_bytes() == (final.path / "adapter_model.safetensors").read_bytes()
    assert "Latest published round: **1**" in (fed / "README.md").read_text()


def test_restart_removes_temp_files_of_killed_coordinators_only(store, init_dir, tmp_path, monkeypatch):
    # issue 10 item 12: hetlora-global-* leaked in the temp folder (and .tmp-* in the store) after kill -9
    import subprocess
    import sys

    from peft_hetlora.federated.temp_files import _HOST, temp_prefix

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = tmp / f"hetlora-global-p{proc.pid}@{_HOST}~r3-abc"
    dead.mkdir()
    (dead / "adapter_model.safetensors").write_bytes(b"x" * 10)
    live = tmp / (temp_prefix("hetlora-global-", "r4") + "def")
    live.mkdir()
    unrelated = tmp / "hetlora-globalish"
    unrelated.mkdir()
    coord = make_coordinator(store, None)
    coord.init(init_dir)
    assert coord.step(wait=False) == "waiting"
    assert not dead.exists() and live.is_dir() and unrelated.is_dir()
    assert not [p for p in tmp.iterdir() if p.name.startswith("hetlora-global-") and p != live]


def test_ranks_never_exceed_a_clients_reported_max_rank(store, init_dir, tmp_path):
    # issue 10 item 2 (server side): a client declares the largest rank it can train; every policy respects it
    for policy in ("uniform", RankPolicy("constant", rank=4), RankPolicy("tiers"), {"a": 4, "b": 4, "c": 4, "d": 4}):
        sub = tmp_path / f"p{abs(hash(str(policy)))}"
        own = LocalStore(sub / "fed", create=True) if isinstance(store, LocalStore) else store
        if own is store and store.read_federation() is not None:
            continue  # the Hub store of this test holds one federation: the first policy is enough there
        clients = FakeClients(own, sub / "work", rank_cap={"a": 2, "c": 1})
        coord = make_coordinator(own, clients, rank_policy=policy, clients_per_round=4, rounds=3)
        coord.init(init_dir)
        coord.run()
        for t in range(1, 4):
            ranks = round_info(own, t)["ranks"]
            assert ranks["a"] <= 2 and ranks["c"] == 1, (policy, t, ranks)
        summary = own.read_summary(0)
        assert sorted(summary["accepted"]) == ["a", "b", "c", "d"]  # rank below the assignment is accepted
        assert summary["client_max_ranks"] == {"a": 2, "c": 1}
        assert all(own.read_summary(t)["client_max_ranks"] == {"a": 2, "c": 1} for t in range(3))


def test_hostile_client_text_reaches_neither_card_nor_logs_verbatim(tmp_path, init_dir, caplog):
    # issue 10 item 8: a 60 kB client id in client.json made a 61 kB card
    store = LocalStore(tmp_path / "fed", create=True)
    hostile = "<img src=x onerror=alert(1)>\n[x](http://evil)" + "Z" * 60_000
    clients = FakeClients(store, tmp_path / "work", meta={"a": {"client_id": hostile}})
    coord = make_coordinator(store, clients, rounds=1, clients_per_round=4)
    coord.init(init_dir)
    with caplog.at_level("WARNING"):
        coord.run()
    reason = store.read_summary(0)["rejected"]["a"]
    assert len(reason) <= 500 and "\n" not in reason
    card = (store.path / "README.md").read_text()
    assert len(card) < 4000 and "<img" not in card and "](http" not in card.split("## Rounds")[1]
    assert all(len(r.getMessage()) < 1000 and "\n" not in r.getMessage() for r in caplog.records)
