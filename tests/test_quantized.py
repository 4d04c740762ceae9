"""HetLoRA on quantised bases (bitsandbytes 8-bit / 4-bit, torchao int8) against independent computations.

The de-quantised weights are rebuilt here in numpy from the raw quantised storage (int8 codes and row
scales, NF4 nibbles and block absmax), never with the backend's or peft_hetlora's de-quantise helpers;
the float reference is a float tiny Llama carrying those weights plus s * B[:, :k] A[:k].
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_hetlora import HetLoRAConfig, export_lora
from peft_hetlora.quantization import (
    UnsupportedQuantizationError,
    check_quantize_mode,
    load_quantized_base,
    quantization_summary,
    quantize_model_,
)
from peft_hetlora.quantized_layers import (
    HetLoRALinear4bit,
    HetLoRALinear8bitLt,
    HetLoRATorchaoLinear,
    dispatch_quantized,
    quantized_backend,
)
from peft_hetlora.utils.errors import HetLoRAError

try:
    from tiny_models import one_thread_per_module, randomize_adapter, tiny_llama, token_batch  # noqa: F401  (autouse fixture)
except ImportError:  # pragma: no cover
    from tests.tiny_models import one_thread_per_module, randomize_adapter, tiny_llama, token_batch  # noqa: F401  (autouse fixture)

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
MODES = [
    pytest.param("8bit", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")),
    pytest.param("4bit", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")),
    pytest.param("torchao-int8", marks=pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed")),
]
LAYER_CLASS = {"8bit": HetLoRALinear8bitLt, "4bit": HetLoRALinear4bit, "torchao-int8": HetLoRATorchaoLinear}
TARGETS = ["q_proj", "v_proj", "down_proj"]
SHAPE = dict(hidden_size=64, intermediate_size=128)  # bitsandbytes' 4-bit blocks are 64 values


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(**SHAPE).save_pretrained(path)
    return str(path)


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def independent_dequant(base: torch.nn.Module) -> np.ndarray:
    """De-quantised weight rebuilt from the raw storage (out x in, float64)."""
    weight = base.weight
    name = type(weight).__name__
    if name == "Int8Params":  # LLM.int8: row-wise absmax, W = CB * SCB / 127
        scb = weight.SCB if weight.SCB is not None else base.state.SCB  # bitsandbytes moves it on first use
        return np64(weight.data) * np64(scb)[:, None] / 127.0
    if name == "Params4bit":  # NF4: two 4-bit codes per byte (high nibble first), one absmax per block
        state = weight.quant_state
        assert not getattr(state, "packing_format_for_cpu", False), "read the blockwise layout before CPU repacking"
        packed = weight.data.cpu().numpy().reshape(-1)
        codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)
        values = np64(state.code)[codes] * np.repeat(np64(state.absmax), state.blocksize)[: codes.size]
        return values.reshape(tuple(state.shape))
    if name == "Int8Tensor":  # torchao weight-only int8: per-row scale, symmetric
        return np64(weight.qdata) * np64(weight.scale).reshape(-1, 1)
    raise AssertionError(f"unexpected weight type {name}")


def hetlora_model(model_dir: str, mode: str, rank: int = 4, r: int = 8, **config) -> PeftModel:
    base = load_quantized_base(model_dir, mode)
    config = HetLoRAConfig(r=r, rank=rank, lora_alpha=16, target_modules=TARGETS, **config)
    model = get_peft_model(base, config)
    randomize_adapter(model, seed=3, std=0.2)
    return model


def hetlora_layers(model: PeftModel) -> dict[str, torch.nn.Module]:
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if hasattr(module, "lora_rank_mask")
    }


def float_reference(model: PeftModel) -> torch.nn.Module:
    """A float64 tiny Llama (same init) whose quantised layers carry their independent de-quantisation,
    plus s * B[:, :k] A[:k] on the HetLoRA targets, computed in numpy."""
    ref = tiny_llama(**SHAPE).double()
    layers = hetlora_layers(model)
    for name, module in model.base_model.model.named_modules():
        if ".lora_" in name or hasattr(module, "base_layer") or quantized_backend(module) is None:
            continue
        weight = independent_dequant(module)
        owner = name.removesuffix(".base_layer")
        if owner in layers:
            layer = layers[owner]
            k = layer.get_active_rank("default")
            a, b = np64(layer.lora_A["default"].weight)[:k], np64(layer.lora_B["default"].weight)[:, :k]
            weight = weight + (16 / 8) * b @ a
        with torch.no_grad():
            ref.get_submodule(owner).weight.copy_(torch.from_numpy(weight))
    return ref


# ----------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("mode", MODES)
def test_dispatch_wraps_every_target_in_the_backend_layer(model_dir, mode):
    model = hetlora_model(model_dir, mode)
    layers = hetlora_layers(model)
    assert len(layers) == 2 * len(TARGETS)
    assert all(type(layer) is LAYER_CLASS[mode] for layer in layers.values())
    assert all(layer.lora_A["default"].weight.dtype == torch.float32 for layer in layers.values())
    summary = quantization_summary(model)
    assert summary["mode"] == mode and summary["quantized_layers"] == 14 and summary["float_linear_layers"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_quantised_weight_is_within_the_formats_rounding_of_the_float_weight(model_dir, mode):
    """The independent de-quantisation is the backend's: rounding error below half a quantisation step."""
    model = hetlora_model(model_dir, mode)
    float_model = tiny_llama(**SHAPE)
    for name, layer in hetlora_layers(model).items():
        w = np64(float_model.get_submodule(name).weight)
        deq = independent_dequant(layer.get_base_layer())
        np.testing.assert_allclose(np64(layer.dequantized_base_weight()), deq, rtol=1e-6, atol=1e-7)
        if mode == "4bit":
            code = np.sort(np64(layer.get_base_layer().weight.quant_state.code))
            half_gap = np.max(np.diff(code)) / 2
            absmax = np.repeat(np.abs(w).reshape(-1, 64).max(axis=1), 64).reshape(w.shape)
            assert np.all(np.abs(w - deq) <= absmax * half_gap + 1e-6)
        elif mode == "8bit":  # bitsandbytes rounds W to fp16 first: half an int8 step + fp16 rounding
            step = np64(layer.get_base_layer().weight.SCB)[:, None] / 127.0
            assert np.all(np.abs(w - deq) <= step / 2 + np.abs(w) * 2.0**-11 + 1e-9)
        else:
            step = np.abs(w).max(axis=1, keepdims=True) / 127.0
            assert np.all(np.abs(w - deq) <= step / 2 + 1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_forward_equals_float_path_with_the_dequantised_weight(model_dir, mode):
    model = hetlora_model(model_dir, mode)
    model.set_rank(3)
    ids = token_batch(batch=2, length=8)
    model.train()  # the training path (what a client runs); 4-bit eval repacks weights for a bf16 CPU kernel
    with torch.no_grad():
        got = np64(model(ids).logits)
        expected = np64(float_reference(model)(ids).logits)
    # torchao int8 is weight-only: exact up to float32 rounding. bitsandbytes 8-bit also quantises the
    # activations row-wise to int8 (via fp16), 4-bit computes in float32 from the de-quantised weight.
    tolerance = {"torchao-int8": 1e-4, "4bit": 1e-4, "8bit": 2e-2}[mode]
    np.testing.assert_allclose(got, expected, atol=tolerance * np.abs(expected).max())


@pytest.mark.parametrize("mode", MODES)
def test_layer_adds_exactly_the_active_slice_to_the_quantised_base_output(model_dir, mode):
    model = hetlora_model(model_dir, mode)
    model.set_rank(2)
    layer = hetlora_layers(model)["model.layers.0.mlp.down_proj"]
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta = np64(layer(x)) - np64(layer.get_base_layer()(x))
    a, b = np64(layer.lora_A["default"].weight)[:2], np64(layer.lora_B["default"].weight)[:, :2]
    np.testing.assert_allclose(delta, 2.0 * np64(x) @ a.T @ b.T, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_only_the_active_slice_and_never_the_base(model_dir, mode):
    model = hetlora_model(model_dir, mode, rank=4)
    model.set_rank(2)
    model.train()
    ids = token_batch()
    model(ids, labels=ids).loss.backward()
    for layer in hetlora_layers(model).values():
        ga, gb = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
        assert ga.shape[0] == 4 and torch.all(ga[2:] == 0) and torch.all(gb[:, 2:] == 0)
        assert ga[:2].abs().sum() > 0 and gb[:, :2].abs().sum() > 0
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("mode", MODES)
def test_regulariser_is_lambda_times_hand_tail_norm_and_pruning_fires(model_dir, mode):
    lam, gamma = 0.5, 0.6
    model = hetlora_model(model_dir, mode, rank=5, prune_lambda=lam, prune_gamma=gamma, r_min=2)
    model.train()
    ids = token_batch()
    t = min(math.floor(gamma * 5), 4)  # 3
    hand = sum(
        np.linalg.norm(np64(layer.lora_B["default"].weight)[:, t:5])
        * np.linalg.norm(np64(layer.lora_A["default"].weight)[t:5])
        for layer in hetlora_layers(model).values()
    )
    with_reg = model(ids, labels=ids).loss
    model.peft_config["default"].prune_lambda = 0.0
    without = model(ids, labels=ids).loss
    model.peft_config["default"].prune_lambda = lam
    assert with_reg.item() - without.item() == pytest.approx(lam * hand, rel=1e-4)

    reference = float(model.tail_norm())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    assert float(model.tail_norm()) < reference  # the regulariser shrank the tail ...
    assert model.prune(reference) == t  # ... so the rank drops to max(r_min, t)


# ----------------------------------------------------------------------------- save / load / export
@pytest.mark.parametrize("mode", MODES)
def test_save_load_round_trip_on_a_fresh_quantised_base(model_dir, mode, tmp_path):
    model = hetlora_model(model_dir, mode, rank=4)
    model.set_rank(3)
    model.train()
    ids = token_batch()
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(v.shape[0] == 3 for k, v in saved.items() if ".lora_A." in k)
    assert all(v.shape[1] == 3 for k, v in saved.items() if ".lora_B." in k)
    assert all(v.dtype == torch.float32 for v in saved.values())

    reloaded = PeftModel.from_pretrained(load_quantized_base(model_dir, mode), tmp_path / "adapter")
    assert reloaded.get_rank() == 3
    reloaded.train()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, before, rtol=0, atol=1e-6)

    out = export_lora(model, tmp_path / "lora")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    plain = PeftModel.from_pretrained(load_quantized_base(model_dir, mode), out)  # PEFT's own quantised LoRA
    plain.train()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_merge_and_unmerge_stay_within_requantisation_error(model_dir, mode):
    model = hetlora_model(model_dir, mode)
    if mode == "torchao-int8":
        assert hetlora_layers(model)["model.layers.0.self_attn.q_proj"].get_apply_tensor_subclass is not None
    layer = hetlora_layers(model)["model.layers.1.self_attn.v_proj"]
    w0 = np64(layer.dequantized_base_weight())
    expected = w0 + np64(layer.get_delta_weight("default"))
    layer.merge()
    merged = np64(layer.dequantized_base_weight())
    step = np.abs(expected).max(axis=1, keepdims=True) / (6.0 if mode == "4bit" else 127.0)  # >= one code step
    assert np.all(np.abs(merged - expected) <= step)
    layer.unmerge()
    assert not layer.merged
    assert np.all(np.abs(np64(layer.dequantized_base_weight()) - w0) <= 2 * step)


def test_in_place_quantisation_of_a_loaded_model_matches_loading_quantised():
    if not HAS_BNB:
        pytest.skip("bitsandbytes not installed")
    model = quantize_model_(tiny_llama(**SHAPE), "8bit")
    assert quantized_backend(model.model.layers[0].mlp.up_proj) == "bnb-8bit"
    assert type(model.lm_head) is torch.nn.Linear  # skipped by default, like transformers
    ids = token_batch()
    with torch.no_grad():
        float_logits = tiny_llama(**SHAPE)(ids).logits
        err = (model(ids).logits - float_logits).abs().max()
    assert 0 < err < 0.05 * float_logits.abs().max()


# ----------------------------------------------------------------------------- refusals
def test_unsupported_quantised_layers_are_refused_naming_the_supported_ones():
    fake = types.new_class("HQQLinear", (torch.nn.Module,))
    fake.__module__ = "hqq.core.quantize"
    with pytest.raises(UnsupportedQuantizationError, match="bitsandbytes 8-bit") as info:
        quantized_backend(fake())
    assert isinstance(info.value, HetLoRAError) and "HQQ" in str(info.value)
    with pytest.raises(UnsupportedQuantizationError, match="GPTQ"):
        dispatch_quantized(torch.nn.Linear(4, 4), "default", HetLoRAConfig(r=2), gptq_quantization_config=object())
    with pytest.raises(UnsupportedQuantizationError, match="8bit, 4bit, torchao-int8"):
        check_quantize_mode("3bit")


def test_importing_the_package_does_not_import_the_federated_core():
    import os
    from pathlib import Path

    import peft_hetlora

    root = str(Path(peft_hetlora.__file__).resolve().parents[1])  # this checkout, not an installed copy
    code = "import sys, peft_hetlora; assert 'peft_hetlora.federated' not in sys.modules, 'federated imported'"
    env = {**os.environ, "PYTHONPATH": root}
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env, cwd=root)


