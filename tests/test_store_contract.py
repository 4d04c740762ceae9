"""The AdapterStore contract, run against LocalStore, HubStore (client repos) and HubStore (pull requests).

The `store` fixture (conftest.py) is the coordinator's store; `client_store(id)` is the same store as a client
sees it (its own token on the Hub). LocalStore-only behaviour (disk errors, processes) is at the end.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from peft_hetlora.federated.stores import (
    AdapterStore,
    ClientUploadNotFoundError,
    GlobalNotPublishedError,
    HubStore,
    LocalStore,
    RetryPolicy,
    StoreNotFoundError,
    validate_client_id,
)
from peft_hetlora.utils.errors import HetLoRAError, StoreFullError

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def make_adapter(folder: Path, seed: int, rank: int = 4, *, round_info: dict | None = None,
                 client_info: dict | None = None, config: bool = True) -> Path:
    """A tiny adapter folder: safetensors weights (+ adapter_config.json, round.json / client.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({KEY_A: rng.standard_normal((rank, 8)).astype(np.float32),
               KEY_B: rng.standard_normal((8, rank)).astype(np.float32)}, str(folder / "adapter_model.safetensors"))
    if config:
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8}))
    if round_info is not None:
        (folder / "round.json").write_text(json.dumps(round_info))
    if client_info is not None:
        (folder / "client.json").write_text(json.dumps(client_info))
    return folder


def make_global(tmp_path: Path, round_idx: int, seed: int, participants=("alice", "bob", "carol", "dave")) -> Path:
    info = {"round": round_idx, "participants": list(participants), "ranks": {c: 4 for c in participants},
            "r_max": 4, "r_min": 1, "method": "hetlora"}
    return make_adapter(tmp_path / f"global-{round_idx}-{seed}", seed, round_info=info)


def make_client(tmp_path: Path, round_idx: int, client_id: str, seed: int, **kwargs) -> Path:
    info = {"client_id": client_id, "round": round_idx, "rank_in": 4, "rank_out": 4, "num_examples": 10}
    return make_adapter(tmp_path / f"client-{client_id}-{round_idx}-{seed}", seed, client_info=info, **kwargs)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Killed(BaseException):
    """A process killed in the middle of a write (not an Exception: nothing may catch it on the way)."""


def root_file(store, name: str, request) -> bytes:
    """A file at the store's root (the latest-global copy, the model card)."""
    if isinstance(store, LocalStore):
        return (store.path / name).read_bytes()
    return request.getfixturevalue("hub_double").files(store.repo_id)[name]


# ------------------------------------------------------------------------------------------------- contract
def test_is_an_adapter_store(store):
    assert isinstance(store, AdapterStore)


def test_empty_store(store):
    assert store.read_federation() is None
    assert store.latest_global() is None
    assert store.read_summary(0) is None
    assert store.list_client_uploads(0) == []
    with pytest.raises(GlobalNotPublishedError, match="must publish"):
        store.get_global(0)


def test_federation_roundtrip(store):
    store.write_federation({"base_model": "org/base", "r_min": 2, "r_max": 16, "method": "hetlora"})
    assert store.read_federation()["r_max"] == 16
    store.write_federation({"base_model": "org/base", "r_min": 2, "r_max": 8})
    assert store.read_federation() == {"base_model": "org/base", "r_min": 2, "r_max": 8}


def test_publish_latest_and_get_global(store, tmp_path, request):
    g0, g1 = make_global(tmp_path, 0, seed=0), make_global(tmp_path, 1, seed=1)
    rev0 = store.publish_global(0, g0)
    assert rev0 == sha256(g0 / "adapter_model.safetensors")
    latest = store.latest_global()
    assert (latest.round, latest.revision) == (0, rev0)
    for name in ("adapter_model.safetensors", "adapter_config.json", "round.json"):
        assert (latest.path / name).read_bytes() == (g0 / name).read_bytes()
    assert root_file(store, "adapter_model.safetensors", request) == (g0 / "adapter_model.safetensors").read_bytes()

    rev1 = store.publish_global(1, g1)
    assert rev1 != rev0 and store.latest_global().round == 1
    assert store.get_global(0).revision == rev0
    np.testing.assert_array_equal(load_file(str(store.get_global(1).path / "adapter_model.safetensors"))[KEY_A],
                                  load_file(str(g1 / "adapter_model.safetensors"))[KEY_A])
    assert root_file(store, "adapter_model.safetensors", request) == (g1 / "adapter_model.safetensors").read_bytes()
    assert json.loads(root_file(store, "round.json", request))["round"] == 1


