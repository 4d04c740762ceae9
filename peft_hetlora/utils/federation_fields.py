"""Which adapter settings a client must share with its federation, and reading them from a store or folder.

HetLoRA (Cho et al., arXiv 2401.06432) averages factors that only mean the same thing when every client uses the
same r_max, the same scale, the same target modules and layers and the same layer math (docs/design.md#scale-rule).
`FEDERATION_FIELDS` names those settings, `normalise_setting` makes two spellings of one value compare equal, and
`federation_adapter_config` reads the federation's adapter config. `HetLoRAConfig.from_federation` and
`peft_hetlora.federation_config.check_matches_federation` build on them.

Example:
    ```py
    >>> normalise_setting("target_modules", ["v_proj", "q_proj"]), normalise_setting("lora_alpha", 16)
    (['q_proj', 'v_proj'], 16.0)
    >>> "r" in FEDERATION_FIELDS, "prune_lambda" in CLIENT_FIELDS
    (True, True)
    ```
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .constants import CONFIG_FILE, FEDERATION_FILE
from .errors import ConfigMismatchError

__all__ = ["CLIENT_FIELDS", "FEDERATION_FIELDS", "federation_adapter_config", "normalise_setting"]

#: settings that change what a factor means; a client must match the federation on every one
FEDERATION_FIELDS = (
    "r",
    "lora_alpha",
    "rank_scaling",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "bias",
    "fan_in_fan_out",
    "use_dora",
    "lora_bias",
    "modules_to_save",
)
_DEFAULTS: dict[str, Any] = {"rank_scaling": "fixed", "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
                             "use_dora": False, "lora_bias": False}
#: local choices a client may set freely (they do not change what the server reads)
CLIENT_FIELDS = ("rank", "prune_lambda", "prune_gamma", "lora_dropout", "inference_mode", "task_type",
                 "base_model_name_or_path", "revision")


def normalise_setting(name: str, value: Any) -> Any:
    """`value` of adapter setting `name` in one canonical spelling (defaults filled, lists sorted, alpha a float).

    Example:
        ```py
        >>> normalise_setting("rank_scaling", None), normalise_setting("layers_to_transform", 3)
        ('fixed', [3])
        ```
    """
    if value is None:
        value = _DEFAULTS.get(name)
    if name in ("target_modules", "exclude_modules", "modules_to_save") and isinstance(value, (list, tuple, set)):
        return sorted(value) or None
    if name == "layers_to_transform" and isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if name == "layers_to_transform" and isinstance(value, (list, tuple)):
        return sorted(value)
    if name == "lora_alpha" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if name in ("layers_pattern",) and isinstance(value, (list, tuple)):
        return list(value)
    return value


def federation_adapter_config(source: Any) -> dict[str, Any]:
    """The federation's adapter config (`adapter_config.json` of its global, at r_max) as a dict.

    `source` is an `AdapterStore` (its federation.json, else its latest global), or a local folder
    holding `federation.json` (a LocalStore) or `adapter_config.json` (a saved global adapter).

    Example:
        ```py
        >>> federation_adapter_config("runs/fed")["r"]  # doctest: +SKIP
        16
        ```
    """
    if hasattr(source, "read_federation"):
        federation = source.read_federation()
        if federation and isinstance(federation.get("adapter_config"), Mapping):
            return dict(federation["adapter_config"])
        latest = source.latest_global()
        if latest is None:
            raise ConfigMismatchError(
                "The store holds no federation yet (no federation.json, no global adapter): create it first with "
                "`hetlora init` (or Coordinator.init)."
            )
        source = latest.path
    folder = Path(source)
    for name in (FEDERATION_FILE, CONFIG_FILE):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            config = data.get("adapter_config") if name == FEDERATION_FILE else data
            if isinstance(config, Mapping):
                return dict(config)
    raise ConfigMismatchError(
        f"{folder} holds neither {FEDERATION_FILE} nor {CONFIG_FILE}: pass a federation's store or folder."
    )
