"""Validation of untrusted client uploads (peft_hetlora.federated.upload)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save, save_file

from peft_hetlora.federated.upload import (
    RejectedUpload,
    UploadSpec,
    read_safetensors_header,
    validate_client_json,
    validate_upload,
)

R_MIN, R_MAX = 1, 4
MODULES = {"base_model.model.l0.q_proj": (6, 5), "base_model.model.l0.v_proj": (6, 3)}
EXTRA = "base_model.model.score.weight"


def global_state() -> dict[str, torch.Tensor]:
    sd = {}
    for name, (d_in, d_out) in MODULES.items():
        sd[f"{name}.lora_A.weight"] = torch.randn(R_MAX, d_in)
        sd[f"{name}.lora_B.weight"] = torch.zeros(d_out, R_MAX)
    sd[EXTRA] = torch.zeros(2, 6)
    return sd


@pytest.fixture
def spec() -> UploadSpec:
    return UploadSpec.from_state_dict(global_state(), r_min=R_MIN, r_max=R_MAX, max_examples=10_000)


def client_state(rank: int, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (d_in, d_out) in MODULES.items():
        sd[f"{name}.lora_A.weight"] = torch.randn(rank, d_in, generator=g).to(dtype)
        sd[f"{name}.lora_B.weight"] = torch.randn(d_out, rank, generator=g).to(dtype)
    sd[EXTRA] = torch.randn(2, 6, generator=g).to(dtype)
    return sd


def client_meta(**overrides) -> dict:
    meta = {
        "client_id": "alice", "round": 3, "rank_in": 3, "rank_out": 2, "num_examples": 120, "train_loss": 1.25,
        "tail_norm_start": 0.5, "tail_norm_end": 0.25, "global_revision": "abc", "peft_hetlora_version": "0.1.0",
    }
    meta.update(overrides)
    return meta


def write_upload(folder, state=None, meta=None, *, raw_adapter: bytes | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    if raw_adapter is not None:
        (folder / "adapter_model.safetensors").write_bytes(raw_adapter)
    else:
        save_file(client_state(2) if state is None else state, str(folder / "adapter_model.safetensors"))
    (folder / "client.json").write_text(json.dumps(client_meta() if meta is None else meta))
    return folder


def raw_safetensors(header: dict, data: bytes, *, length: int | None = None) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def check(folder, spec, **kwargs):
    return validate_upload(folder, spec, client_id="alice", round_idx=3, **kwargs)


def rejected(folder, spec, **kwargs) -> str:
    with pytest.raises(RejectedUpload) as err:
        check(folder, spec, **kwargs)
    return err.value.reason


# ------------------------------------------------------------------------------------------- valid uploads
def test_valid_upload_becomes_a_client_update(tmp_path, spec):
    state = client_state(2, seed=5)
    update = check(write_upload(tmp_path / "u", state), spec)
    assert update.client_id == "alice" and update.rank == 2 and update.num_examples == 120
    assert set(update.state_dict) == set(state)
    for key, value in state.items():
        assert update.state_dict[key].dtype == torch.float32
        np.testing.assert_array_equal(update.state_dict[key].numpy(), value.numpy())
    assert update.metadata["train_loss"] == 1.25
    data = (tmp_path / "u" / "adapter_model.safetensors").read_bytes()
    assert update.metadata["sha256"] == hashlib.sha256(data).hexdigest()
    assert update.metadata["upload_bytes"] == len(data) + len((tmp_path / "u" / "client.json").read_bytes())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_accepted_as_float32(tmp_path, spec, dtype):
    update = check(write_upload(tmp_path / "u", client_state(2, dtype=dtype)), spec)
    assert all(t.dtype == torch.float32 for t in update.state_dict.values())


def test_optional_adapter_config_is_allowed_but_must_be_json(tmp_path, spec):
    folder = write_upload(tmp_path / "u")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "HETLORA", "r": 4}))
    check(folder, spec)
    (folder / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json is not valid JSON" in rejected(folder, spec)


def test_spec_from_safetensors_header_matches_state_dict(tmp_path):
    sd = global_state()
    save_file(sd, str(tmp_path / "g.safetensors"))
    a = UploadSpec.from_safetensors(tmp_path / "g.safetensors", r_min=1, r_max=4)
    b = UploadSpec.from_state_dict(sd, r_min=1, r_max=4)
    assert a == b
    assert dict(a.modules) == MODULES and dict(a.extras) == {EXTRA: (2, 6)}
    # default size limit: twice an r_max adapter in F32 plus header room
    r_max_bytes = 4 * (4 * sum(d_in + d_out for d_in, d_out in MODULES.values()) + 12)
    assert a.max_upload_bytes == 2 * r_max_bytes + 8 + a.max_header_bytes


def test_read_header_accepts_real_safetensors_with_metadata():
    data = save({"x": torch.zeros(2, 3), "y": torch.ones(4, dtype=torch.float16)}, metadata={"format": "pt"})
    entries = read_safetensors_header(data, max_header_bytes=4096)
    assert entries["x"].shape == (2, 3) and entries["y"].dtype == "F16"


# ------------------------------------------------------------------------------------------------ files
def test_pickle_file_is_rejected_without_loading(tmp_path, spec, monkeypatch):
    def boom(*args, **kwargs):  # pragma: no cover - must never run
        raise AssertionError("torch.load must never be called on an upload")

    monkeypatch.setattr(torch, "load", boom)
    folder = tmp_path / "u"
    folder.mkdir()
    torch.save(client_state(2), folder / "adapter_model.bin")
    (folder / "client.json").write_text(json.dumps(client_meta()))
    assert "pickle-based" in rejected(folder, spec)
    # also beside a valid safetensors file, and under other pickle names
    write_upload(folder)
    assert "adapter_model.bin" in rejected(folder, spec)
    os.remove(folder / "adapter_model.bin")
    (folder / "evil.pkl").write_bytes(pickle.dumps({"a": 1}))
    assert "pickle-based" in rejected(folder, spec)


def test_unexpected_files_and_missing_files(tmp_path, spec):
    folder = write_upload(tmp_path / "u")
    (folder / "notes.txt").write_text("hi")
    assert "unexpected file 'notes.txt'" in rejected(folder, spec)
    os.remove(folder / "notes.txt")
    (folder / "sub").mkdir()
    assert "unexpected file 'sub'" in rejected(folder, spec)
    os.rmdir(folder / "sub")
    os.remove(folder / "client.json")
    assert "no client.json" in rejected(folder, spec)
    only_meta = tmp_path / "m"
    only_meta.mkdir()
    (only_meta / "client.json").write_text(json.dumps(client_meta()))
    assert "no adapter_model.safetensors" in rejected(only_meta, spec)


SECRET = b"root:x:0:0:root:/root:/bin/bash\n"


def test_symlinked_files_are_never_followed(tmp_path, spec):
    # issue 10 item 7: a link to any file the coordinator can read was followed and its first 8 bytes came back
    secret = tmp_path / "passwd"
    secret.write_bytes(SECRET)
    real = write_upload(tmp_path / "real")
    for target in (secret, real / "adapter_model.safetensors", Path("/dev/zero"), tmp_path):
        folder = tmp_path / f"u-{abs(hash(str(target)))}"
        folder.mkdir()
        (folder / "client.json").write_text(json.dumps(client_meta()))
        os.symlink(target, folder / "adapter_model.safetensors")
        reason = rejected(folder, spec)
        assert "symbolic link" in reason and "never followed" in reason
        assert not any(part in reason for part in ("root", "3472328296227680882", str(target)))
    folder = write_upload(tmp_path / "meta-link")
    os.remove(folder / "client.json")
    os.symlink(secret, folder / "client.json")
    assert "symbolic link" in rejected(folder, spec)


def test_a_symlinked_upload_folder_is_refused(tmp_path, spec):
    real = write_upload(tmp_path / "real")
    assert check(real, spec).rank == 2
    os.symlink(real, tmp_path / "link")
    assert "upload folder is a symbolic link" in rejected(tmp_path / "link", spec)


def test_fifos_and_folders_are_refused_without_opening_them(tmp_path, spec):
    folder = write_upload(tmp_path / "u")
    os.remove(folder / "adapter_model.safetensors")
    os.mkfifo(folder / "adapter_model.safetensors")  # opening it for reading would block forever
    assert "not a regular file" in rejected(folder, spec)
    os.remove(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").mkdir()
    assert "not a regular file" in rejected(folder, spec)


def test_the_bytes_of_a_non_safetensors_file_are_never_echoed(tmp_path, spec):
    # the header length is the first 8 bytes of the file: a reason must not print it
    folder = write_upload(tmp_path / "u", raw_adapter=SECRET)
    reason = rejected(folder, spec)
    (n,) = struct.unpack("<Q", SECRET[:8])
    assert str(n) not in reason and "root" not in reason
    assert "header" in reason


def test_one_upload_snapshot_even_if_re_uploaded_between_reads(tmp_path, spec, monkeypatch):
    # issue 10 item 11: client.json and the weights were read by path at different moments; a re-upload in
    # between paired one upload's client.json with the other's weights. The interleaving is injected, no sleeps.
    from peft_hetlora.federated.stores import LocalStore
    from peft_hetlora.federated.upload import folder as upload_folder

    store = LocalStore(tmp_path / "store", create=True)
    global_dir = tmp_path / "g"
    global_dir.mkdir()
    save_file(global_state(), str(global_dir / "adapter_model.safetensors"))
    (global_dir / "adapter_config.json").write_text("{}")
    store.publish_global(3, global_dir)
    first = write_upload(tmp_path / "first", client_state(2, seed=1), client_meta(rank_in=2, rank_out=2))
    second = write_upload(tmp_path / "second", client_state(3, seed=2), client_meta(rank_in=3, rank_out=3))
    store.upload_client(3, "alice", first)
    original, fired = upload_folder._read_regular_file, []

    def read_then_reupload(*args, **kwargs):
        data = original(*args, **kwargs)
        if not fired and args[-1] == "client.json":
            fired.append(True)
            store.upload_client(3, "alice", second)  # lands between the client.json read and the weights read
        return data

    monkeypatch.setattr(upload_folder, "_read_regular_file", read_then_reupload)
    update = check(store.download_client(3, "alice"), spec)
    assert fired
    assert update.rank == 2 and update.metadata["rank_out"] == 2
    first_sha = hashlib.sha256((first / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert update.metadata["sha256"] == first_sha
    assert update.state_dict[f"{next(iter(MODULES))}.lora_A.weight"].shape[0] == 2
    # the next read sees the second upload, whole
    monkeypatch.setattr(upload_folder, "_read_regular_file", original)
    assert check(store.download_client(3, "alice"), spec).rank == 3


def _store_with_two_uploads(tmp_path):
    """A LocalStore with round 3 published, alice's first upload in it, and a second upload ready to replace it."""
    from peft_hetlora.federated.stores import LocalStore

    store = LocalStore(tmp_path / "store", create=True)
    global_dir = tmp_path / "g"
    global_dir.mkdir()
    save_file(global_state(), str(global_dir / "adapter_model.safetensors"))
    (global_dir / "adapter_config.json").write_text("{}")
    store.publish_global(3, global_dir)
    first = write_upload(tmp_path / "first", client_state(2, seed=1), client_meta(rank_in=2, rank_out=2))
    second = write_upload(tmp_path / "second", client_state(3, seed=2), client_meta(rank_in=3, rank_out=3))
    for folder in (first, second):
        (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    store.upload_client(3, "alice", first)
    shas = {hashlib.sha256((f / "adapter_model.safetensors").read_bytes()).hexdigest(): rank
            for f, rank in ((first, 2), (second, 3))}
    return store, first, second, shas


def _partial_rmtree(keep: set[str]):
    """A stand-in for shutil.rmtree that stops part-way: the replaced folder is left with only `keep`."""

    def remove(path, ignore_errors=False):
        for entry in os.listdir(path):
            if entry not in keep:
                os.unlink(os.path.join(path, entry))

    return remove


@pytest.mark.parametrize(
    "moment, removed_so_far, expect_rank",
    [
        # issue 22 ("upload has no adapter_model.safetensors", 6 of 14,714 reads): the folder was opened, then
        # replaced, then listed while (or after) the store removed the old folder's files
        ("folder opened", "all", 3),
        ("folder opened", "adapter only", 3),
        ("folder opened", "config only", 3),  # the listing still has both required files: not the whole upload
        ("folder listed", "all", 3),
        ("files opened", "all", 2),  # every file of the old upload already open: the old upload is read whole
    ],
)
def test_a_re_upload_replacing_the_folder_mid_read_is_read_whole(tmp_path, spec, monkeypatch, moment, removed_so_far,
                                                                  expect_rank):
    import shutil

    from peft_hetlora.federated.upload import folder as upload_folder

    store, first, second, shas = _store_with_two_uploads(tmp_path)
    keep = {"all": set(), "adapter only": {"client.json", "adapter_config.json"},
            "config only": {"client.json", "adapter_model.safetensors"}}[removed_so_far]
    fired = []

    def reupload():
        if fired:
            return
        fired.append(moment)
        with monkeypatch.context() as m:  # the store's removal of the replaced folder stops part-way
            m.setattr(shutil, "rmtree", _partial_rmtree(keep))
            store.upload_client(3, "alice", second)

    def wrap(original, *, before_return):
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            before_return()
            return out
        return wrapper

    if moment == "folder opened":
        monkeypatch.setattr(upload_folder, "_open_upload_dir", wrap(upload_folder._open_upload_dir,
                                                                     before_return=reupload))
    elif moment == "folder listed":
        monkeypatch.setattr(os, "listdir", wrap(os.listdir, before_return=reupload))
    else:
        monkeypatch.setattr(upload_folder, "_open_snapshot", wrap(upload_folder._open_snapshot,
                                                                   before_return=reupload))
    update = check(store.download_client(3, "alice"), spec)
    assert fired == [moment]
    assert shas[update.metadata["sha256"]] == expect_rank  # the weights and client.json of one and the same upload
    assert update.rank == update.metadata["rank_in"] == expect_rank
    expected = (first if expect_rank == 2 else second)
    assert update.metadata["upload_bytes"] == sum(p.stat().st_size for p in expected.iterdir())  # every file read


def test_an_upload_that_keeps_changing_is_refused_after_a_bounded_number_of_tries(tmp_path, spec, monkeypatch):
    from peft_hetlora.federated.upload import folder as upload_folder

    store, first, second, _ = _store_with_two_uploads(tmp_path)
    folders, opened = [second, first], []

    def open_then_reupload(folder):
        fd = original(folder)
        opened.append(fd)
        store.upload_client(3, "alice", folders[len(opened) % 2])
        return fd

    original = upload_folder._open_upload_dir
    monkeypatch.setattr(upload_folder, "_open_upload_dir", open_then_reupload)
    monkeypatch.setattr(upload_folder, "_RETRY_PAUSE_S", 0.0)
    assert "kept changing" in rejected(store.download_client(3, "alice"), spec)
    assert len(opened) == upload_folder._SNAPSHOT_ATTEMPTS


def test_an_upload_removed_for_good_mid_read_is_refused_as_missing(tmp_path, spec, monkeypatch):
    import shutil

    from peft_hetlora.federated.upload import folder as upload_folder

    store, _, _, _ = _store_with_two_uploads(tmp_path)
    folder = store.download_client(3, "alice")
    original = upload_folder._open_upload_dir

    def open_then_remove(path):
        fd = original(path)
        shutil.rmtree(path)
        return fd

    monkeypatch.setattr(upload_folder, "_open_upload_dir", open_then_remove)
    monkeypatch.setattr(upload_folder, "_RETRY_PAUSE_S", 0.0)
    assert "does not exist (anymore)" in rejected(folder, spec)


def test_concurrent_re_uploads_are_always_read_whole(tmp_path, spec):
    """A writer thread re-uploads alternately two uploads while the coordinator reads: every read is one whole upload
    (bounded: 60 re-uploads, reads until the writer is done; no sleeps)."""
    import threading

    store, first, second, shas = _store_with_two_uploads(tmp_path)
    folder = store.download_client(3, "alice")
    done, errors = threading.Event(), []

    def writer():
        try:
            for i in range(60):
                store.upload_client(3, "alice", (second, first)[i % 2])
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    ranks = []
    try:
        while not done.is_set() or not ranks:
            update = check(folder, spec)
            assert shas[update.metadata["sha256"]] == update.rank == update.metadata["rank_out"]
            ranks.append(update.rank)
    finally:
        thread.join(timeout=120)
    assert not errors and not thread.is_alive()
    assert set(ranks) <= {2, 3} and len(ranks) >= 1


def test_max_rank_is_optional_and_strictly_typed(spec):
    meta = client_meta(max_rank=3)
    assert validate_client_json(meta, spec, client_id="alice", round_idx=3)["max_rank"] == 3
    for bad in (0, 5, 2.0, True, "3", [3]):
        with pytest.raises(RejectedUpload, match="max_rank"):
            validate_client_json(client_meta(max_rank=bad), spec, client_id="alice", round_idx=3)
    strict = UploadSpec.from_state_dict(global_state(), r_min=2, r_max=R_MAX)
    with pytest.raises(RejectedUpload, match="below the federation's r_min=2"):
        validate_client_json(client_meta(max_rank=1), strict, client_id="alice", round_idx=3)


def test_reasons_are_short_single_lines(spec):
    with pytest.raises(RejectedUpload) as err:
        validate_client_json(client_meta(client_id="x" * 60_000 + "\nforged"), spec, client_id="alice", round_idx=3)
    assert len(err.value.reason) < 300 and "\n" not in err.value.reason


def test_oversized_file_is_rejected_before_reading(tmp_path):
    small = UploadSpec.from_state_dict(global_state(), r_min=R_MIN, r_max=R_MAX, max_upload_bytes=100)
    assert "above the 100-byte limit" in rejected(write_upload(tmp_path / "u"), small)
    # the default limit rejects an adapter far larger than r_max would be, even with valid content
    spec = UploadSpec.from_state_dict(global_state(), r_min=R_MIN, r_max=R_MAX)
    folder = write_upload(tmp_path / "big", raw_adapter=b"\0" * (spec.max_upload_bytes + 1))
    assert "limit" in rejected(folder, spec)


# ------------------------------------------------------------------------------------------- header attacks
def test_corrupt_and_truncated_files(tmp_path, spec):
    rng = np.random.default_rng(0)
    assert "safetensors" in rejected(write_upload(tmp_path / "a", raw_adapter=rng.bytes(500)), spec)
    assert "truncated" in rejected(write_upload(tmp_path / "b", raw_adapter=b"\x01\x02"), spec)
    good = save(client_state(2))
    reason = rejected(write_upload(tmp_path / "c", raw_adapter=good[:-10]), spec)
    assert "past the end" in reason or "data_offsets" in reason
    reason = rejected(write_upload(tmp_path / "d", raw_adapter=good[:40]), spec)
    assert "header" in reason
    assert "not UTF-8" in rejected(write_upload(tmp_path / "e", raw_adapter=struct.pack("<Q", 4) + b"\xff\xfe{}"),
                                   spec)


def test_huge_header_length_is_rejected(tmp_path, spec):
    blob = raw_safetensors({}, b"", length=2**62)
    assert "header" in rejected(write_upload(tmp_path / "a", raw_adapter=blob), spec)
    # within the file but above the header limit
    padded = raw_safetensors({"__metadata__": {"x": "y" * 50_000}}, b"")
    assert "above the" in rejected(write_upload(tmp_path / "b", raw_adapter=padded), spec)


def test_lying_header_offsets_past_eof(tmp_path, spec):
    state = client_state(2)
    header, data, cursor = {}, b"", 0
    for key, tensor in state.items():
        raw = tensor.numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [cursor, cursor + len(raw)]}
        data += raw
        cursor += len(raw)
    # sanity: the hand-built file is valid
    check(write_upload(tmp_path / "ok", raw_adapter=raw_safetensors(header, data)), spec)
    last = max(header, key=lambda k: header[k]["data_offsets"][0])
    lying = json.loads(json.dumps(header))
    lying[last]["data_offsets"][1] += 4096
    lying[last]["shape"] = [lying[last]["shape"][0] * lying[last]["shape"][1] + 1024]  # byte count stays consistent
    assert "past the end" in rejected(write_upload(tmp_path / "a", raw_adapter=raw_safetensors(lying, data)), spec)
    overlap = json.loads(json.dumps(header))
    first = sorted(header, key=lambda k: header[k]["data_offsets"][0])[1]
    overlap[first]["data_offsets"] = [x - 4 for x in overlap[first]["data_offsets"]]
    assert "overlap" in rejected(write_upload(tmp_path / "b", raw_adapter=raw_safetensors(overlap, data)), spec)
    wrong_len = json.loads(json.dumps(header))
    wrong_len[last]["shape"] = [1, 1]
    assert "needs 4" in rejected(write_upload(tmp_path / "c", raw_adapter=raw_safetensors(wrong_len, data)), spec)
    trailing = raw_safetensors(header, data + b"\0" * 8)
    assert "trailing" in rejected(write_upload(tmp_path / "d", raw_adapter=trailing), spec)
    dup = b'{"a": 1, "a": 2}'
    assert "duplicate" in rejected(write_upload(tmp_path / "e", raw_adapter=struct.pack("<Q", len(dup)) + dup), spec)
    bad_entry = {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}
    assert "non-negative" in rejected(write_upload(tmp_path / "f", raw_adapter=raw_safetensors(bad_entry, b"")), spec)


