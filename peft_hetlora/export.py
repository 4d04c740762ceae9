"""`export_lora`: turn a HetLoRA adapter into a plain PEFT LoRA adapter anyone can load."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import HetLoRAConfig
from .utils.constants import ADAPTER_FILE, CONFIG_FILE
from .utils.scaling import scaling_for

_SAVED_PREFIX = "base_model.model."
# a tokenizer's files, copied next to an export whose base is a local folder: AutoPeftModelForCausalLM then finds
# it there instead of asking the Hub for `tokenizer_config.json` (a failed lookup and a warning offline)
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
logger = logging.getLogger(__name__)


def _module_ranks(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    return {
        key[: -len(".lora_A.weight")]: t.shape[0] for key, t in state_dict.items() if key.endswith(".lora_A.weight")
    }


def _load_hetlora(source) -> tuple[dict[str, torch.Tensor], HetLoRAConfig, dict[str, str] | None]:
    """(state dict, config, PEFT's `auto_mapping`: the base model class `AutoPeftModel` builds without a task_type)."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        weights = folder / ADAPTER_FILE
        config_file = folder / CONFIG_FILE
        if not weights.is_file() or not config_file.is_file():
            raise FileNotFoundError(
                f"{folder} is not a saved HetLoRA adapter (needs {ADAPTER_FILE} and {CONFIG_FILE}); "
                "call model.save_pretrained(folder) first or pass the PeftModel itself."
            )
        raw = json.loads(config_file.read_text())
        if raw.get("peft_type") != "HETLORA":
            raise ValueError(f"{config_file} has peft_type {raw.get('peft_type')!r}, expected 'HETLORA'.")
        auto_mapping = raw.get("auto_mapping") if isinstance(raw.get("auto_mapping"), dict) else None
        return load_file(weights), HetLoRAConfig.from_pretrained(str(folder)), auto_mapping
    from peft import get_peft_model_state_dict

    adapter = source.active_adapter
    config = source.peft_config[adapter]
    if not isinstance(config, HetLoRAConfig):
        raise ValueError(f"export_lora needs a HetLoRA PeftModel, got an adapter of type {config.peft_type}.")
    tuner = source.base_model
    frozen = any(layer.frozen_components(adapter) for _, layer in tuner.hetlora_layers(adapter))
    # a window client holding the rest of the global frozen exports the whole global it computes
    state = tuner.union_state_dict(adapter) if frozen else get_peft_model_state_dict(source, adapter_name=adapter)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    base_class = type(source.get_base_model())
    auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    return state, config, auto_mapping


def export_lora(
    source: Any,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write `source` (a HetLoRA PeftModel or a saved HetLoRA folder) as a plain PEFT LoRA adapter.

    The result loads with plain `peft` in a process that never imports `peft_hetlora` and gives the
    same outputs: each module's rank k_m becomes a `rank_pattern` entry and its `alpha_pattern` is
    s * k_m, so LoRA's scale alpha_m / k_m equals HetLoRA's fixed scale s. A PeftModel training a
    window with the rest of the global frozen (`set_components`) exports trained plus frozen
    components, in global order, for the original base model (its full global behaviour).

    It also loads with `AutoPeftModelForCausalLM.from_pretrained(out_dir)`, which needs the base model
    (`base_model_name_or_path`) and either a `task_type` or PEFT's `auto_mapping` (the base model's
    class): both are carried over from the source; pass `base_model_name_or_path=` (a Hub id or a
    folder) or `task_type="CAUSAL_LM"` to set or replace them. A base that is a local folder is
    recorded as its absolute path and its tokenizer files are copied next to the adapter, so
    `AutoPeftModelForCausalLM.from_pretrained(out_dir)` loads offline (no Hub lookup).

    Example:
        ```py
        >>> peft_hetlora.export_lora(peft_model, "my-lora")  # doctest: +SKIP
        >>> PeftModel.from_pretrained(base_model, "my-lora")  # plain peft, no peft_hetlora  # doctest: +SKIP
        ```
    """
    from peft import LoraConfig

    state, config, auto_mapping = _load_hetlora(source)
    ranks = _module_ranks(state)
    if not ranks:
        raise ValueError("The adapter holds no LoRA factors (no '*.lora_A.weight' keys); nothing to export.")
    scale = scaling_for(config.lora_alpha, config.r, config.rank_scaling)
    base_rank = max(ranks.values())
    patterns = {name.removeprefix(_SAVED_PREFIX): rank for name, rank in ranks.items() if rank != base_rank}
    fields = {
        name: getattr(config, name)
        for name in (
            "base_model_name_or_path",
            "revision",
            "task_type",
            "target_modules",
            "exclude_modules",
            "lora_dropout",
            "bias",
            "modules_to_save",
            "layers_to_transform",
            "layers_pattern",
            "fan_in_fan_out",
            "inference_mode",
        )
    }
    if base_model_name_or_path is not None:
        fields["base_model_name_or_path"] = base_model_name_or_path
    base = fields["base_model_name_or_path"]
    if base and Path(base).expanduser().is_dir():
        # a local folder as an absolute path: a relative one (or one AutoPeftModel mistakes for a Hub id) would
        # send it to the Hub, which retries for ~23 s offline before failing
        fields["base_model_name_or_path"] = str(Path(base).expanduser().resolve())
    if task_type is not None:
        fields["task_type"] = task_type
    if not fields["base_model_name_or_path"] or (fields["task_type"] is None and auto_mapping is None):
        logger.warning(
            "The exported adapter lacks %s, so AutoPeftModelForCausalLM cannot load it (PeftModel.from_pretrained "
            "can); pass base_model_name_or_path=... / task_type='CAUSAL_LM' to export_lora.",
            "its base model" if not fields["base_model_name_or_path"] else "a task_type",
        )
    lora_config = LoraConfig(
        r=base_rank,
        lora_alpha=scale * base_rank,
        rank_pattern=patterns,
        alpha_pattern={name: scale * rank for name, rank in patterns.items()},
        **fields,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora_config.save_pretrained(str(out), auto_mapping_dict=auto_mapping if fields["task_type"] is None else None)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out / ADAPTER_FILE),
        metadata={"format": "pt"},
    )
    base_folder = Path(fields["base_model_name_or_path"] or "")
    if fields["base_model_name_or_path"] and (base_folder / "tokenizer_config.json").is_file():
        for name in _TOKENIZER_FILES:
            if (base_folder / name).is_file():
                shutil.copyfile(base_folder / name, out / name)
    return out