def test_republish_is_idempotent_and_rounds_are_immutable(store, tmp_path, request):
    g0, g1 = make_global(tmp_path, 0, seed=0), make_global(tmp_path, 1, seed=1)
    rev0 = store.publish_global(0, g0)
    store.publish_global(1, g1)
    assert store.publish_global(0, g0) == rev0  # again: same revision, no error
    again = make_global(tmp_path, 0, seed=0, participants=["zoe"])  # same weights, other round.json
    assert store.publish_global(0, again) == rev0
    assert json.loads((store.get_global(0).path / "round.json").read_text())["participants"][0] == "alice"
    assert store.latest_global().round == 1  # an older round never takes the root back
    assert root_file(store, "adapter_model.safetensors", request) == (g1 / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="immutable"):
        store.publish_global(0, make_global(tmp_path, 0, seed=7))
    assert store.get_global(0).revision == rev0


def test_publish_checks_the_folder(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        store.publish_global(0, make_adapter(tmp_path / "noconfig", 0, config=False))
    with pytest.raises(ValueError, match="round 3"):
        store.publish_global(0, make_adapter(tmp_path / "wrong", 0, round_info={"round": 3}))


def test_upload_list_download(store, client_store, tmp_path):
    store.publish_global(0, make_global(tmp_path, 0, seed=0))
    up = make_client(tmp_path, 0, "alice", seed=10)
    (up / "extra.pkl").write_bytes(b"never uploaded")
    client_store("alice").upload_client(0, "alice", up)
    assert store.list_client_uploads(0) == ["alice"]
    assert store.list_client_uploads(1) == []
    folder = store.download_client(0, "alice")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "client.json"]
    for name in ("adapter_model.safetensors", "client.json", "adapter_config.json"):
        assert (folder / name).read_bytes() == (up / name).read_bytes()
    with pytest.raises(ClientUploadNotFoundError):
        store.download_client(0, "bob")


def test_reupload_replaces(store, client_store, tmp_path):
    store.publish_global(0, make_global(tmp_path, 0, seed=0))
    alice = client_store("alice")
    alice.upload_client(0, "alice", make_client(tmp_path, 0, "alice", seed=10))
    second = make_client(tmp_path, 0, "alice", seed=11, config=False)
    alice.upload_client(0, "alice", second)
    assert store.list_client_uploads(0) == ["alice"]
    folder = store.download_client(0, "alice")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_model.safetensors", "client.json"]
    assert sha256(folder / "adapter_model.safetensors") == sha256(second / "adapter_model.safetensors")


def test_upload_needs_a_published_round(store, client_store, tmp_path):
    with pytest.raises(GlobalNotPublishedError, match="must publish"):
        client_store("alice").upload_client(0, "alice", make_client(tmp_path, 0, "alice", seed=1))
    with pytest.raises(FileNotFoundError, match="client.json"):
        client_store("alice").upload_client(0, "alice", make_adapter(tmp_path / "nojson", 1))


