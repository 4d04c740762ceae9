"""Registers the HETLORA PEFT type (idempotent, Python 3.10-3.13)."""

from __future__ import annotations

from peft.utils.peft_types import PeftType

HETLORA = "HETLORA"


def _extend_peft_type(name: str) -> PeftType:
    """Add `name` to PEFT's `PeftType` enum unless it is already there.

    `register_peft_method` only accepts names that are `PeftType` members, and enums cannot be
    extended through their public API, so the member is built the way `enum` builds its own.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(PeftType, "_add_member_"):  # Python >= 3.13
        PeftType._add_member_(name, member)
    else:
        PeftType._member_map_[name] = member
        type.__setattr__(PeftType, name, member)
    PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member
    return member


HETLORA_PEFT_TYPE = _extend_peft_type(HETLORA)


def register() -> None:
    """Map HETLORA to its config and tuner in PEFT's registries.

    PEFT's `register_peft_method` refuses the `lora_` prefix because LoRA owns it, but HetLoRA keeps
    it on purpose: PEFT relies on it for device moves, missing-key filtering and weighted adapters,
    and it keeps the saved keys identical to LoRA's. So the mappings are set directly.
    """
    from peft import mapping

    from .config import HetLoRAConfig
    from .model import HetLoRAModel

    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[HETLORA_PEFT_TYPE] = HetLoRAConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[HETLORA_PEFT_TYPE] = HetLoRAModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[HETLORA_PEFT_TYPE] = HetLoRAModel.prefix