def test_float_layers_of_a_quantised_model_get_the_float_layer():
    assert dispatch_quantized(torch.nn.Linear(4, 4), "default", HetLoRAConfig(r=2), loaded_in_8bit=True) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao Int4Tensor needs the mslk CUDA kernels (no CPU)")
def test_torchao_int4_is_refused_with_a_clear_error():  # pragma: no cover - GPU only
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    layer = torch.nn.Linear(128, 64, dtype=torch.bfloat16, device="cuda")
    quantize_(layer, Int4WeightOnlyConfig())
    with pytest.raises(UnsupportedQuantizationError, match="torchao Int4Tensor"):
        quantized_backend(layer)


@pytest.mark.skipif(not (HAS_BNB and torch.cuda.is_available()), reason="bitsandbytes CUDA kernels need a GPU")
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_bnb_cuda_forward_matches_the_dequantised_float_path(model_dir, mode):  # pragma: no cover - GPU only
    base = load_quantized_base(model_dir, mode, device_map="cuda")
    model = get_peft_model(base, HetLoRAConfig(r=8, rank=4, lora_alpha=16, target_modules=TARGETS))
    randomize_adapter(model, seed=3, std=0.2)
    model.train()
    layer = hetlora_layers(model)["model.layers.0.mlp.down_proj"]
    x = torch.randn(5, 128, device="cuda")
    with torch.no_grad():
        delta = layer(x) - layer.get_base_layer()(x)
    a, b = layer.lora_A["default"].weight[:4], layer.lora_B["default"].weight[:, :4]
    torch.testing.assert_close(delta, 2.0 * x @ a.T @ b.T, rtol=1e-2, atol=1e-3)