def test_dtype_whitelist(tmp_path, spec):
    state = client_state(2)
    state[EXTRA] = state[EXTRA].to(torch.float64)
    assert "dtype F64" in rejected(write_upload(tmp_path / "a", state), spec)
    state[EXTRA] = torch.zeros(2, 6, dtype=torch.int64)
    assert "dtype I64" in rejected(write_upload(tmp_path / "b", state), spec)


# ------------------------------------------------------------------------------------------- content checks
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected(tmp_path, spec, bad):
    state = client_state(2)
    key = next(iter(MODULES)) + ".lora_B.weight"
    state[key][1, 0] = bad
    reason = rejected(write_upload(tmp_path / "u", state), spec)
    assert key in reason and "non-finite" in reason


def test_nan_in_half_precision_is_rejected(tmp_path, spec):
    state = client_state(2, dtype=torch.bfloat16)
    state[EXTRA][0, 0] = float("nan")
    assert "non-finite" in rejected(write_upload(tmp_path / "u", state), spec)


def test_wrong_keys(tmp_path, spec):
    state = client_state(2)
    del state[EXTRA]
    assert "missing 1 key" in rejected(write_upload(tmp_path / "a", state), spec)
    state = client_state(2)
    state["base_model.model.l0.k_proj.lora_A.weight"] = torch.zeros(2, 6)
    assert "unexpected 1 key" in rejected(write_upload(tmp_path / "b", state), spec)


