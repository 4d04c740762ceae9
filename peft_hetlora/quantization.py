"""Quantised base models for HetLoRA clients: load (or convert) a causal LM with an 8-bit / 4-bit base.

On-device foundation models run quantised; a HetLoRA client then trains float LoRA factors on the
frozen quantised base (as QLoRA, Dettmers et al., arXiv 2305.14314, does for LoRA).
`load_quantized_base` is the one entry point the simulation's ``--quantize`` flag calls; the HetLoRA
layers for these bases are chosen automatically by `get_peft_model` (see `peft_hetlora.quantized_layers`).

Modes (`QUANTIZE_MODES`):

- ``"8bit"``: bitsandbytes LLM.int8 (Dettmers et al., arXiv 2208.07339), row-wise absmax int8 weights.
- ``"4bit"``: bitsandbytes NF4 blockwise 4-bit weights (QLoRA), float32 compute, no double quantisation.
- ``"torchao-int8"``: torchao weight-only int8 (per-row scales).
- ``None``: the float model, unchanged.

All three run on CPU with bitsandbytes >= 0.46 and torchao >= 0.16 (checked here with bitsandbytes 0.50.2
and torchao 0.18.0). bitsandbytes is the ``quant`` extra; torchao is the separate ``torchao`` extra because
torchao 0.18 next to a CPU-only torch logs failed CUDA-library loads whenever ``peft`` is imported.
torchao int4 weight-only is not offered: its ``Int4Tensor`` needs the ``mslk`` kernels, which do not run
on CPU.

Example:
    ```py
    >>> from peft import get_peft_model
    >>> from peft_hetlora import HetLoRAConfig
    >>> base = load_quantized_base("path/to/model", "8bit")  # doctest: +SKIP
    >>> quantization_summary(base)  # doctest: +SKIP
    {'mode': '8bit', 'backend': 'bnb-8bit', 'quantized_layers': 210, 'float_linear_layers': 1}
    >>> model = get_peft_model(base, HetLoRAConfig(r=16, rank=4, target_modules="all-linear"))  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .quantized_layers import quantized_backend
from .utils.errors import UnsupportedQuantizationError

QuantizeMode = Literal["8bit", "4bit", "torchao-int8"]
#: accepted values of `mode` (the ``--quantize`` choices)
QUANTIZE_MODES: tuple[str, ...] = ("8bit", "4bit", "torchao-int8")
_BACKEND_OF_MODE = {"8bit": "bnb-8bit", "4bit": "bnb-4bit", "torchao-int8": "torchao-int8"}
_MODE_OF_BACKEND = {backend: mode for mode, backend in _BACKEND_OF_MODE.items()}
#: LLM.int8's outlier threshold, transformers' default for BitsAndBytesConfig(load_in_8bit=True)
INT8_THRESHOLD = 6.0
_INSTALL_HINT = {
    "8bit": "pip install 'bitsandbytes>=0.46'",
    "4bit": "pip install 'bitsandbytes>=0.46'",
    "torchao-int8": "pip install 'torchao>=0.16'",
}


def check_quantize_mode(mode: str | None) -> str | None:
    """Validate a ``--quantize`` value and that its backend is installed; returns it unchanged.

    Example:
        ```py
        >>> check_quantize_mode(None) is None
        True
        ```
    """
    if mode is None or mode in ("none", "float", "fp32"):
        return None
    if mode not in QUANTIZE_MODES:
        raise UnsupportedQuantizationError(
            f"Unknown quantisation mode {mode!r}; use one of {', '.join(QUANTIZE_MODES)} (or None for a float base)."
        )
    package = "torchao" if mode == "torchao-int8" else "bitsandbytes"
    if importlib.util.find_spec(package) is None:
        raise UnsupportedQuantizationError(
            f"Quantisation mode {mode!r} needs {package}: {_INSTALL_HINT[mode]} "
            f"(or pip install 'peft-hetlora[{'torchao' if package == 'torchao' else 'quant'}]')."
        )
    return mode


def quantization_config_for(mode: str, compute_dtype: torch.dtype = torch.float32) -> Any:
    """The transformers `quantization_config` for `mode` (`BitsAndBytesConfig` or `TorchAoConfig`).

    Example:
        ```py
        >>> quantization_config_for("8bit").load_in_8bit  # doctest: +SKIP
        True
        ```
    """
    mode = check_quantize_mode(mode)
    if mode is None:
        raise UnsupportedQuantizationError("quantization_config_for needs a mode, got None.")
    if mode == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=False,
    )


def load_quantized_base(
    model_or_dir: str | Path | nn.Module,
    mode: str | None,
    *,
    dtype: torch.dtype = torch.float32,
    device_map: str | None = None,
    skip_modules: Iterable[str] = ("lm_head",),
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """A causal LM whose linear layers are quantised with `mode` (`None` returns the float model).

    `model_or_dir` is a local transformers folder (loaded with `AutoModelForCausalLM.from_pretrained` and
    the matching `quantization_config`, which quantises layer by layer) or an already loaded float
    model, whose `nn.Linear` layers (except those whose name ends with one of `skip_modules`) are
    replaced in place. `dtype` is the dtype of the non-quantised parts and the 4-bit compute dtype.
    `device_map` defaults to ``"cpu"`` (``"auto"`` when CUDA is available).

    Example:
        ```py
        >>> base = load_quantized_base("~/.cache/peft_hetlora/models/smollm2-135m", "4bit")  # doctest: +SKIP
        >>> quantization_summary(base)["backend"]  # doctest: +SKIP
        'bnb-4bit'
        ```
    """
    mode = check_quantize_mode(mode)
    if isinstance(model_or_dir, nn.Module):
        if mode is None:
            return model_or_dir
        return quantize_model_(model_or_dir, mode, dtype=dtype, skip_modules=skip_modules)
    from transformers import AutoModelForCausalLM

    path = Path(model_or_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a model folder; pass a local transformers folder or a loaded model.")
    if mode is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **from_pretrained_kwargs)
    if device_map is None:
        device_map = "auto" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        device_map=device_map,
        quantization_config=quantization_config_for(mode, compute_dtype=dtype),
        **from_pretrained_kwargs,
    )


def quantize_model_(
    model: nn.Module, mode: str, *, dtype: torch.dtype = torch.float32, skip_modules: Iterable[str] = ("lm_head",)
) -> nn.Module:
    """Quantise the `nn.Linear` layers of a loaded float `model` in place and return it.

    Example:
        ```py
        >>> model = quantize_model_(tiny_model, "8bit")  # doctest: +SKIP
        ```
    """
    mode = check_quantize_mode(mode)
    if mode is None:
        return model
    skip = tuple(skip_modules)
    names = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not (skip and name.endswith(skip))
    ]
    if mode == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        wanted = set(names)
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: fqn in wanted)
        return model
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _bnb_linear(getattr(parent, child), mode, dtype))
    return model


def _bnb_linear(linear: nn.Linear, mode: str, dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    bias = linear.bias is not None
    if mode == "8bit":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False, threshold=INT8_THRESHOLD
        )
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=dtype,
            quant_type="nf4",
            compress_statistics=False,
        )
    layer.load_state_dict(linear.state_dict())
    if bias:
        layer.bias.data = layer.bias.data.to(dtype)
    # bitsandbytes quantises the weight when it is moved to a device
    return layer.to(linear.weight.device).requires_grad_(False)


def quantization_summary(model: nn.Module) -> dict[str, Any]:
    """What a model's linear layers are: the quantisation mode, backend and layer counts (for reports).

    Adapter factors (``lora_A`` / ``lora_B``) are not counted.

    Example:
        ```py
        >>> quantization_summary(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        {'mode': None, 'backend': None, 'quantized_layers': 0, 'float_linear_layers': 1}
        ```
    """
    backends: Counter[str] = Counter()
    float_layers = 0
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") or ".lora_" in name:
            continue  # a PEFT wrapper (its base layer is counted itself) or an adapter factor
        try:
            backend = quantized_backend(module)
        except UnsupportedQuantizationError:
            backend = f"unsupported:{type(module).__name__}"
        if backend is not None:
            backends[backend] += 1
        elif isinstance(module, nn.Linear):
            float_layers += 1
    backend = backends.most_common(1)[0][0] if backends else None
    return {
        "mode": _MODE_OF_BACKEND.get(backend) if backend else None,
        "backend": backend,
        "quantized_layers": sum(backends.values()),
        "float_linear_layers": float_layers,
    }
