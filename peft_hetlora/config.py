"""`HetLoRAConfig`: a `LoraConfig` whose `r` is the federation's maximum rank r_max."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from peft import LoraConfig
from peft.utils.peft_types import PeftType

from .utils.errors import ConfigMismatchError
from .utils.federation_fields import FEDERATION_FIELDS, federation_adapter_config, normalise_setting
from .utils.ranks import MAX_RANK, check_rank
from .utils.scaling import RANK_SCALINGS, scaling_for, tail_start

__all__ = ["HETLORA", "HETLORA_PEFT_TYPE", "RANK_SCALINGS", "HetLoRAConfig", "scaling_for", "tail_start"]

HETLORA = "HETLORA"
_LORA_VARIANT_FIELDS = (
    "velora_config",
    "alora_invocation_tokens",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
)
_SUPPORTED_STRING_INITS = ("gaussian", "orthogonal")


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


#: the PEFT type of a HetLoRA adapter (``"peft_type": "HETLORA"`` in adapter_config.json)
HETLORA_PEFT_TYPE = _extend_peft_type(HETLORA)


def _check_int(name: str, value: object, low: int, high: int | None, hint: str) -> None:
    check_rank(value, low, MAX_RANK if high is None else high, what=f"`{name}`", hint=f"it must be {hint}")


@dataclass
class HetLoRAConfig(LoraConfig):
    """Configuration of a HetLoRA adapter (Cho et al., 2024).

    `r` is the federation's maximum rank r_max: the global adapter lives at that rank and the scale
    `lora_alpha / r` (or `lora_alpha / sqrt(r)` with `rank_scaling="rslora"`) is the same for every
    client whatever its own rank, so truncating an adapter keeps exactly its first components.
    `rank` is this client's rank r_k: its parameters (and optimizer state) are allocated at `rank`,
    not `r`.

    Example:
        ```py
        >>> import peft_hetlora  # registers the HETLORA type with PEFT
        >>> from peft import get_peft_model
        >>> config = peft_hetlora.HetLoRAConfig(
        ...     r=16, rank=4, r_min=2, lora_alpha=32, target_modules=["q_proj", "v_proj"]
        ... )
        >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
        >>> model.get_rank()  # doctest: +SKIP
        4
        ```
    """

    rank: int | None = field(
        default=None,
        metadata={"help": "This client's LoRA rank r_k (r_min <= rank <= r). Defaults to `r` (full rank)."},
    )
    r_min: int = field(
        default=1,
        metadata={"help": "Smallest rank of the federation: self-pruning never goes below it."},
    )
    rank_scaling: Literal["fixed", "rslora"] = field(
        default="fixed",
        metadata={
            "help": "Scale rule shared by all clients: 'fixed' uses lora_alpha / r_max, 'rslora' lora_alpha / "
            "sqrt(r_max). Rank-independent so truncation keeps exactly the first components."
        },
    )
    prune_gamma: float = field(
        default=0.99,
        metadata={"help": "Rank decay gamma in (0, 1): the regularised tail starts at floor(gamma * rank)."},
    )
    prune_lambda: float = field(
        default=0.0,
        metadata={"help": "Weight lambda >= 0 of the self-pruning regulariser sum_m ||B tail|| ||A tail||."},
    )

    components: list[int] | None = field(
        default=None,
        metadata={
            "help": "Window training: the global component index of each trainable slot (ascending, unique, < r, "
            "as many as `rank`). None: the prefix range(rank) (HetLoRA). Set by `set_components`; saved with a "
            "window adapter so its slots can be placed back in the global."
        },
    )
    nested: bool = field(
        default=False,
        metadata={
            "help": "Nested training (PreLort arXiv 2606.15963, Matryoshka arXiv 2205.13147): each optimizer step "
            "trains under a random truncation k' uniform in [max(1, r_min), rank] (HetLoRACallback draws it)."
        },
    )
    nested_seed: int = field(default=0, metadata={"help": "Seed of the nested truncation draws."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = HETLORA_PEFT_TYPE
        _check_int("r", self.r, 1, None, "a positive integer (the federation's maximum rank r_max)")
        if self.rank is None:
            self.rank = self.r
        _check_int("rank", self.rank, 1, self.r, f"between 1 and r={self.r} (the client's rank <= r_max)")
        _check_int("r_min", self.r_min, 1, self.r, f"between 1 and r={self.r}")
        if self.rank < self.r_min:
            raise ValueError(f"`rank` ({self.rank}) must be >= `r_min` ({self.r_min}); lower r_min or raise rank.")
        if self.rank_scaling not in RANK_SCALINGS:
            raise ValueError(f"`rank_scaling` must be one of {RANK_SCALINGS}, got {self.rank_scaling!r}.")
        if self.use_rslora:
            raise ValueError("Use `rank_scaling='rslora'` instead of `use_rslora=True` for HetLoRA.")
        if self.components is not None:
            window = self.components
            if isinstance(window, (str, bytes)) or not isinstance(window, (list, tuple)):
                raise ValueError(f"`components` must be a list of integers or None, got {window!r}.")
            bad = [j for j in window if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < self.r]
            if bad or len(set(window)) != len(window):
                raise ValueError(f"`components` must be unique integers in [0, r={self.r}), got {list(window)}.")
            if len(window) != self.rank:
                raise ValueError(f"`components` names {len(window)} components but `rank` is {self.rank}.")
            self.components = sorted(window)
        if not isinstance(self.nested, bool):
            raise ValueError(f"`nested` must be True or False, got {self.nested!r}.")
        if (
            isinstance(self.prune_gamma, bool)
            or not isinstance(self.prune_gamma, (int, float))
            or not (0.0 < self.prune_gamma < 1.0)
        ):
            raise ValueError(f"`prune_gamma` must be a float in the open interval (0, 1), got {self.prune_gamma!r}.")
        if (
            isinstance(self.prune_lambda, bool)
            or not isinstance(self.prune_lambda, (int, float))
            or not (self.prune_lambda >= 0.0 and math.isfinite(self.prune_lambda))
        ):
            raise ValueError(f"`prune_lambda` must be a finite float >= 0, got {self.prune_lambda!r}.")
        unsupported = {
            "use_dora": self.use_dora,
            "lora_bias": self.lora_bias,
            "rank_pattern": bool(self.rank_pattern),
            "alpha_pattern": bool(self.alpha_pattern),
            # LoRA variants: HetLoRA's forward is plain LoRA and would silently ignore them
            **{name: bool(getattr(self, name, None)) for name in _LORA_VARIANT_FIELDS},
            # data-/weight-driven inits rewrite the base weight with scale alpha / rank, not alpha / r_max
            f"init_lora_weights={self.init_lora_weights!r}": isinstance(self.init_lora_weights, str)
            and self.init_lora_weights.lower() not in _SUPPORTED_STRING_INITS,
        }
        bad = [name for name, value in unsupported.items() if value]
        if bad:
            raise ValueError(
                f"HetLoRA does not support {', '.join(bad)}: one r_max and one lora_alpha per adapter keep every "
                "client on the same scale. Remove these options (use `export_lora` for a plain LoRA with patterns)."
            )

    @classmethod
    def from_federation(cls, source: Any, *, rank: int | None = None, **client_settings: Any) -> HetLoRAConfig:
        """This client's config built from its federation's settings, so it cannot differ from them.

        `source` is an `AdapterStore` (`LocalStore`, `HubStore`) or a local folder (a store, or a saved
        global adapter). r_max, lora_alpha, rank_scaling, target modules, layers, bias and fan_in_fan_out
        come from the federation; `rank` is this client's budget (default r_max); `client_settings` sets
        local choices such as `prune_lambda` (a contradiction of the federation raises `ConfigMismatchError`).

        Example:
            ```py
            >>> store = LocalStore("runs/fed")  # doctest: +SKIP
            >>> config = HetLoRAConfig.from_federation(store, rank=4, prune_lambda=0.05)  # doctest: +SKIP
            >>> config.r, config.rank  # doctest: +SKIP
            (16, 4)
            ```
        """
        federation = federation_adapter_config(source)
        for name, value in client_settings.items():
            theirs = federation.get(name)
            if name in FEDERATION_FIELDS and normalise_setting(name, value) != normalise_setting(name, theirs):
                raise ConfigMismatchError(
                    f"{name}={value!r} contradicts the federation's {name}={theirs!r}; drop the argument (the "
                    "federation's value is used)."
                )
        known = set(cls.__dataclass_fields__)
        settings = {k: v for k, v in federation.items() if k in known and k not in ("peft_type", "rank")}
        settings["inference_mode"] = False  # saved adapters say True; a client trains
        settings.update(client_settings)
        settings["rank"] = int(settings["r"]) if rank is None else rank
        r_min = settings.get("r_min") or 1
        check_rank(settings["rank"], r_min, int(settings["r"]), what="rank", lo_name="r_min", hi_name="r_max",
                   hint=f"a rank below the federation's r_min means this device cannot take part (its budget must be "
                        f"at least {r_min})")
        return cls(**settings)

    @property
    def scaling(self) -> float:
        """The rank-independent scale s every client and the server use."""
        return scaling_for(self.lora_alpha, self.r, self.rank_scaling)