def test_wrong_shapes(tmp_path, spec):
    name = next(iter(MODULES))
    state = client_state(2)
    state[f"{name}.lora_A.weight"] = torch.zeros(2, 7)  # d_in 7 instead of 6
    assert "are not (k, 6) / (5, k)" in rejected(write_upload(tmp_path / "a", state), spec)
    state = client_state(2)
    state[f"{name}.lora_B.weight"] = torch.zeros(5, 3)  # B rank differs from A rank
    assert "are not (k, 6) / (5, k)" in rejected(write_upload(tmp_path / "b", state), spec)
    state = client_state(2)
    state[EXTRA] = torch.zeros(3, 6)
    assert "expected [2, 6]" in rejected(write_upload(tmp_path / "c", state), spec)
    # tensors at rank 3 while client.json declares rank_out 2
    assert "differs from the declared rank_out=2" in rejected(write_upload(tmp_path / "d", client_state(3)), spec)


def test_rank_above_r_max(tmp_path, spec):
    meta = client_meta(rank_in=5, rank_out=5)
    assert "client.json rank_in 5 is outside [r_min=1, r_max=4]" in rejected(
        write_upload(tmp_path / "a", client_state(5), meta), spec
    )
    # tensors above r_max even if the per-module check were relaxed
    relaxed = UploadSpec.from_state_dict(global_state(), r_min=1, r_max=4, allow_per_module_ranks=True)
    assert "outside [1, r_max=4]" in rejected(write_upload(tmp_path / "b", client_state(5), client_meta(rank_in=4,
                                                                                                          rank_out=4)),
                                              relaxed)


