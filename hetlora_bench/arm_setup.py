"""What an arm runs with: its ranks, its adapter config, its federation settings record and its base model's identity
(shared by the in-process and the Flower engine)."""

from __future__ import annotations

import math
from typing import Any

from peft_hetlora.config import HetLoRAConfig, scaling_for
from peft_hetlora.federated import FederationSettings

from .arms import ARMS, SimulationConfig

__all__ = ["arm_adapter_config", "arm_coordinator_settings", "arm_ranks", "record_arm_base"]


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


def arm_coordinator_settings(
    config: SimulationConfig, arm: str, r_arm: int, ranks: dict[str, int], seed: int
) -> FederationSettings:
    """The federation settings record of an arm (`FederationSettings`): what both engines run it with (the
    in-process `Coordinator` and the Flower `HetLoRAStrategy`): method, ranks, clients, sampling (the arm's
    ``"sampling"`` policy, default uniform), clip, DP, component selection.

    DP arms: `DPConfig(target_epsilon=..., rounds=config.rounds, sampling_rate=clients_per_round / N,
    population=N)` (so delta = 1 / N**1.1, Poisson sampling) with clip ``config.dp_clip`` and the expected
    coverage of each component from the (public) device ranks. DP arms do not self-prune: a pruned rank is a
    data-dependent value the server would see outside the noise.

    Example:
        ```py
        >>> cfg = SimulationConfig.from_sources(profile="quick")
        >>> settings = arm_coordinator_settings(cfg, "window_fedavg", 8, {"a": 2, "b": 8}, 0)
        >>> settings.method, settings.component_selection, settings.clients, settings.rank_policy.kind
        ('component_fedavg', 'coverage', ('a', 'b'), 'explicit')
        ```
    """
    spec = ARMS[arm]
    clients = sorted(ranks)
    per_round = min(config.clients_per_round, len(clients))
    dp = None
    if "dp_epsilon" in spec:
        from peft_hetlora.federated.aggregation.privacy import DPConfig

        dp = DPConfig(
            clip=config.dp_clip,
            target_epsilon=float(spec["dp_epsilon"]),
            rounds=config.rounds,
            sampling_rate=per_round / len(clients),
            population=len(clients),
            accountant=config.dp_accountant,
            # public: the device ranks, not the data; component j is divided by q * N * coverage_j
            expected_coverage=tuple(sum(r > j for r in ranks.values()) / len(clients) for j in range(r_arm)),
        )
    anchor = None
    if "anchor" in spec:
        anchor = r_arm if spec["anchor"] == "r_max" else min(int(spec["anchor"]), r_arm)
    return FederationSettings.from_kwargs(
        method=spec["aggregation"], r_max=r_arm, r_min=min(config.r_min, r_arm), clients=clients, rank_policy=ranks,
        clients_per_round=per_round, rounds=config.rounds, seed=seed, clip_norm=config.clip_norm, dp=dp,
        component_selection=spec.get("selection"), anchor=anchor,
        server_optimizer=(config.server_optimizer(spec["server_optimizer"]) if "server_optimizer" in spec else None),
        error_feedback=True if spec.get("error_feedback") else None,
        client_training=spec.get("client_training"),
        client_sampling=spec.get("sampling"),
        rank_sampling_rounds=spec.get("sampling_rounds"),
    )


def record_arm_base(store: Any, model: Any, adapter_config: Any, wb: Any) -> dict[str, Any] | None:
    """Record the arm's base model in its store's federation.json, as `hetlora init` does for a real coordinator
    (`peft_hetlora.base_identity.record_base_identity`): the simulated clients' `FederatedClientCallback` then
    checks its base against it, as a deployed client does. Returns the record.

    `model` is the base model or the arm's PEFT model on it (the adapted layers' base weights are hashed); the name
    is the model folder the adapter config names, the revision what `model_source.model_revision` knows of
    ``wb.config.model``. A base quantised on load (``wb.config.quantize``) has no weights to hash: nothing is
    recorded (a client's check skips such a base with its own notice) and None is returned.

    Example:
        ```py
        >>> import tempfile, torch
        >>> from types import SimpleNamespace
        >>> from peft_hetlora.federated import LocalStore
        >>> config = SimulationConfig.from_sources(profile="quick")
        >>> wb = SimpleNamespace(config=config, target_layers=None, model_dir="toy")
        >>> base = torch.nn.ModuleDict({name: torch.nn.Linear(2, 2) for name in config.target_modules})
        >>> store = LocalStore(tempfile.mkdtemp(), create=True)
        >>> store.write_federation({"r_max": config.r_max})
        >>> record = record_arm_base(store, base, arm_adapter_config(config, config.r_max, wb), wb)
        >>> store.read_federation()["base_model_identity"] == record, record["modules"] == len(config.target_modules)
        (True, True)
        ```
    """
    from peft_hetlora.base_identity import base_identity, record_base_identity
    from peft_hetlora.model_source import model_revision

    if getattr(wb.config, "quantize", None) is not None:
        return None
    record = base_identity(model, adapter_config, name=str(wb.model_dir), revision=model_revision(wb.config.model))
    record_base_identity(store, record)
    return record
