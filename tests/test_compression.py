"""Compressed adapter messages against hand computations in numpy, and hostile messages."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from peft_hetlora.federated.upload import (
    MESSAGE_FORMAT_FIELD,
    SCALE_SUFFIX,
    ErrorFeedback,
    MessageFormatError,
    decode_message,
    decode_state_dict,
    encode_message,
    encode_state_dict,
    message_spec,
    parse_message_format,
    payload_nbytes,
)
from peft_hetlora.utils.errors import HetLoRAError

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def adapter(rank: int = 6, d_in: int = 96, d_out: int = 80, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {KEY_A: torch.randn(rank, d_in, generator=g) * 0.1, KEY_B: torch.randn(d_out, rank, generator=g) * 0.02}


def numpy_blockwise(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hand blockwise absmax int8: codes, per-block absmax, and the de-quantised values (float64)."""
    flat = x.astype(np.float64).reshape(-1)
    n_blocks = math.ceil(flat.size / block)
    codes = np.zeros(flat.size, dtype=np.int64)
    absmax = np.zeros(n_blocks)
    for i in range(n_blocks):
        chunk = flat[i * block : (i + 1) * block]
        absmax[i] = np.abs(chunk).max()
        if absmax[i] > 0:
            codes[i * block : (i + 1) * block] = np.round(chunk / absmax[i] * 127)
    deq = codes * np.repeat(absmax, block)[: flat.size] / 127
    return codes.reshape(x.shape), absmax, deq.reshape(x.shape)


# ----------------------------------------------------------------------------- formats
def test_format_names_and_specs():
    assert parse_message_format(None).name == "fp32"
    assert parse_message_format("int8").name == "int8-block64"
    assert parse_message_format("int8-block32").block_size == 32
    spec = message_spec("int8-block32")
    assert spec.value_dtypes == {"I8"} and spec.scale_dtypes == {"F32"}
    assert spec.expected_keys([KEY_A]) == {KEY_A, KEY_A + SCALE_SUFFIX}
    assert spec.scale_shape((6, 96)) == (18,) and spec.scale_shape((80, 6)) == (15,)
    assert message_spec("bf16").value_dtypes == {"BF16"} and message_spec("bf16").expected_keys([KEY_A]) == {KEY_A}
    assert message_spec("fp16").value_dtypes == {"F16"} and message_spec(None).value_dtypes == {"F32"}
    assert MESSAGE_FORMAT_FIELD == "message_format"
    for bad in ("int4", "int8-block0", "int8-block3", "bf16 ", "int8-block99999999", 16):
        with pytest.raises(MessageFormatError):
            parse_message_format(bad)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("block", [64, 50])
def test_int8_blockwise_matches_the_hand_quantisation(block):
    state = adapter()
    state[KEY_A][2, 5:40] = 0.0  # a block that is mostly zero
    encoded = encode_state_dict(state, f"int8-block{block}")
    decoded = decode_state_dict(encoded, f"int8-block{block}")
    for key, value in state.items():
        x = value.double().numpy()
        codes, absmax, deq = numpy_blockwise(x, block)
        np.testing.assert_array_equal(encoded[key].numpy(), codes)
        np.testing.assert_allclose(encoded[key + SCALE_SUFFIX].double().numpy(), absmax, rtol=1e-7)
        np.testing.assert_allclose(decoded[key].double().numpy(), deq, rtol=1e-6, atol=1e-9)
        assert decoded[key].dtype == torch.float32 and decoded[key].shape == value.shape
        bound = np.repeat(absmax, block)[: x.size].reshape(x.shape) / 254 + 1e-7
        assert np.all(np.abs(decoded[key].double().numpy() - x) <= bound)


def test_all_zero_tensor_round_trips_to_zero():
    decoded = decode_state_dict(encode_state_dict({KEY_B: torch.zeros(8, 4)}, "int8-block16"), "int8-block16")
    assert torch.equal(decoded[KEY_B], torch.zeros(8, 4))


@pytest.mark.parametrize("fmt,dtype,rel", [("bf16", torch.bfloat16, 2.0**-8), ("fp16", torch.float16, 2.0**-11)])
def test_half_formats_round_to_nearest_and_halve_the_payload(fmt, dtype, rel):
    state = adapter()
    encoded = encode_state_dict(state, fmt)
    decoded = decode_message(encode_message(state, fmt), fmt)
    for key, value in state.items():
        assert encoded[key].dtype == dtype
        x = value.double().numpy()
        # round-to-nearest: relative error at most half an ulp (2^-8 for bf16's 8-bit significand)
        # (fp16 subnormals below 2^-14 have a fixed step of 2^-24: half of it absolute)
        assert np.all(np.abs(decoded[key].double().numpy() - x) <= np.abs(x) * rel + 2.0**-25)
    assert payload_nbytes(encoded) * 2 == payload_nbytes(encode_state_dict(state, "fp32"))


def test_bytes_as_sent_bf16_halves_and_int8_quarters():
    state = adapter(rank=16, d_in=576, d_out=576)
    sizes = {fmt: len(encode_message(state, fmt)) for fmt in ("fp32", "bf16", "int8-block64")}
    fp32_payload = sum(t.numel() * 4 for t in state.values())
    header = sizes["fp32"] - fp32_payload
    assert 0 < header < 1024
    assert abs(sizes["bf16"] - fp32_payload / 2) < 1024  # exactly half the tensor bytes, plus the header
    numel = sum(t.numel() for t in state.values())
    int8_payload = numel + 4 * sum(math.ceil(t.numel() / 64) for t in state.values())
    assert abs(sizes["int8-block64"] - int8_payload) < 1024
    assert sizes["int8-block64"] / sizes["fp32"] < 0.25 + 1 / 64 + 0.01