def test_per_module_ranks_when_allowed(tmp_path):
    spec = UploadSpec.from_state_dict(global_state(), r_min=1, r_max=4, allow_per_module_ranks=True)
    state = client_state(3)
    name = next(iter(MODULES))
    state[f"{name}.lora_A.weight"] = state[f"{name}.lora_A.weight"][:1].clone()
    state[f"{name}.lora_B.weight"] = state[f"{name}.lora_B.weight"][:, :1].clone()
    update = check(write_upload(tmp_path / "a", state, client_meta(rank_in=3, rank_out=3)), spec)
    assert update.state_dict[f"{name}.lora_A.weight"].shape == (1, 6)
    assert "above the declared rank_in=2" in rejected(
        write_upload(tmp_path / "b", client_state(3), client_meta(rank_in=2, rank_out=2)), spec
    )


def test_assigned_and_required_rank(tmp_path, spec):
    folder = write_upload(tmp_path / "a", client_state(2), client_meta(rank_in=3, rank_out=2))
    check(folder, spec, assigned_rank=3)
    assert "above the rank 2 assigned" in rejected(folder, spec, assigned_rank=2)
    assert "differs from the rank 3 this method requires" in rejected(folder, spec, required_rank=3)


# ------------------------------------------------------------------------------------------------ client.json
@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"client_id": "bob"}, "does not match the upload's 'alice'"),
        ({"round": 2}, "round 2 does not match round 3"),
        ({"round": True}, "does not match round 3"),
        ({"num_examples": -5}, "num_examples must be an integer in [1, 10000]"),
        ({"num_examples": 0}, "num_examples"),
        ({"num_examples": 10.0}, "num_examples"),
        ({"num_examples": 10**6}, "num_examples"),
        ({"num_examples": True}, "num_examples"),
        ({"rank_in": 0}, "rank_in 0 is outside [r_min=1, r_max=4]"),
        ({"rank_out": "2"}, "rank_out must be an integer"),
        ({"rank_in": 2, "rank_out": 3}, "rank_out 3 is above rank_in 2"),
        ({"train_loss": "low"}, "train_loss must be a finite number"),
        ({"tail_norm_end": -1.0}, "tail_norm_end must be >= 0"),
        ({"global_revision": 7}, "global_revision must be a string"),
    ],
)
def test_bad_client_json_fields(tmp_path, spec, overrides, needle):
    meta = client_meta(**overrides)
    assert needle in rejected(write_upload(tmp_path / "u", meta=meta), spec)


