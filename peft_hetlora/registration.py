"""Registers the HETLORA PEFT type with PEFT's mappings (idempotent, Python 3.10-3.13).

The `PeftType` member itself is made by `peft_hetlora.config` (the config sets it as its `peft_type`); this
module maps it to `HetLoRAConfig` and `HetLoRAModel`. `peft_hetlora.peft_hook` calls `register` once PEFT is
imported.

Example:
    ```py
    >>> import peft_hetlora
    >>> from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    >>> PEFT_TYPE_TO_CONFIG_MAPPING[peft_hetlora.HETLORA_PEFT_TYPE].__name__
    'HetLoRAConfig'
    ```
"""

from __future__ import annotations

from .config import HETLORA, HETLORA_PEFT_TYPE, HetLoRAConfig
from .model import HetLoRAModel

__all__ = ["HETLORA", "HETLORA_PEFT_TYPE", "register"]


def register() -> None:
    """Map HETLORA to its config and tuner in PEFT's registries.

    PEFT's `register_peft_method` refuses the `lora_` prefix because LoRA owns it, but HetLoRA keeps
    it on purpose: PEFT relies on it for device moves, missing-key filtering and weighted adapters,
    and it keeps the saved keys identical to LoRA's. So the mappings are set directly.

    Example:
        ```py
        >>> register()  # idempotent: importing peft_hetlora and PEFT already did it
        ```
    """
    from peft import mapping

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[HETLORA_PEFT_TYPE] = HetLoRAConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[HETLORA_PEFT_TYPE] = HetLoRAModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[HETLORA_PEFT_TYPE] = HetLoRAModel.prefix