# ----------------------------------------------------------------------------- the real model (slow)
def _smollm2_cached() -> str | None:
    from peft_hetlora.model_source import default_cache_dir

    folder = default_cache_dir() / "smollm2-135m"
    return str(folder) if (folder / "config.json").is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_smollm2_client_on_a_quantised_base_trains_prunes_uploads_and_reloads(mode, tmp_path):
    from peft_hetlora.federated.upload import decode_message, encode_message

    folder = _smollm2_cached()
    if folder is None:
        pytest.skip("SmolLM2-135M not converted yet (run `hetlora simulate` once or resolve_model())")
    top = [28, 29]
    config = HetLoRAConfig(
        r=16, rank=8, r_min=2, lora_alpha=32, prune_lambda=5.0, target_modules=["q_proj", "v_proj"],
        layers_to_transform=top,
    )  # fmt: skip
    model = get_peft_model(load_quantized_base(folder, mode), config)
    randomize_adapter(model, seed=0, std=0.05)
    model.train()
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    reference = float(model.tail_norm())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(float(loss))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]
    assert model.prune(reference) == 7  # min(floor(0.99 * 8), 7) = 7 >= r_min
    model.save_pretrained(tmp_path / "up")
    state = load_file(tmp_path / "up" / "adapter_model.safetensors")
    decoded = decode_message(encode_message(state, "bf16"), "bf16")  # a compressed upload
    assert all(v.shape[0] == 7 for k, v in decoded.items() if ".lora_A." in k)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    reloaded = PeftModel.from_pretrained(load_quantized_base(folder, mode), tmp_path / "up")
    reloaded.train()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, rtol=0, atol=1e-4)