@pytest.mark.parametrize(
    "raw,needle",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"client_id": "alice", "train_loss": NaN}', "non-finite JSON number NaN"),
        (b'{"client_id": "alice", "client_id": "bob"}', "duplicate JSON key"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "limit"),
        (b"[" * 20_000 + b"]" * 20_000, "nested too deeply"),
    ],
)
def test_bad_client_json_documents(tmp_path, spec, raw, needle):
    folder = write_upload(tmp_path / "u")
    (folder / "client.json").write_bytes(raw)
    assert needle in rejected(folder, spec)


def test_validate_client_json_directly(spec):
    meta = validate_client_json(client_meta(), spec, client_id="alice", round_idx=3)
    assert meta["rank_out"] == 2
    # extra fields are kept (forward compatibility)
    assert validate_client_json(client_meta(extra_field=1), spec, client_id="alice", round_idx=3)["extra_field"] == 1
    with pytest.raises(RejectedUpload, match="r_max=4"):
        validate_client_json(client_meta(rank_in=9, rank_out=9), spec, client_id="alice", round_idx=3)


def test_errors_join_the_one_hierarchy():
    from peft_hetlora.federated import settings
    from peft_hetlora.federated.coordinator import coordinator
    from peft_hetlora.utils import errors

    assert issubclass(RejectedUpload, errors.HetLoRAError)
    assert coordinator.CoordinatorError is errors.CoordinatorError
    assert issubclass(errors.CoordinatorError, RuntimeError)
    assert settings.FederationMismatch is errors.FederationMismatch
    assert issubclass(errors.FederationMismatch, errors.CoordinatorError)