def test_half_written_upload_is_never_listed(store, client_store, tmp_path, monkeypatch, request):
    store.publish_global(0, make_global(tmp_path, 0, seed=0))
    up = make_client(tmp_path, 0, "alice", seed=10)
    if isinstance(store, LocalStore):
        from peft_hetlora.federated.stores import local as local_store

        real_copy = local_store._copy_file

        def copy_then_die(src, dst):
            real_copy(src, dst)
            raise Killed  # the process dies after the first file

        monkeypatch.setattr(local_store, "_copy_file", copy_then_die)
        with pytest.raises(Killed):
            client_store("alice").upload_client(0, "alice", up)
        clients = store.path / "rounds" / "0" / "clients"
        assert list(clients.iterdir()) == []  # the staging folder is gone too
        (clients / ".tmp-bob-x1").mkdir()  # what a SIGKILLed upload leaves behind
        (clients / ".tmp-bob-x1" / "adapter_model.safetensors").write_bytes(b"partial")
        (clients / "carol").mkdir()  # a folder without client.json is not an upload
        monkeypatch.undo()
    else:
        alice = client_store("alice")
        alice.hub.retry = RetryPolicy(max_retries=0)
        request.getfixturevalue("hub_double").inject("commit", 500)
        with pytest.raises(Exception, match="500"):
            alice.upload_client(0, "alice", up)
    assert store.list_client_uploads(0) == []
    client_store("alice").upload_client(0, "alice", up)
    assert store.list_client_uploads(0) == ["alice"]
    if isinstance(store, LocalStore):  # what a killed client left behind goes once it is old
        os.utime(clients / ".tmp-bob-x1", (0, 0))
        client_store("bob").upload_client(0, "bob", make_client(tmp_path, 0, "bob", seed=2))
        assert sorted(p.name for p in clients.iterdir()) == ["alice", "bob", "carol"]


def test_clients_upload_at_once_from_threads(store, client_store, tmp_path):
    ids = ["alice", "bob", "carol", "dave"]
    store.publish_global(0, make_global(tmp_path, 0, seed=0, participants=ids))
    folders = {cid: make_client(tmp_path, 0, cid, seed=i) for i, cid in enumerate(ids)}
    clients = {cid: client_store(cid) for cid in ids}
    barrier, errors = threading.Barrier(len(ids)), []

    def upload(cid):
        try:
            barrier.wait()
            clients[cid].upload_client(0, cid, folders[cid])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=upload, args=(cid,)) for cid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.list_client_uploads(0) == ids
    for cid in ids:
        assert sha256(store.download_client(0, cid) / "adapter_model.safetensors") == sha256(
            folders[cid] / "adapter_model.safetensors")


BAD_IDS = ["", "../x", "a/b", "..", "a..b", ".hidden", "-a", "a b", "x" * 65, "é", "a\\b", None, 3]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_bad_client_ids_are_rejected(bad):
    with pytest.raises(ValueError, match="Invalid client id"):
        validate_client_id(bad)


def test_bad_client_ids_are_rejected_by_the_store(store, tmp_path):
    store.publish_global(0, make_global(tmp_path, 0, seed=0))
    up = make_client(tmp_path, 0, "alice", seed=1)
    for bad in ("../alice", "a/b", ".."):
        with pytest.raises(ValueError, match="Invalid client id"):
            store.upload_client(0, bad, up)
        with pytest.raises(ValueError, match="Invalid client id"):
            store.download_client(0, bad)
    assert validate_client_id("Client_07.v2-x") == "Client_07.v2-x"


def test_bad_round_indices_are_rejected(store):
    for bad in (-1, True, "0", 1.0):
        with pytest.raises(ValueError, match="round"):
            store.read_summary(bad)


def test_summaries_and_model_card(store, tmp_path, request):
    store.write_federation({"base_model": "org/base", "r_min": 2, "r_max": 4, "method": "hetlora"})
    store.publish_global(0, make_global(tmp_path, 0, seed=0))
    summary = {"accepted": ["alice", "bob"], "rejected": {"carol": "non-finite values"},
               "weights": {"alice": 0.25, "bob": 0.75}, "metrics": {"train_loss": 1.2345}}
    store.write_summary(0, summary)
    assert store.read_summary(0) == summary
    assert store.read_summary(1) is None
    store.publish_global(1, make_global(tmp_path, 1, seed=1))
    card = root_file(store, "README.md", request).decode()
    assert "library_name: peft" in card and "base_model: org/base" in card
    assert "| 0 | 2: alice, bob | carol (non-finite values) | train_loss=1.234 |" in card
    assert "Latest published round: **1**" in card


