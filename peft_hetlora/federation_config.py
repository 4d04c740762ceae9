"""A client's adapter settings must be its federation's: read them from the store, compare, build from them.

HetLoRA (Cho et al., arXiv 2401.06432) averages factors that only mean the same thing when every client
uses the same r_max, the same scale s = lora_alpha / r_max (or / sqrt(r_max)), the same target modules
and layers, and the same layer math (bias, fan_in_fan_out). A client that differs in any of these
trains and uploads something the server misreads, silently. So a client either builds its config
from the federation (`HetLoRAConfig.from_federation`, `get_federated_model`) or is refused before its
first step (`check_matches_federation`, called by `FederatedClientCallback`).

Example:
    ```py
    >>> from peft_hetlora.federated import LocalStore
    >>> config = HetLoRAConfig.from_federation(LocalStore("runs/fed"), rank=4)  # doctest: +SKIP
    >>> model = get_federated_model(base_model, LocalStore("runs/fed"), max_rank=4)  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .federated.errors import ConfigMismatchError
from .federated.ranks import check_rank

# settings that change what a factor means; a client must match the federation on every one
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
# local choices a client may set freely (they do not change what the server reads)
CLIENT_FIELDS = ("rank", "prune_lambda", "prune_gamma", "lora_dropout", "inference_mode", "task_type",
                 "base_model_name_or_path", "revision")


def _normalise(name: str, value: Any) -> Any:
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
    for name in ("federation.json", "adapter_config.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            config = data.get("adapter_config") if name == "federation.json" else data
            if isinstance(config, Mapping):
                return dict(config)
    raise ConfigMismatchError(
        f"{folder} holds neither federation.json nor adapter_config.json: pass a federation's store or folder."
    )


def check_matches_federation(config: Any, federation_config: Mapping[str, Any]) -> None:
    """Raise `ConfigMismatchError` unless `config` agrees with the federation on every `FEDERATION_FIELDS` entry.

    Example:
        ```py
        >>> from peft_hetlora import HetLoRAConfig
        >>> check_matches_federation(HetLoRAConfig(r=16, target_modules=["q_proj"]),
        ...                          {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]})
        Traceback (most recent call last):
        ...
        peft_hetlora.federated.errors.ConfigMismatchError: lora_alpha: this client has 8.0 but the federation ...
        ```
    """
    ours = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    problems = []
    for name in FEDERATION_FIELDS:
        mine, theirs = _normalise(name, ours.get(name)), _normalise(name, federation_config.get(name))
        if mine != theirs:
            problems.append(f"{name}: this client has {mine!r} but the federation has {theirs!r}")
    if problems:
        raise ConfigMismatchError(
            "; ".join(problems) + ". These settings change the adapter's math, so training would upload factors "
            "the server misreads. Build the client's config from the federation: "
            "HetLoRAConfig.from_federation(store, rank=...) or peft_hetlora.get_federated_model(base_model, store, "
            "max_rank=...)."
        )


def config_from_federation(source: Any, *, rank: int | None = None, **client_settings: Any) -> Any:
    """A `HetLoRAConfig` with the federation's settings and this client's `rank` (its budget; default r_max).

    `client_settings` may set the fields that stay local (`prune_lambda`, `prune_gamma`, `lora_dropout`,
    `inference_mode`, ...); one that contradicts the federation raises `ConfigMismatchError`.

    Example:
        ```py
        >>> config_from_federation(LocalStore("runs/fed"), rank=4, prune_lambda=0.05)  # doctest: +SKIP
        ```
    """
    from .config import HetLoRAConfig

    federation = federation_adapter_config(source)
    for name, value in client_settings.items():
        if name in FEDERATION_FIELDS and _normalise(name, value) != _normalise(name, federation.get(name)):
            raise ConfigMismatchError(
                f"{name}={value!r} contradicts the federation's {name}={federation.get(name)!r}; drop the argument "
                "(the federation's value is used)."
            )
    known = set(HetLoRAConfig.__dataclass_fields__)
    settings = {k: v for k, v in federation.items() if k in known and k not in ("peft_type", "rank")}
    settings["inference_mode"] = False  # saved adapters say True; a client trains
    settings.update(client_settings)
    settings["rank"] = int(settings["r"]) if rank is None else rank
    r_min = settings.get("r_min") or 1
    check_rank(settings["rank"], r_min, int(settings["r"]), what="rank", lo_name="r_min", hi_name="r_max",
               hint=f"a rank below the federation's r_min means this device cannot take part (its budget must be at "
                    f"least {r_min})")
    return HetLoRAConfig(**settings)


def get_federated_model(base_model: Any, store: Any, *, max_rank: int | None = None, **client_settings: Any) -> Any:
    """`get_peft_model(base_model, HetLoRAConfig.from_federation(store, rank=max_rank))`: a client model that fits.

    The base model is checked first against the federation's `base_model_identity` (a hash of the
    weights the adapter corrects; `BaseModelMismatchError` names both hashes when they differ).

    `max_rank` is this device's budget, the largest rank it can train (default: r_max): the parameters
    and optimizer state are allocated at that rank, and `FederatedClientCallback` trains each round at
    min(assigned rank, max_rank) and reports `max_rank` so the coordinator never assigns more.

    Example:
        ```py
        >>> model = peft_hetlora.get_federated_model(base, LocalStore("runs/fed"), max_rank=4)  # doctest: +SKIP
        >>> model.get_rank()  # doctest: +SKIP
        4
        ```
    """
    from peft import get_peft_model

    from .base_identity import check_base_model, federation_base_identity
    from .known_noise import peft_model_warnings

    config = config_from_federation(store, rank=max_rank, **client_settings)
    check_base_model(base_model, config, federation_base_identity(store))  # before the model is changed
    if "base_model_name_or_path" not in client_settings:
        # the base is checked by its weights; PEFT records the path this client loaded (and, given the
        # federation's name instead, would warn that it "renamed" it)
        config.base_model_name_or_path = None
    with peft_model_warnings():
        return get_peft_model(base_model, config)