def test_a_missing_upload_folder_is_a_clear_rejection(tmp_path, spec):
    assert "does not exist" in rejected(tmp_path / "nowhere", spec)


# ------------------------------------------------------------------------------------- property tests (hostile input)
# Whatever a client writes, validation either accepts an upload that really is valid (checked here field by field,
# independently of the code) or refuses it with `RejectedUpload`; no other exception ever escapes.
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from peft_hetlora.federated.upload import (  # noqa: E402
    MAX_REASON_CHARS,  # noqa: E402
    MessageFormatError,
    parse_message_format,
    validate_update,  # noqa: E402
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ("client_id", "round", "rank_in", "rank_out", "num_examples", "max_rank", "components", "message_format",
          "train_loss", "tail_norm_start", "tail_norm_end", "global_revision", "peft_hetlora_version")
_json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 6)
                 | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=5)
                            | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=12)
_formats = st.sampled_from(["fp32", "bf16", "fp16", "int8", "int8-block64", "int8-block0", "int8-block-3", "FP32",
                            " bf16", "int8-block" + "9" * 30, "fp8", "", "f" * 41]) | st.text(max_size=8)
_targeted = {  # values near the edges of what each field allows, besides arbitrary JSON
    "rank_in": st.integers(-1, R_MAX + 2), "rank_out": st.integers(-1, R_MAX + 2),
    "max_rank": st.integers(-1, R_MAX + 2), "num_examples": st.integers(-1, 10_001) | st.just(10**9),
    "components": st.lists(st.integers(-2, R_MAX + 1), max_size=R_MAX + 2), "message_format": _formats,
    "round": st.integers(2, 4), "client_id": st.sampled_from(["alice", "bob", "Alice", "alice\n"]),
    "train_loss": st.floats(), "tail_norm_start": st.floats(), "tail_norm_end": st.floats(),
}