# --------------------------------------------------------------------- window training (docs/design.md#component-rule)
def _global_state(model: PeftModel, seed: int = 11) -> dict[str, torch.Tensor]:
    """A rank-8 global for the model's HetLoRA modules, every component non-zero."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in hetlora_layers(model).items():
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(8, layer.in_features, generator=gen) * 0.2
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(layer.out_features, 8, generator=gen) * 0.2
    return state


@pytest.mark.parametrize("mode", MODES)
def test_window_on_a_quantised_base_adds_the_whole_global_as_frozen_factors(model_dir, mode):
    model = hetlora_model(model_dir, mode, rank=3)
    state = _global_state(model)
    model.set_components([6, 0, 3], state)
    name = "model.layers.0.mlp.down_proj"
    layer = hetlora_layers(model)[name]
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta = np64(layer(x)) - np64(layer.get_base_layer()(x))
    a, b = np64(state[f"base_model.model.{name}.lora_A.weight"]), np64(state[f"base_model.model.{name}.lora_B.weight"])
    np.testing.assert_allclose(delta, 2.0 * np64(x) @ a.T @ b.T, rtol=1e-4, atol=1e-5)  # s = 16 / 8, all 8 components
    # gradients reach only the 3 trainable slots; the quantised base and the frozen factors get none
    model.train()
    ids = token_batch()
    model(ids, labels=ids).loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for module in hetlora_layers(model).values():
        assert module.lora_A["default"].weight.grad.abs().sum() > 0
        assert module.lora_A["default"].weight.shape[0] == 3
    with pytest.raises(ValueError, match="frozen='factors'"):
        model.set_components([1], state, frozen="merged")
