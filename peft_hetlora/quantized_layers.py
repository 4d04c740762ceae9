"""HetLoRA layers on quantised base layers, chosen by a dispatcher in the style of PEFT's LoRA.

The frozen base stays quantised; the HetLoRA factors are ordinary float parameters allocated at the
client's rank. The forward is the quantised layer's own output plus the active-slice LoRA term
``s * B[:, :k] A[:k] x``, so the prefix mask, the self-pruning tail norm, saving only the active
components and loading an adapter of another rank are exactly those of `HetLoRALinear`. Only merging
differs: the base weight is de-quantised, the delta added, and the sum quantised again (lossy, as in
PEFT).

Backends (the ones that run on CPU here are tested here):

| backend | base layer | CPU |
|---|---|---|
| ``bnb-8bit`` | ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8) | yes (bitsandbytes >= 0.46) |
| ``bnb-4bit`` | ``bitsandbytes.nn.Linear4bit`` (NF4 / FP4) | yes (bitsandbytes >= 0.46) |
| ``torchao-int8`` | ``nn.Linear`` with a torchao ``Int8Tensor`` weight (weight-only int8) | yes |

torchao int4 weight-only needs kernels that are not available on CPU here (``Int4Tensor`` requires the
``mslk`` package); PEFT's own LoRA refuses it too. GPTQ, AWQ, AQLM, HQQ, EETQ and Intel Neural Compressor
bases are refused with an error naming the supported backends.

Example:
    ```py
    >>> from peft import get_peft_model
    >>> from peft_hetlora import HetLoRAConfig
    >>> from peft_hetlora.quantization import load_quantized_base
    >>> base = load_quantized_base("path/to/model", "8bit")  # doctest: +SKIP
    >>> model = get_peft_model(base, HetLoRAConfig(r=8, rank=4, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__  # doctest: +SKIP
    'HetLoRALinear8bitLt'
    ```
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .layer import HetLoRALinear
from .utils.errors import UnsupportedQuantizationError

#: backends whose HetLoRA layer exists, in dispatch order
SUPPORTED_BACKENDS = ("bnb-8bit", "bnb-4bit", "torchao-int8")
#: quantisation methods PEFT knows but HetLoRA refuses (the kwarg PEFT passes, the method's name)
_REFUSED_QUANT_KWARGS = {
    "gptq_quantization_config": "GPTQ",
    "aqlm_quantization_config": "AQLM",
    "awq_quantization_config": "AWQ",
}
_REFUSED_LAYER_MODULES = {
    "hqq": "HQQ",
    "eetq": "EETQ",
    "auto_gptq": "GPTQ",
    "gptqmodel": "GPTQ",
    "awq": "AWQ",
    "aqlm": "AQLM",
    "auto_round": "Intel Neural Compressor",
    "optimum": "optimum-quanto",
}


def _unsupported(what: str) -> ValueError:
    return UnsupportedQuantizationError(
        f"HetLoRA cannot adapt a {what} base layer. Supported quantised bases: bitsandbytes 8-bit "
        "(BitsAndBytesConfig(load_in_8bit=True)), bitsandbytes 4-bit (load_in_4bit=True) and torchao weight-only "
        "int8 (TorchAoConfig(Int8WeightOnlyConfig())); see peft_hetlora.quantization.load_quantized_base. "
        "Otherwise load the base in 16/32 bit."
    )


class _OnceFilter(logging.Filter):
    """Let a log message through once per process (bitsandbytes logs its fp16 input cast on every call)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def _quiet_bnb_int8_cast_log() -> None:
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in bnb_logger.filters):
        bnb_logger.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))