@st.composite
def _hostile_meta(draw) -> dict:
    meta = client_meta(rank_in=R_MAX, rank_out=2)
    for name in draw(st.sets(st.sampled_from(FIELDS), max_size=5)):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            meta.pop(name, None)
        elif choice == 1 or name not in _targeted:
            meta[name] = draw(_json_values)
        else:
            meta[name] = draw(_targeted[name])
    return meta


def _fuzz_spec(message_formats=None) -> UploadSpec:
    return UploadSpec.from_state_dict(global_state(), r_min=R_MIN, r_max=R_MAX, max_examples=10_000,
                                      message_formats=message_formats)


def _is_plain_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _assert_truly_valid(update, meta: dict, spec: UploadSpec, assigned_rank, assigned_components) -> None:
    """What an accepted report must satisfy, spelled out from docs/federation.md, not from the code."""
    assert meta["client_id"] == "alice" and _is_plain_int(meta["round"]) and meta["round"] == 3
    assert _is_plain_int(meta["num_examples"]) and 1 <= meta["num_examples"] <= spec.max_examples
    for name in ("rank_in", "rank_out"):
        assert _is_plain_int(meta[name]) and spec.r_min <= meta[name] <= spec.r_max
    assert meta["rank_out"] <= meta["rank_in"] and update.rank == meta["rank_out"]
    if assigned_rank is not None:
        assert meta["rank_in"] <= assigned_rank
    if meta.get("max_rank") is not None:
        assert _is_plain_int(meta["max_rank"]) and spec.r_min <= meta["max_rank"] <= spec.r_max
    comps = meta.get("components")
    if comps is not None:
        allowed = assigned_components if assigned_components is not None else range(assigned_rank or spec.r_max)
        assert isinstance(comps, list) and len(comps) == meta["rank_out"] == len(set(comps))
        assert all(_is_plain_int(j) and j in allowed for j in comps) and len(comps) <= meta["rank_in"]
        assert list(update.components) == comps
    elif assigned_components is not None:
        assert list(assigned_components) == list(range(len(assigned_components)))  # a prefix needs no report
    declared = meta.get("message_format")
    name = "fp32" if declared is None else declared
    assert spec.message_formats is None or name in spec.message_formats
    for field_name in ("train_loss", "tail_norm_start", "tail_norm_end"):
        value = meta.get(field_name)
        assert value is None or (not isinstance(value, bool) and isinstance(value, (int, float))
                                 and np.isfinite(value))
    for field_name in ("global_revision", "peft_hetlora_version"):
        value = meta.get(field_name)
        assert value is None or (isinstance(value, str) and len(value) <= 256)
    for key, tensor in update.state_dict.items():
        assert tensor.dtype == torch.float32 and bool(torch.isfinite(tensor).all()), key


def _adapter_for(meta: dict) -> dict[str, torch.Tensor]:
    """Weights of the rank the report declares (when it is a usable rank), so that acceptance is reachable."""
    rank = meta.get("rank_out")
    return client_state(rank if _is_plain_int(rank) and 1 <= rank <= R_MAX else 2, seed=3)


@FUZZ
@given(meta=_hostile_meta(), assigned_rank=st.none() | st.integers(1, R_MAX),
       assigned_components=st.none() | st.lists(st.integers(0, R_MAX - 1), min_size=1, max_size=R_MAX, unique=True),
       formats=st.none() | st.lists(st.sampled_from(["fp32", "bf16", "fp16", "int8"]), min_size=1, unique=True))
def test_hostile_client_json_fields_are_accepted_only_when_valid(meta, assigned_rank, assigned_components, formats):
    spec = _fuzz_spec(formats)
    try:
        update = validate_update(_adapter_for(meta), meta, spec, client_id="alice", round_idx=3,
                                 assigned_rank=assigned_rank, assigned_components=assigned_components)
    except RejectedUpload as err:
        assert err.reason and "\n" not in err.reason and len(err.reason) <= MAX_REASON_CHARS
        event("refused")
        return
    event("accepted")
    _assert_truly_valid(update, update.metadata, spec, assigned_rank, assigned_components)
    declared = meta.get("message_format")
    if declared is not None:  # accepted: a real format, and F32 tensors only under fp32
        try:
            assert parse_message_format(declared).name == "fp32"
        except MessageFormatError:  # pragma: no cover - would mean an unknown format was accepted
            pytest.fail(f"unknown message_format {declared!r} accepted")


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=200).map(str.encode)
       | _hostile_meta().map(lambda m: json.dumps(m, allow_nan=True).encode()))