# ---------------------------------------------------------------------------------------- LocalStore only
def test_local_missing_folder_says_how_to_create(tmp_path):
    with pytest.raises(StoreNotFoundError, match=r"create=True"):
        LocalStore(tmp_path / "nope")
    assert LocalStore(tmp_path / "nope", create=True).path.is_dir()


def test_local_full_disk_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    from peft_hetlora.federated.stores import local as local_store

    store = LocalStore(tmp_path / "store", create=True)
    store.publish_global(0, make_global(tmp_path, 0, seed=0))
    real_copy = local_store._copy_file

    def copy_until_full(src, dst):
        if Path(src).name == "client.json":
            Path(dst).write_bytes(b'{"half')
            raise OSError(errno.ENOSPC, "No space left on device")
        real_copy(src, dst)

    monkeypatch.setattr(local_store, "_copy_file", copy_until_full)
    with pytest.raises(StoreFullError, match=r"No space left.*rounds/0/clients/alice") as info:
        store.upload_client(0, "alice", make_client(tmp_path, 0, "alice", seed=1))
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert "\n" not in str(info.value) and str(info.value).startswith("No space left")
    assert list((store.path / "rounds" / "0" / "clients").iterdir()) == []
    assert store.list_client_uploads(0) == []

    def write_until_full(fd, data):
        os.write(fd, data[:3])
        os.close(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_store, "_write_fd", write_until_full)
    with pytest.raises(OSError, match=r"No space left.*summary.json"):
        store.write_summary(0, {"accepted": []})
    assert store.read_summary(0) is None
    assert not [p for p in (store.path / "rounds" / "0").iterdir() if p.name.startswith(".tmp")]


def _upload_repeatedly(store_path: str, client_id: str, folder: str, start) -> None:
    store = LocalStore(store_path)
    start.wait()
    for _ in range(5):  # each client uploads (and re-uploads) at the same time as the others
        store.upload_client(0, client_id, folder)


@pytest.mark.skipif(sys.platform != "linux", reason="forks the test process (a spawned one re-imports torch)")
def test_local_clients_upload_at_once_from_processes(tmp_path):
    import multiprocessing

    store = LocalStore(tmp_path / "store", create=True)
    ids = [f"c{i}" for i in range(4)]
    store.publish_global(0, make_global(tmp_path, 0, seed=0, participants=ids))
    folders = {cid: make_client(tmp_path, 0, cid, seed=i) for i, cid in enumerate(ids)}
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_upload_repeatedly, args=(str(store.path), cid, str(folders[cid]), start))
             for cid in ids]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * len(ids)
    assert store.list_client_uploads(0) == ids
    leftovers = [p.name for p in (store.path / "rounds" / "0" / "clients").iterdir() if p.name not in ids]
    assert leftovers == []
    for cid in ids:
        assert sha256(store.download_client(0, cid) / "client.json") == sha256(folders[cid] / "client.json")