class _QuantizedBaseHetLoRA(HetLoRALinear):
    """Shared merge / unmerge for quantised bases: de-quantise, add or subtract the delta, re-quantise."""

    backend: str = ""
    # window training keeps the global's frozen components as factors here: merging them would re-quantise
    supports_frozen_merge = False

    def dequantized_base_weight(self) -> torch.Tensor:
        """The base weight as a float tensor (out_features x in_features)."""
        raise NotImplementedError

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the active components into the base weight, re-quantising it (lossy)."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            delta = self.get_delta_weight(adapter)
            merged = self.dequantized_base_weight().to(delta.dtype) + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {adapter!r} seems to be broken.")
            self._set_base_weight(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta from the (re-quantised) base weight."""
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            delta = self.get_delta_weight(adapter)
            self._set_base_weight(self.dequantized_base_weight().to(delta.dtype) - delta)


class HetLoRALinear8bitLt(_QuantizedBaseHetLoRA):
    """HetLoRA on a bitsandbytes `Linear8bitLt` (LLM.int8 row-wise absmax int8 weight)."""

    backend = "bnb-8bit"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _quiet_bnb_int8_cast_log()

    def dequantized_base_weight(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        scb = weight.SCB if weight.SCB is not None else self.get_base_layer().state.SCB
        # row-wise absmax: W = CB * SCB / 127
        return weight.data.float() * (scb.float().to(weight.device).view(-1, 1) / 127.0)

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        base = self.get_base_layer()
        old = base.weight
        base.weight = bnb.nn.Int8Params(
            weight.to("cpu"), requires_grad=False, has_fp16_weights=old.has_fp16_weights
        ).to(old.device)
        base.state.reset_grads()
        base.state.SCB = None


class HetLoRALinear4bit(_QuantizedBaseHetLoRA):
    """HetLoRA on a bitsandbytes `Linear4bit` (NF4 or FP4 blockwise weight)."""

    backend = "bnb-4bit"

    def dequantized_base_weight(self) -> torch.Tensor:
        import bitsandbytes as bnb

        weight = self.get_base_layer().weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its CPU inference kernel on the first no-grad eval forward;
            # undo it (as its own Params4bit.cuda() does) so the standard blockwise layout can be de-quantised
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        base = self.get_base_layer()
        old = base.weight
        kwargs = {
            key: getattr(old, key)
            for key in ("blocksize", "compress_statistics", "quant_type", "quant_storage", "module")
            if hasattr(old, key)
        }
        base.weight = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, **kwargs).to(old.device)


class HetLoRATorchaoLinear(_QuantizedBaseHetLoRA):
    """HetLoRA on an `nn.Linear` whose weight is a torchao weight-only int8 tensor.

    Merging re-quantises with the model's torchao config (`get_apply_tensor_subclass`, passed by PEFT
    when the model was loaded through transformers' `TorchAoConfig`).
    """

    backend = "torchao-int8"

    def __init__(self, *args: Any, get_apply_tensor_subclass: Callable[[], Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.get_apply_tensor_subclass = get_apply_tensor_subclass

    def dequantized_base_weight(self) -> torch.Tensor:
        return self.get_base_layer().weight.dequantize().float()

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        from torchao import quantize_

        if self.get_apply_tensor_subclass is None:
            raise ValueError(
                "This torchao base was not loaded through transformers' TorchAoConfig, so HetLoRA cannot re-quantise "
                "it after merging. Load it with peft_hetlora.quantization.load_quantized_base(..., 'torchao-int8') "
                "or keep the adapter unmerged."
            )
        base = self.get_base_layer()
        dtype = base.weight.dtype
        del base.weight
        base.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        quantize_(base, self.get_apply_tensor_subclass())


def _is_torchao_int8(weight: Any) -> bool:
    if importlib.util.find_spec("torchao") is None:
        return False
    from torchao.utils import TorchAOBaseTensor

    if not isinstance(weight, TorchAOBaseTensor):
        return False
    if type(weight).__name__ != "Int8Tensor":
        raise _unsupported(f"torchao {type(weight).__name__}")
    return True


def quantized_backend(base: nn.Module) -> str | None:
    """The backend name of a quantised base layer (one of `SUPPORTED_BACKENDS`), None for a float layer.

    Raises `peft_hetlora.quantization.UnsupportedQuantizationError` for quantised layers HetLoRA does not
    support.

    Example:
        ```py
        >>> quantized_backend(torch.nn.Linear(4, 4)) is None
        True
        ```
    """
    module_root = type(base).__module__.split(".")[0]
    if module_root == "bitsandbytes":
        import bitsandbytes as bnb

        if isinstance(base, bnb.nn.Linear8bitLt):
            return "bnb-8bit"
        if isinstance(base, bnb.nn.Linear4bit):
            return "bnb-4bit"
        raise _unsupported(f"bitsandbytes {type(base).__name__}")
    if module_root in _REFUSED_LAYER_MODULES:
        raise _unsupported(f"{_REFUSED_LAYER_MODULES[module_root]} ({type(base).__name__})")
    weight = getattr(base, "weight", None)
    if weight is not None and _is_torchao_int8(weight):
        return "torchao-int8"
    return None


_LAYER_FOR_BACKEND: dict[str, type[_QuantizedBaseHetLoRA]] = {
    "bnb-8bit": HetLoRALinear8bitLt,
    "bnb-4bit": HetLoRALinear4bit,
    "torchao-int8": HetLoRATorchaoLinear,
}


def dispatch_quantized(target: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> HetLoRALinear | None:
    """The HetLoRA layer for a quantised `target`, or None when its base is a float layer.

    Follows PEFT's dispatcher convention (`peft/tuners/lora/bnb.py`, `torchao.py`): called with the
    target and PEFT's keyword arguments, returns a new module or None.

    Example:
        ```py
        >>> dispatch_quantized(torch.nn.Linear(4, 4), "default", config=None) is None
        True
        ```
    """
    for key, method in _REFUSED_QUANT_KWARGS.items():
        if kwargs.get(key) is not None:
            raise _unsupported(method)
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    backend = quantized_backend(base)
    if backend is None:
        kwargs.pop("get_apply_tensor_subclass", None)
        return None
    for key in (
        "loaded_in_8bit",
        "loaded_in_4bit",
        "has_fp16_weights",
        "threshold",
        "index",
        "compute_dtype",
        "compress_statistics",
        "quant_type",
    ):
        kwargs.pop(key, None)
    config.fan_in_fan_out = False
    if backend != "torchao-int8":
        kwargs.pop("get_apply_tensor_subclass", None)
    return _LAYER_FOR_BACKEND[backend](target, adapter_name, config=config, **kwargs)