def test_hostile_client_json_bytes_are_refused_or_valid(raw):
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        meta = None
    spec = _fuzz_spec()
    adapter = _adapter_for(meta if isinstance(meta, dict) else {})
    try:
        update = validate_update(adapter, raw, spec, client_id="alice", round_idx=3)
    except RejectedUpload as err:
        assert err.reason and "\n" not in err.reason and len(err.reason) <= MAX_REASON_CHARS
        return
    assert isinstance(meta, dict)
    _assert_truly_valid(update, update.metadata, spec, None, None)


def _valid_adapter_bytes(rank: int = 2) -> bytes:
    return save({k: v.contiguous() for k, v in client_state(rank, seed=4).items()})


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       cut=st.none() | st.integers(0, 2000), extra=st.binary(max_size=16))
def test_hostile_adapter_bytes_are_refused_or_decode_to_finite_float32(edits, cut, extra):
    data = bytearray(_valid_adapter_bytes())
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    data += extra
    spec = _fuzz_spec()
    try:
        update = validate_update(bytes(data), client_meta(rank_in=R_MAX, rank_out=2), spec, client_id="alice",
                                 round_idx=3)
    except RejectedUpload as err:
        assert err.reason and "\n" not in err.reason and len(err.reason) <= MAX_REASON_CHARS
        return
    assert update.rank == 2 and set(update.state_dict) == set(client_state(2))
    for key, tensor in update.state_dict.items():
        assert tensor.shape == client_state(2)[key].shape and tensor.dtype == torch.float32
        assert bool(torch.isfinite(tensor).all())


_dtypes = st.sampled_from(["F32", "F16", "BF16", "I8", "F64", "U8", "x"]) | _json_values
_entries = _json_values | st.fixed_dictionaries({
    "dtype": _dtypes, "shape": st.lists(st.integers(-2, 12) | _json_values, max_size=3),
    "data_offsets": st.lists(st.integers(-2, 2**66) | _json_values, max_size=3)})


@FUZZ
@given(header=st.dictionaries(st.text(max_size=40) | st.sampled_from(sorted(client_state(2))), _entries, max_size=6),
       payload=st.binary(max_size=400))
def test_hostile_safetensors_headers_are_refused_or_valid(header, payload):
    try:
        blob = json.dumps(header).encode()
    except (TypeError, ValueError):
        return
    data = struct.pack("<Q", len(blob)) + blob + payload
    try:
        update = validate_update(data, client_meta(rank_in=R_MAX, rank_out=2), _fuzz_spec(), client_id="alice",
                                 round_idx=3)
    except RejectedUpload as err:
        assert err.reason and "\n" not in err.reason and len(err.reason) <= MAX_REASON_CHARS
        return
    for key, tensor in update.state_dict.items():  # pragma: no cover - a fuzzed header rarely makes a valid upload
        assert tensor.shape == client_state(2)[key].shape and bool(torch.isfinite(tensor).all())


def _reupload_until(store_path: str, first: str, second: str, stop) -> None:
    from peft_hetlora.federated.stores import LocalStore

    store, i = LocalStore(store_path), 0
    while not stop.is_set():
        store.upload_client(3, "alice", (second, first)[i % 2])
        i += 1


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix" or not hasattr(os, "fork"), reason="forks a writer process")
def test_5000_reads_against_a_re_uploading_process_are_all_whole(tmp_path, spec):
    """Issue 22's measurement: another process re-uploads without pause while 5,000 reads run (before the fix, 8 of
    5,000 were refused "upload has no adapter_model.safetensors"). Every read must be one whole upload."""
    import collections
    import multiprocessing

    store, first, second, shas = _store_with_two_uploads(tmp_path)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    writer = ctx.Process(target=_reupload_until, args=(str(store.path), str(first), str(second), stop))
    writer.start()
    outcomes: collections.Counter = collections.Counter()
    folder = store.download_client(3, "alice")
    try:
        for _ in range(5000):
            try:
                update = check(folder, spec)
            except RejectedUpload as err:
                outcomes[err.reason] += 1
                continue
            outcomes["whole" if shas[update.metadata["sha256"]] == update.rank else "mixed"] += 1
    finally:
        stop.set()
        writer.join(timeout=60)
    assert writer.exitcode == 0
    assert outcomes == {"whole": 5000}, dict(outcomes)


# ------------------------------------------------------------------------------ the arrows of upload/ (issue 23)
def test_upload_modules_import_no_face_and_run_one_way():
    try:
        from tests.test_light_import import import_graph
    except ImportError:  # pragma: no cover
        from test_light_import import import_graph
    graph = {m: d for m, d in import_graph().items() if m.startswith("peft_hetlora.federated.upload.")}
    up = "peft_hetlora.federated.upload."
    order = [up + "bytes", up + "formats", up + "validation", up + "folder"]  # each may import only those before it
    assert sorted(graph) == sorted(order)
    for i, module in enumerate(order):
        siblings = {d for d in graph[module] if d.startswith(up)}
        assert siblings <= set(order[:i]), f"{module} imports {sorted(siblings - set(order[:i]))}"
        faces = {"peft_hetlora.federated", "peft_hetlora.federated.upload"} & graph[module]
        assert faces == set(), f"{module} imports the face {faces}"