def test_local_root_loads_with_peft(tmp_path):
    """PeftModel.from_pretrained(store_path) loads the latest global adapter from the store's root."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    try:  # pytest puts tests/ on sys.path when tests/ is not a package ...
        from tiny_models import saved_lora_llama
    except ImportError:  # ... and the repository root when it is
        from tests.tiny_models import saved_lora_llama

    model, config = saved_lora_llama(tmp_path / "g")
    (tmp_path / "g" / "round.json").write_text(json.dumps({"round": 0, "participants": []}))
    store = LocalStore(tmp_path / "store", create=True)
    store.publish_global(0, tmp_path / "g")
    torch.manual_seed(0)
    loaded = peft.PeftModel.from_pretrained(LlamaForCausalLM(config), str(store.path))
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_stores_face_exports_both_backends():
    import peft_hetlora.federated as face
    from peft_hetlora.federated import stores

    assert HubStore.__module__ == "peft_hetlora.federated.stores.hub"
    assert LocalStore.__module__ == "peft_hetlora.federated.stores.local"
    assert face.HubStore is stores.HubStore is HubStore and face.LocalStore is stores.LocalStore is LocalStore


# ------------------------------------------------------------------------------------------ issue 10 defects
def test_store_errors_are_hetlora_errors_with_their_builtin_bases():
    from peft_hetlora.federated.stores import UploadTooLargeError

    for cls, base in ((StoreNotFoundError, FileNotFoundError), (GlobalNotPublishedError, LookupError),
                      (ClientUploadNotFoundError, LookupError), (UploadTooLargeError, ValueError)):
        assert issubclass(cls, HetLoRAError) and issubclass(cls, base)


def test_every_json_the_stores_write_is_strict(store, tmp_path):
    # issue 10 item 9: summary.json held Infinity; strict JSON has no NaN / Infinity
    store.publish_global(0, make_global(tmp_path, 0, seed=0))
    for bad in (float("inf"), float("nan"), -float("inf")):
        with pytest.raises(ValueError, match="non-finite.*metrics.train_loss"):
            store.write_summary(0, {"accepted": [], "metrics": {"train_loss": bad}})
        with pytest.raises(ValueError, match="non-finite"):
            store.write_federation({"r_max": 4, "scaling": bad})
    assert store.read_summary(0) is None


HOSTILE = ('<img src=x onerror="alert(1)"> [click](http://evil.example) ![p](http://evil.example/p.png) '
           '**bold** `code` | cell | <script>x</script>\n# heading\n' + "A" * 60_000)


def test_model_card_escapes_and_caps_untrusted_text(store, tmp_path, request):
    # issue 10 item 8: client.json text went verbatim into the card (links, <img onerror>, a 61 kB card)
    store.write_federation({"base_model": "org/base", "r_max": 4, "method": HOSTILE})
    store.publish_global(0, make_global(tmp_path, 0, seed=0))
    summary = {"accepted": ["alice", HOSTILE], "rejected": {f"c{i}": HOSTILE for i in range(100)},
               "metrics": {"train_loss": 1.5, HOSTILE: 2.0}}
    store.write_summary(0, summary)
    card = root_file(store, "README.md", request).decode()
    assert len(card.encode()) < 12_000
    body = card.split("## Federation", 1)[1]  # what comes from the settings and the summaries
    for needle in ("<img", "<script", "](http", "![", "**bold**", "`code`", "\n# heading"):
        assert needle not in body, needle
    assert "&lt;img" in body and "more)" in body and "A" * 200 not in body
    rows = [line for line in body.splitlines() if line.startswith("| 0 |")]
    assert len(rows) == 1 and rows[0].count(" | ") == 3  # one table row, its cells unbroken


def test_local_client_folders_that_are_links_are_not_uploads(tmp_path):
    # issue 10 item 7: the upload folder itself (or a folder above it) may be a link
    store = LocalStore(tmp_path / "store", create=True)
    store.publish_global(0, make_global(tmp_path, 0, seed=0))
    store.upload_client(0, "alice", make_client(tmp_path, 0, "alice", seed=1))
    outside = make_client(tmp_path, 0, "mallory", seed=2)
    clients = store.path / "rounds" / "0" / "clients"
    os.symlink(outside, clients / "mallory")
    assert store.list_client_uploads(0) == ["alice"]
    with pytest.raises(ClientUploadNotFoundError):
        store.download_client(0, "mallory")
    # a linked `clients` folder hides every upload behind it
    os.rename(clients, store.path / "rounds" / "0" / "real-clients")
    os.symlink(store.path / "rounds" / "0" / "real-clients", clients)
    assert store.list_client_uploads(0) == []
    with pytest.raises(ClientUploadNotFoundError):
        store.download_client(0, "alice")


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_local_temporary_files_of_dead_writers_are_cleaned_live_ones_kept(tmp_path):
    # issue 10 item 12: `.tmp-*` leaked after kill -9; the cleaner must never delete a live writer's file
    from peft_hetlora.federated.stores.temp_files import _HOST, temp_prefix

    store = LocalStore(tmp_path / "store", create=True)
    store.publish_global(0, make_global(tmp_path, 0, seed=0))
    store.upload_client(0, "alice", make_client(tmp_path, 0, "alice", seed=1))
    clients = store.path / "rounds" / "0" / "clients"
    dead = f"p{_dead_pid()}@{_HOST}~"
    leftovers = [store.path / f".tmp-{dead}README.md-x1", clients / f".tmp-{dead}alice-x2",
                 store.path / "rounds" / "0" / f".tmp-{dead}global-x3"]
    leftovers[0].write_text("half")
    leftovers[1].mkdir()
    (leftovers[1] / "client.json").write_text("{")
    leftovers[2].mkdir()
    live = clients / (temp_prefix(".tmp-", "bob") + "x4")  # this process: alive
    live.mkdir()
    foreign = clients / ".tmp-p1@otherhost~carol-x5"  # another host: kept until it is a day old
    foreign.mkdir()
    removed = store.clean_temporary_files()
    assert sorted(removed) == sorted(leftovers)
    assert not any(p.exists() for p in leftovers)
    assert live.is_dir() and foreign.is_dir() and store.list_client_uploads(0) == ["alice"]
    os.utime(foreign, (0, 0))
    assert store.clean_temporary_files() == [foreign]


def test_local_temporary_names_carry_the_writer(tmp_path, monkeypatch):
    from peft_hetlora.federated.stores import local as local_store

    store = LocalStore(tmp_path / "store", create=True)
    seen = []
    real = local_store._copy_file

    def spy(src, dst):
        seen.append(Path(dst).parent.name if Path(dst).parent != store.path else Path(dst).name)
        real(src, dst)

    monkeypatch.setattr(local_store, "_copy_file", spy)
    store.publish_global(0, make_global(tmp_path, 0, seed=0))
    store.upload_client(0, "alice", make_client(tmp_path, 0, "alice", seed=1))
    assert seen and all(name.startswith(f".tmp-p{os.getpid()}@") for name in seen)


def test_local_root_left_stale_by_a_crash_is_repaired_by_publishing_again(tmp_path, monkeypatch):
    # issue 10 item 10: a kill or ENOSPC between rounds/T/global and the root left the root at T-1
    from peft_hetlora.federated.stores import local as local_store

    store = LocalStore(tmp_path / "store", create=True)
    store.publish_global(0, make_global(tmp_path, 0, seed=0))
    real = local_store._atomic_copy

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_store, "_atomic_copy", full)
    with pytest.raises(StoreFullError):
        store.publish_global(1, make_global(tmp_path, 1, seed=1))
    monkeypatch.setattr(local_store, "_atomic_copy", real)
    latest = store.latest_global()
    assert latest.round == 1 and json.loads((store.path / "round.json").read_text())["round"] == 0
    assert store.publish_global(1, latest.path) == latest.revision
    assert json.loads((store.path / "round.json").read_text())["round"] == 1
    assert sha256(store.path / "adapter_model.safetensors") == latest.revision


# ------------------------------------------------------------------------------ the arrows of stores/ (issue 23)
def package_imports(package: str) -> dict[str, set[str]]:
    """module of `package` -> the package modules it imports (test_light_import's reader of the import graph)."""
    try:
        from tests.test_light_import import import_graph
    except ImportError:  # pragma: no cover
        from test_light_import import import_graph
    return {m: deps for m, deps in import_graph().items() if m.startswith(package + ".")}


def test_stores_import_only_each_other_and_the_leaf():
    graph = package_imports("peft_hetlora.federated.stores")
    assert {"peft_hetlora.federated.stores.base", "peft_hetlora.federated.stores.hub"} <= set(graph)
    for module, deps in graph.items():
        outside = sorted(d for d in deps if not d.startswith(("peft_hetlora.federated.stores.", "peft_hetlora.utils")))
        assert outside == [], f"{module} imports {outside} (a store stands on the leaf alone, never on a face)"
    assert not graph["peft_hetlora.federated.stores.base"] - {"peft_hetlora.utils.constants",
                                                                "peft_hetlora.utils.errors"}
