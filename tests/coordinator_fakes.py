"""Fake clients, a counting clock, the initial adapter and numpy expectations for the coordinator tests."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file, save_file

from peft_hetlora.federated.coordinator import Coordinator
from peft_hetlora.federated.stores import LocalStore

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
    """Independent numpy aggregation of {cid: (state, meta)} (per-client weights, docs/design.md#aggregation)."""
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


@pytest.fixture(name="init_dir")
def init_dir_fixture(tmp_path) -> Path:
    return initial_adapter(tmp_path / "init", r_max=4)


@pytest.fixture(name="store")
def local_store_fixture(tmp_path) -> LocalStore:
    """A fresh LocalStore (these tests use only the folder backend; the contract tests cover the Hub)."""
    return LocalStore(tmp_path / "fed", create=True)


# ------------------------------------------------------------------------------------------------ end to end

class Killed(BaseException):
    """A simulated crash (BaseException, so nothing in the coordinator can swallow it)."""
