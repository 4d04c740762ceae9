"""What an arm trains: its ranks and its adapter config (shared by the in-process and the Flower engine)."""

from __future__ import annotations

import math
from typing import Any

from peft_hetlora.config import HetLoRAConfig, scaling_for

from .arms import ARMS, SimulationConfig

__all__ = ["arm_adapter_config", "arm_ranks"]


def arm_ranks(config: SimulationConfig, arm: str, initial_ranks: dict[str, int]) -> tuple[int, dict[str, int]]:
    """(r_max of the arm's adapter, {client: rank}) for an arm, from the heterogeneous assignment.

    Example:
        ```py
        >>> config = SimulationConfig.from_sources(profile="quick")
        >>> ranks = {"a": config.r_min, "b": config.r_max}
        >>> arm_ranks(config, "homlora_rmin", ranks) == (config.r_min, dict.fromkeys(ranks, config.r_min))
        True
        >>> arm_ranks(config, "hetlora", ranks) == (config.r_max, ranks)
        True
        ```
    """
    kind = ARMS[arm]["ranks"]
    if kind == "heterogeneous":
        return config.r_max, dict(initial_ranks)
    if kind == "r_min":
        return config.r_min, dict.fromkeys(initial_ranks, config.r_min)
    if kind == "r_max_capable":
        capable = {cid: config.r_max for cid, rank in initial_ranks.items() if rank >= config.capable}
        if not capable:
            raise ValueError(f"No client can afford rank {config.capable}; lower capable_rank or change rank_policy.")
        return config.r_max, capable
    return config.r_max, dict.fromkeys(initial_ranks, config.r_max)


def arm_adapter_config(config: SimulationConfig, r: int, wb: Any, prune: bool = True) -> HetLoRAConfig:
    """The `HetLoRAConfig` of an arm at rank `r` on the workbench `wb` (its target layers and model folder).

    Every arm uses the scale s = alpha / r_max of the heterogeneous federation (docs/design.md#the-scale-rule), so
    an arm's rank changes its capacity, never its step size; arms without self-pruning get no regulariser either.

    Example:
        ```py
        >>> from types import SimpleNamespace
        >>> config = SimulationConfig.from_sources(profile="quick")
        >>> wb = SimpleNamespace(target_layers=[1], model_dir="model")
        >>> c = arm_adapter_config(config, 2, wb, prune=False)
        >>> c.r, c.lora_alpha / c.r == config.lora_alpha / config.r_max, c.prune_lambda
        (2, True, 0.0)
        ```
    """
    scale = scaling_for(config.lora_alpha, config.r_max, config.rank_scaling)
    alpha = scale * r if config.rank_scaling == "fixed" else scale * math.sqrt(r)
    return HetLoRAConfig(
        r=r,
        rank=r,
        r_min=min(config.r_min, r),
        lora_alpha=alpha,
        rank_scaling=config.rank_scaling,
        target_modules=list(config.target_modules),
        layers_to_transform=wb.target_layers,
        # arms without self-pruning train plain LoRA: no regulariser either (the paper's "w/o self-pruning")
        prune_lambda=config.prune_lambda if prune else 0.0,
        prune_gamma=config.prune_gamma,
        base_model_name_or_path=str(wb.model_dir),
        task_type="CAUSAL_LM",
    )
