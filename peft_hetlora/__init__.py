"""peft-hetlora: heterogeneous-rank LoRA (HetLoRA) for federated fine-tuning, as a native PEFT method.

Importing the package registers the `HETLORA` PEFT type (as soon as PEFT itself is imported), so
`peft.get_peft_model`, `PeftModel.from_pretrained` and `AutoPeftModelForCausalLM` work with
`HetLoRAConfig` adapters. Public names load lazily: `import peft_hetlora` alone imports neither
torch, transformers nor PEFT, which keeps `hetlora --help` and `peft_hetlora.federated` fast.

Example:
    ```py
    >>> import peft_hetlora
    >>> from peft import get_peft_model
    >>> config = peft_hetlora.HetLoRAConfig(r=16, rank=4, target_modules=["q_proj", "v_proj"])
    >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from .peft_hook import install as _install_registration

__version__ = "0.1.0"

_LAZY = {
    "HETLORA_PEFT_TYPE": ".config",
    "HetLoRAConfig": ".config",
    "HetLoRALinear": ".layer",
    "HetLoRAModel": ".model",
    "export_lora": ".export",
    "get_federated_model": ".federation_config",
}

__all__ = [*sorted(_LAZY), "__version__"]

_install_registration()


def _drop_optional_kernel_notice(record: logging.LogRecord) -> bool:
    # bitsandbytes' CPU backend logs a warning on every `import peft` when the optional Hub-fetched `kernels`
    # package is absent; its own fallback kernel is what runs, so the line is noise for our users.
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_optional_kernel_notice)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
