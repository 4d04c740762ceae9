"""Compressed messages end to end: the client encodes its upload, the coordinator checks the declared format, decodes
to float32, aggregates, and records the bytes as sent.

References are independent: bf16 / int8 decoding is done here by hand (bf16 -> float32 is exact; int8 is
``code * absmax / 127`` per block of 64), then the numpy HetLoRA rule of `tests/reference.py`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from peft_hetlora.federated import Coordinator, LocalStore
from peft_hetlora.federated.aggregation import ClientUpdate
from peft_hetlora.federated.upload import SCALE_SUFFIX, RejectedUpload, UploadSpec, encode_state_dict, validate_update
from tests import reference
from tests.test_callbacks import _train, make_model
from tests.test_component_wiring import _initial_adapter
from trainer_callbacks import FederatedClientCallback

R_MAX = 8


def _coordinator(tmp_path, clients, **kwargs):
    settings = dict(method="hetlora", r_max=R_MAX, r_min=1, clients=clients, rank_policy=dict.fromkeys(clients, 4),
                    rounds=1, progress=False)
    settings.update(kwargs)
    coord = Coordinator(LocalStore(tmp_path / "fed", create=True), **settings)
    coord.init(_initial_adapter(tmp_path))
    return coord


def _client_round(tmp_path, coord, cid, fmt, **kwargs):
    model = make_model(rank=R_MAX, r=R_MAX, seed=0)
    client = FederatedClientCallback(coord.store, cid, prune=False, message_format=fmt, **kwargs)
    _train(tmp_path / cid, model, [client], max_steps=2)
    return client


def _payload_bytes(data: bytes) -> int:
    (n,) = struct.unpack("<Q", data[:8])
    return len(data) - 8 - n


def _hand_decode(data: bytes) -> dict[str, torch.Tensor]:
    tensors = load_bytes(data)
    out = {}
    for key, value in tensors.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if value.dtype == torch.int8:
            scale = tensors[key + SCALE_SUFFIX].numpy().astype(np.float64)
            codes = value.numpy().reshape(-1).astype(np.float64)
            per_value = np.repeat(scale, 64)[: codes.size]
            out[key] = torch.from_numpy((codes * per_value / 127.0).reshape(tuple(value.shape)))
        else:
            out[key] = value.to(torch.float64)
    return out


def _uploads(coord, ids):
    files, updates = {}, []
    for cid in ids:
        folder = Path(coord.store.download_client(0, cid))
        files[cid] = (folder / "adapter_model.safetensors").read_bytes()
        meta = json.loads((folder / "client.json").read_text())
        updates.append(ClientUpdate(cid, _hand_decode(files[cid]), meta["rank_out"], meta["num_examples"]))
    return files, updates


def _assert_global_is_reference(coord, updates):
    expected, _, _ = reference.hetlora(updates, R_MAX, coord.scaling)
    new = reference.np_modules(load_file(str(Path(coord.store.get_global(1).path) / "adapter_model.safetensors")))
    for name, (a, b) in expected.items():
        np.testing.assert_allclose(new[name][0], a, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(new[name][1], b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_bf16_upload_halves_the_bytes_and_the_global_is_the_reference_on_the_decoded_tensors(tmp_path):
    coord = _coordinator(tmp_path, ["a", "b"])
    _client_round(tmp_path, coord, "a", "fp32")
    client_b = _client_round(tmp_path, coord, "b", "bf16")
    files, updates = _uploads(coord, ["a", "b"])
    assert _payload_bytes(files["b"]) * 2 == _payload_bytes(files["a"])
    assert client_b.upload_bytes[0] == len(files["b"])
    assert {k: v.dtype for k, v in load_bytes(files["b"]).items()} == dict.fromkeys(load_bytes(files["b"]),
                                                                                  torch.bfloat16)
    summary = coord.close_round(0)
    assert summary["accepted"] == ["a", "b"]
    assert summary["clients"]["b"]["message_format"] == "bf16" and summary["clients"]["a"]["message_format"] == "fp32"
    for cid in ("a", "b"):  # bytes as sent: the adapter file plus client.json
        client_json = (Path(coord.store.download_client(0, cid)) / "client.json").read_bytes()
        assert summary["clients"][cid]["upload_bytes"] == len(files[cid]) + len(client_json)
    _assert_global_is_reference(coord, updates)


def test_int8_upload_with_error_feedback_is_decoded_before_aggregation(tmp_path):
    coord = _coordinator(tmp_path, ["a", "b"])
    _client_round(tmp_path, coord, "a", "fp32")
    client_b = _client_round(tmp_path, coord, "b", "int8-block64", error_feedback=True)
    files, updates = _uploads(coord, ["a", "b"])
    assert _payload_bytes(files["b"]) < 0.3 * _payload_bytes(files["a"])
    assert client_b.error_feedback.residual  # the quantisation residual is kept for the next round
    summary = coord.close_round(0)
    assert summary["accepted"] == ["a", "b"] and summary["clients"]["b"]["message_format"] == "int8-block64"
    _assert_global_is_reference(coord, updates)


def _lying_folder(tmp_path, name, tensors, fmt, rank=4):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(save_bytes(tensors, metadata={"format": "pt"}))
    report = {"client_id": name, "round": 0, "rank_in": rank, "rank_out": rank, "num_examples": 8,
              "message_format": fmt}
    (folder / "client.json").write_text(json.dumps(report))
    return folder


def test_lying_uploads_are_rejected_with_a_reason_and_the_round_goes_on(tmp_path):
    coord = _coordinator(tmp_path, ["a", "liar16", "nanscale"], min_clients=1)
    _client_round(tmp_path, coord, "a", "fp32")
    honest = load_bytes(Path(coord.store.download_client(0, "a")).joinpath("adapter_model.safetensors").read_bytes())
    # declares bf16, sends fp32
    coord.store.upload_client(0, "liar16", _lying_folder(tmp_path, "liar16", honest, "bf16"))
    # declares int8 with a NaN scale
    encoded = encode_state_dict(honest, "int8-block64")
    first_scale = next(k for k in sorted(encoded) if k.endswith(SCALE_SUFFIX))
    encoded[first_scale] = encoded[first_scale].clone()
    encoded[first_scale][0] = float("nan")
    coord.store.upload_client(0, "nanscale", _lying_folder(tmp_path, "nanscale", encoded, "int8-block64"))
    summary = coord.close_round(0)
    assert summary["accepted"] == ["a"]
    assert "declares message_format 'bf16'" in summary["rejected"]["liar16"]
    assert "NaN" in summary["rejected"]["nanscale"]


def _spec(**kwargs):
    return UploadSpec(modules={"m": (6, 5)}, r_min=1, r_max=R_MAX, **kwargs)


def _state(rank=3):
    gen = torch.Generator().manual_seed(0)
    return {"m.lora_A.weight": torch.randn(rank, 6, generator=gen),
            "m.lora_B.weight": torch.randn(5, rank, generator=gen)}


def _report(fmt):
    return {"client_id": "a", "round": 0, "rank_in": 3, "rank_out": 3, "num_examples": 4, "message_format": fmt}


@pytest.mark.parametrize(
    ("tensors", "fmt", "match"),
    [
        (lambda: {k: v.to(torch.float16) for k, v in _state().items()}, "bf16", "allows only"),
        (lambda: {k: v for k, v in encode_state_dict(_state(), "int8-block64").items()
                  if not k.endswith(SCALE_SUFFIX)}, "int8-block64", "missing"),
        (lambda: {**encode_state_dict(_state(), "int8-block64"),
                  "m.lora_A.weight" + SCALE_SUFFIX: torch.ones(5)}, "int8-block64", "needs float32 scales"),
        (lambda: encode_state_dict(_state(), "int8-block64"), "int8-block8", "needs float32 scales"),
        (lambda: _state(), "zip9", "Unknown message_format"),
        (lambda: {**encode_state_dict(_state(), "int8-block64"),
                  "m.lora_A.weight": torch.full((3, 6), -128, dtype=torch.int8)}, "int8-block64", "-128"),
    ],
)
def test_a_message_that_does_not_match_its_declaration_is_rejected(tensors, fmt, match):
    with pytest.raises(RejectedUpload, match=match):
        validate_update(tensors(), _report(fmt), _spec(), client_id="a", round_idx=0)


def test_an_honest_message_decodes_to_float32_and_the_federation_may_restrict_formats():
    state = _state()
    update = validate_update(encode_state_dict(state, "bf16"), _report("bf16"), _spec(), client_id="a", round_idx=0)
    assert update.state_dict["m.lora_A.weight"].dtype == torch.float32
    expected = state["m.lora_A.weight"].to(torch.bfloat16).float()
    torch.testing.assert_close(update.state_dict["m.lora_A.weight"], expected, rtol=0, atol=0)
    with pytest.raises(RejectedUpload, match="not allowed by this federation"):
        validate_update(encode_state_dict(state, "bf16"), _report("bf16"), _spec(message_formats=("int8-block64",)),
                        client_id="a", round_idx=0)
    # "int8" is "int8-block64": the allowed list is normalised
    assert validate_update(encode_state_dict(state, "int8-block64"), _report("int8"),
                           _spec(message_formats=("int8",)), client_id="a", round_idx=0).rank == 3


@pytest.mark.parametrize("allowed", [("bf16",), ("bf16", "int8-block64"), ("fp16",)])
def test_an_omitted_message_format_is_fp32_and_restricted_like_a_declared_one(allowed):
    """Issue 22: in a bf16-only federation an upload without message_format (plain fp32) was accepted while one
    declaring "fp32" was refused; both are now refused with the same sentence, and both pass where fp32 is allowed."""
    state = _state()
    omitted = {k: v for k, v in _report("fp32").items() if k != "message_format"}
    errors = []
    for report in (_report("fp32"), omitted):
        with pytest.raises(RejectedUpload) as caught:
            validate_update(state, report, _spec(message_formats=allowed), client_id="a", round_idx=0)
        errors.append(caught.value.reason)
    same = f"client.json message_format 'fp32' is not allowed by this federation (allowed: {list(allowed)})"
    assert errors[0].startswith(same) and errors[1].startswith(same)
    assert "has no message_format" in errors[1]
    for report in (_report("fp32"), omitted):
        update = validate_update(state, report, _spec(message_formats=(*allowed, "fp32")), client_id="a", round_idx=0)
        np.testing.assert_array_equal(update.state_dict["m.lora_A.weight"].numpy(), state["m.lora_A.weight"].numpy())


def test_coordinator_records_and_enforces_message_formats(tmp_path):
    coord = _coordinator(tmp_path, ["a"], message_formats=["bf16", "int8"])
    assert coord.store.read_federation()["message_formats"] == ["bf16", "int8-block64"]
    _client_round(tmp_path, coord, "a", "fp32")
    summary = coord.close_round(0)
    assert summary["accepted"] == [] and "not allowed" in summary["rejected"]["a"]
