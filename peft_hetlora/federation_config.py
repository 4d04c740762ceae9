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

from collections.abc import Mapping
from typing import Any

from .config import HetLoRAConfig
from .utils.errors import ConfigMismatchError
from .utils.federation_fields import CLIENT_FIELDS, FEDERATION_FIELDS, federation_adapter_config, normalise_setting

__all__ = [
    "CLIENT_FIELDS",
    "FEDERATION_FIELDS",
    "check_matches_federation",
    "config_from_federation",
    "federation_adapter_config",
    "get_federated_model",
]


def check_matches_federation(config: Any, federation_config: Mapping[str, Any]) -> None:
    """Raise `ConfigMismatchError` unless `config` agrees with the federation on every `FEDERATION_FIELDS` entry.

    Example:
        ```py
        >>> from peft_hetlora import HetLoRAConfig
        >>> check_matches_federation(HetLoRAConfig(r=16, target_modules=["q_proj"]),
        ...                          {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]})
        Traceback (most recent call last):
        ...
        peft_hetlora.utils.errors.ConfigMismatchError: lora_alpha: this client has 8.0 but the federation ...
        ```
    """
    ours = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    problems = []
    for name in FEDERATION_FIELDS:
        mine, theirs = normalise_setting(name, ours.get(name)), normalise_setting(name, federation_config.get(name))
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
    return HetLoRAConfig.from_federation(source, rank=rank, **client_settings)


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