def test_fp16_overflow_is_refused_not_turned_into_inf():
    with pytest.raises(MessageFormatError, match="exceed"):
        encode_state_dict({KEY_A: torch.full((2, 2), 1e6)}, "fp16")


# ----------------------------------------------------------------------------- error feedback
def test_error_feedback_decoded_messages_sum_to_the_true_ones_minus_the_last_residual():
    ef = ErrorFeedback()
    g = torch.Generator().manual_seed(3)
    true_sum = np.zeros((6, 40))
    decoded_sum = np.zeros((6, 40))
    for _ in range(5):
        value = torch.randn(6, 40, generator=g)
        sent = value.double().numpy() + (ef.residual[KEY_A].double().numpy() if ef.residual else 0.0)
        message = encode_state_dict({KEY_A: value}, "int8-block16", error_feedback=ef)
        decoded_sum += decode_state_dict(message, "int8-block16")[KEY_A].double().numpy()
        true_sum += value.double().numpy()
    np.testing.assert_allclose(decoded_sum + ef.residual[KEY_A].double().numpy(), true_sum, atol=1e-5)
    _, absmax, deq = numpy_blockwise(sent, 16)  # the last residual is that round's quantisation error
    np.testing.assert_allclose(ef.residual[KEY_A].double().numpy(), sent - deq, atol=1e-5)


def test_error_feedback_keeps_the_surviving_components_when_the_rank_shrinks():
    ef = ErrorFeedback()
    ef.load_state_dict({KEY_A: torch.arange(12.0).view(4, 3)})
    shrunk = ef.add(KEY_A, torch.zeros(2, 3))
    assert torch.equal(shrunk, torch.arange(6.0).view(2, 3))


# ----------------------------------------------------------------------------- hostile messages
def int8_message(block: int = 16) -> dict[str, torch.Tensor]:
    return encode_state_dict(adapter(rank=2, d_in=24, d_out=20), f"int8-block{block}")


@pytest.mark.parametrize("bad_value", [float("inf"), float("nan"), -1.0])
def test_hostile_scales_are_rejected(bad_value):
    message = int8_message()
    message[KEY_A + SCALE_SUFFIX][1] = bad_value
    with pytest.raises(MessageFormatError, match="NaN, inf or negative") as info:
        decode_state_dict(message, "int8-block16")
    assert isinstance(info.value, HetLoRAError)


def test_wrong_scale_shape_or_dtype_or_block_size_is_rejected():
    message = int8_message()
    message[KEY_A + SCALE_SUFFIX] = message[KEY_A + SCALE_SUFFIX][:-1]
    with pytest.raises(MessageFormatError, match=r"shape \(3,\)"):
        decode_state_dict(message, "int8-block16")
    message = int8_message()
    message[KEY_A + SCALE_SUFFIX] = message[KEY_A + SCALE_SUFFIX].double()
    with pytest.raises(MessageFormatError, match="float32"):
        decode_state_dict(message, "int8-block16")
    with pytest.raises(MessageFormatError, match="shape"):  # declared block size disagrees with the scales
        decode_state_dict(int8_message(block=16), "int8-block32")


def test_missing_or_orphan_scales_and_wrong_dtypes_are_rejected():
    message = int8_message()
    del message[KEY_B + SCALE_SUFFIX]
    with pytest.raises(MessageFormatError, match="missing"):
        decode_state_dict(message, "int8-block16")
    message = int8_message()
    del message[KEY_B]
    with pytest.raises(MessageFormatError, match="without a matching"):
        decode_state_dict(message, "int8-block16")
    with pytest.raises(MessageFormatError, match="allows only"):  # float32 tensors declared as bf16
        decode_state_dict(adapter(), "bf16")
    with pytest.raises(MessageFormatError, match="allows only"):  # float tensors declared as int8
        decode_state_dict(encode_state_dict(adapter(), "bf16"), "int8-block16")
    message = int8_message()
    message[KEY_A][0, 0] = -128
    with pytest.raises(MessageFormatError, match="-128"):
        decode_state_dict(message, "int8-block16")
    with pytest.raises(MessageFormatError, match="NaN or inf"):
        decode_state_dict({KEY_A: torch.tensor([1.0, float("inf")], dtype=torch.bfloat16)}, "bf16")


def test_message_bytes_must_agree_with_the_declaration_and_parse():
    data = encode_message(adapter(), "bf16")
    with pytest.raises(MessageFormatError, match="declared"):
        decode_message(data, "fp16")
    with pytest.raises(MessageFormatError, match="not a valid safetensors"):
        decode_message(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "bf16")
    # a file without the metadata (e.g. written by another client library) is judged on its tensors alone
    plain = save_safetensors(encode_state_dict(adapter(), "fp16"))
    assert decode_message(plain, "fp16")[KEY_A].dtype == torch.float32


def test_module_depends_only_on_torch_safetensors_and_the_standard_library():
    import ast

    import peft_hetlora.federated.upload.formats as module

    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots - set(sys.stdlib_module_names) == {"torch", "safetensors"}
