"""One settings record: `FederationSettings`, the settings a federation is started or resumed with.

Validated once, in ``__post_init__``; frozen; serialised as the settings of ``federation.json`` (`to_json`) and read
back from any ``federation.json``, old ones included (`from_json`: fields an older file lacks mean what they meant
then). Built by ``hetlora coordinate`` / ``hetlora init`` from their arguments and by the `Coordinator` (its keyword
form ``Coordinator(store, method=..., ...)`` builds one); passed by composition: ``Coordinator(store, settings, *,
clock, sleep, progress, poll_interval_s)``. A field left ``None`` is not given: a resumed coordinator takes it from
``federation.json``, a new federation from the defaults (the method: `round.default_method_and_selection`).

Example:
    ```py
    >>> s = FederationSettings(method="rankwise", clients=("a", "b"), rounds=3)
    >>> s.to_json()["method"], s.clients
    ('rankwise', ('a', 'b'))
    >>> FederationSettings.from_json(s.to_json()) == s
    True
    ```

The same module holds the federation record itself (``federation.json``, formerly ``federation.py``): what a
federation is, built once by `new_federation` from the initial adapter and the settings (initial ranks from the rank
policy), and checked on every resume (`setting_differences`); `scaling_from_config`, `global_adapter_config`.

    ```py
    >>> scaling_from_config({"lora_alpha": 32, "rank_scaling": "fixed"}, 16)
    2.0
    ```
"""


from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..utils.errors import CoordinatorError, FederationMismatch
from ..utils.ranks import check_rank
from ..utils.scaling import scaling_for
from .adapter import module_ranks
from .aggregation import AGGREGATION_METHODS, get_aggregation, parse_influence_bound
from .aggregation.privacy import DPConfig, dp_config_from_dict
from .policies import DEFAULT_CLIENT_SAMPLING, RankPolicy, check_client_sampling, check_rank_sampling_rounds
from .round import (
    FEDERATION_FORMAT,
    NEXT_RANK_RULES,
    check_client_training,
    check_dp,
    check_selection,
    check_server_step,
    default_method_and_selection,
    parse_server_optimizer,
)
from .stores import validate_client_id
from .upload import DEFAULT_MAX_EXAMPLES, UploadSpec, parse_message_format

__all__ = [
    "ADAPTER_MATH_FIELDS",
    "IDENTITY_FIELDS",
    "RECORDED_FIELDS",
    "SETTING_FIELDS",
    "FederationSettings",
    "ResolvedSettings",
    "global_adapter_config",
    "initial_identity",
    "lora_module_dims",
    "new_federation",
    "scaling_from_config",
    "setting_differences",
]

#: The fields of `FederationSettings` that ``federation.json`` records (the rest are the coordinator's upload limits
#: and test switches, given again on every start).
RECORDED_FIELDS = ("method", "r_max", "r_min", "clients", "clients_per_round", "min_clients", "rounds", "seed",
                   "scaling", "clip_norm", "max_upload_bytes", "deadline_s", "next_rank", "dp", "component_selection",
                   "anchor", "message_formats", "rank_policy", "server_optimizer", "error_feedback",
                   "client_training", "client_sampling", "rank_sampling_rounds")


@dataclass(frozen=True)
class FederationSettings:
    """The settings of a federation (``None``: not given; see the module docstring).

    Args:
        method: a registered aggregation method (`AGGREGATION_METHODS`).
        r_max, r_min: the rank bounds (``r_max`` defaults to the initial adapter's ``r``, ``r_min`` to 1).
        clients: the federation's client ids (unique, valid ids).
        rank_policy: `RankPolicy`, a policy name or ``{client_id: rank}`` (default: the method's
            ``default_rank_policy``).
        clients_per_round, min_clients, rounds, seed: sampling and the round count (defaults: all clients,
            ``clients_per_round``, 1, 0).
        scaling: override of ``s`` for norms and clipping (default from the adapter config).
        clip_norm: the influence bound: a number, ``"adaptive"`` or ``"off"`` (`influence.parse_influence_bound`).
        max_upload_bytes, deadline_s, next_rank: upload size limit, the round deadline, ``"rank_out"`` /
            ``"initial"``.
        dp: a `privacy.DPConfig` (or its dict form from ``federation.json``).
        component_selection, anchor: which components each participant trains (window policies need a method with
            ``accepts_components``).
        message_formats: the compressed upload formats clients may declare (None: all).
        server_optimizer, error_feedback: the server step after aggregation (`round.RoundSettings`; a dict such as
            ``{"name": "fedavgm", "lr": 1.0, "momentum": 0.9}``, and True / False; default: none, off).
        client_training: ``"factors"`` (default) or ``"core"``: participants below ``r_max`` train a core inside the
            global's subspace (docs/methods.md#core-clients; needs a method with ``accepts_core``).
        client_sampling: how a round's participants are drawn (`policies.CLIENT_SAMPLING`): ``"uniform"`` (default)
            or ``"rank"`` (in proportion to each client's current rank; docs/methods.md#client-sampling; not with
            ``dp``, whose accountant assumes uniform Poisson sampling).
        rank_sampling_rounds: with ``client_sampling="rank"``, draw only the first N rounds by rank and the rest
            uniformly (default None: every round by rank; `policies.sampling_for_round`).
        max_examples, allow_per_module_ranks, require_global_revision, dp_noise_seed: the coordinator's upload limits
            and the reproducible-DP test switch (not recorded in ``federation.json``).

    Raises:
        ValueError: a setting no federation can run (unknown method, bad ranks, duplicate clients, a non-positive
            deadline, ...); `AggregationError` for DP / window settings the round engine refuses.

    Example:
        ```py
        >>> FederationSettings(clip_norm="off", message_formats=["fp16", "bf16"]).message_formats
        ('bf16', 'fp16')
        ```
    """

    method: str | None = None
    r_max: int | None = None
    r_min: int | None = None
    clients: tuple[str, ...] | None = None
    rank_policy: RankPolicy | None = None
    clients_per_round: int | None = None
    min_clients: int | None = None
    rounds: int | None = None
    seed: int | None = None
    scaling: float | None = None
    clip_norm: float | str | None = None
    max_upload_bytes: int | None = None
    deadline_s: float | None = None
    next_rank: str | None = None
    dp: DPConfig | None = None
    component_selection: str | None = None
    anchor: int | None = None
    message_formats: tuple[str, ...] | None = None
    server_optimizer: Mapping[str, Any] | None = None
    error_feedback: bool | None = None
    client_training: str | None = None
    client_sampling: str | None = None
    rank_sampling_rounds: int | None = None
    max_examples: int = DEFAULT_MAX_EXAMPLES
    allow_per_module_ranks: bool = False
    require_global_revision: bool = False
    dp_noise_seed: bool = False

    def __post_init__(self) -> None:
        put = object.__setattr__
        if self.method is not None and self.method not in AGGREGATION_METHODS:
            raise ValueError(f"Unknown method {self.method!r}; use one of {tuple(AGGREGATION_METHODS)}.")
        if self.next_rank is not None and self.next_rank not in NEXT_RANK_RULES:
            raise ValueError(f"next_rank must be one of {NEXT_RANK_RULES}, got {self.next_rank!r}.")
        if isinstance(self.dp, Mapping):
            put(self, "dp", dp_config_from_dict(self.dp))
        method, selection = default_method_and_selection(self.method, self.component_selection, self.dp)
        check_dp(method, self.dp)
        if self.component_selection is not None or self.anchor is not None:
            # the method may still come from federation.json: the round settings check it again then
            check_selection(method, selection, self.anchor or 0, r_max=self.r_max, dp=self.dp)
        if self.client_training is not None:
            check_client_training(method, self.client_training, selection, dp=self.dp)
        if self.client_sampling is not None:
            check_client_sampling(self.client_sampling, poisson=self.dp is not None)
        if self.rank_sampling_rounds is not None:
            # a resumed federation may take client_sampling from federation.json: plan_round checks the pair again
            check_rank_sampling_rounds(self.rank_sampling_rounds, self.client_sampling or "rank")
        for name in ("clients", "message_formats"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, (str, bytes)) or not isinstance(value, Sequence)):
                raise TypeError(f"{name} must be a list of names, got {type(value).__name__}.")
        if self.clients is not None and not self.clients:
            put(self, "clients", None)  # no clients given: a resumed federation's, a new one refuses it
        if self.clients is not None:
            clients = tuple(validate_client_id(c) for c in self.clients)
            if len(set(clients)) != len(clients):
                raise ValueError("Client ids must be unique.")
            put(self, "clients", clients)
        if self.rank_policy is not None:
            put(self, "rank_policy", RankPolicy.coerce(self.rank_policy))
        if self.clip_norm is not None:
            put(self, "clip_norm", parse_influence_bound(self.clip_norm))  # a number, "adaptive" or "off"
        for name in ("deadline_s", "scaling"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        if self.server_optimizer is not None:
            put(self, "server_optimizer", parse_server_optimizer(self.server_optimizer).to_dict())
        if self.error_feedback is not None:
            # the method may still come from federation.json: the round settings check it again then
            check_server_step(method, self.server_optimizer, self.error_feedback, dp=self.dp)
        if self.message_formats is not None:
            formats = tuple(sorted({parse_message_format(name).name for name in self.message_formats}))
            if not formats:
                raise ValueError("message_formats must name at least one format (or None for all).")
            put(self, "message_formats", formats)

    def requested(self) -> dict[str, Any]:
        """The recorded settings as the coordinator compares them with ``federation.json`` (``None``: not given).

        Example:
            ```py
            >>> FederationSettings(clients=("a",), dp=None).requested()["clients"]
            ['a']
            ```
        """
        out = {name: getattr(self, name) for name in RECORDED_FIELDS if name != "rank_policy"}
        out["clients"] = list(self.clients) if self.clients else None
        out["dp"] = self.dp.to_dict() if self.dp is not None else None
        out["message_formats"] = list(self.message_formats) if self.message_formats is not None else None
        return out

    def to_json(self) -> dict[str, Any]:
        """The given recorded settings in ``federation.json``'s form (fields left ``None`` are left out).

        Example:
            ```py
            >>> FederationSettings(rounds=2).to_json()
            {'rounds': 2}
            ```
        """
        out = {name: value for name, value in self.requested().items() if value is not None}
        if self.rank_policy is not None:
            out["rank_policy"] = self.rank_policy.to_dict()
        return out

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> FederationSettings:
        """The settings recorded in a ``federation.json`` (any version: what an older file lacks stays ``None``,
        which means what it meant when the file was written; other fields of the record are ignored).

        Example:
            ```py
            >>> FederationSettings.from_json({"format": 1, "r_max": 8, "clients": ["a", "b"]}).r_max
            8
            ```
        """
        given = {name: record[name] for name in RECORDED_FIELDS if record.get(name) is not None}
        if "rank_policy" in given:
            given["rank_policy"] = RankPolicy.from_dict(given["rank_policy"])
        for name in ("clients", "message_formats"):
            if isinstance(given.get(name), list):
                given[name] = tuple(given[name])
        return cls(**given)

    def replace(self, **changes: Any) -> FederationSettings:
        """A copy with ``changes`` (validated again).

        Example:
            ```py
            >>> FederationSettings(rounds=2).replace(rounds=5).rounds
            5
            ```
        """
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> FederationSettings:
        """The record of the keyword form ``Coordinator(store, method=..., clients=[...], ...)``: lists become
        tuples; every keyword is a field.

        Example:
            ```py
            >>> FederationSettings.from_kwargs(clients=["a", "b"]).clients
            ('a', 'b')
            ```
        """
        for name in ("clients", "message_formats"):
            value = kwargs.get(name)
            if value is not None and not isinstance(value, tuple) and isinstance(value, Sequence):
                kwargs[name] = tuple(value)
        return cls(**kwargs)

    @classmethod
    def given(cls, settings: FederationSettings | None, kwargs: Mapping[str, Any], *,
              owner: str) -> FederationSettings:
        """The record an owner (``Coordinator``, ``HetLoRAStrategy``) was given: ``settings`` itself, or the record of
        its setting keywords (`from_kwargs`), never both.

        Raises:
            TypeError: both were given, or ``settings`` is not a `FederationSettings`.

        Example:
            ```py
            >>> FederationSettings.given(None, {"method": "rankwise"}, owner="Coordinator").method
            'rankwise'
            ```
        """
        if settings is None:
            return cls.from_kwargs(**kwargs)
        if kwargs:
            raise TypeError(f"{owner}: pass the settings record or setting keywords, not both (got {sorted(kwargs)} "
                            "with a FederationSettings).")
        if not isinstance(settings, FederationSettings):
            raise TypeError(f"{owner}: settings must be a FederationSettings, got {type(settings).__name__}.")
        return settings


logger = logging.getLogger(__name__)


# Settings a resumed coordinator must share with the store's federation.json.
#: The method of a federation.json that records none: files written before the method was recorded ran HetLoRA,
#: the default of those versions. Not a default for new federations (that is `round.DEFAULT_METHOD`).
UNRECORDED_METHOD = "hetlora"
IDENTITY_FIELDS = ("method", "r_max", "r_min", "base_model")
# Every setting federation.json records; a coordinator given another value than the stored one is refused
# (FederationMismatch), except `rounds`, which may grow (extending a federation).
SETTING_FIELDS = ("method", "r_max", "r_min", "clients", "clients_per_round", "min_clients", "seed", "scaling",
                  "clip_norm", "max_upload_bytes", "deadline_s", "next_rank", "dp", "component_selection", "anchor",
                  "message_formats", "server_optimizer", "error_feedback", "client_training", "client_sampling",
                  "rank_sampling_rounds")
# What a federation.json without the setting means (older records).
_SETTING_DEFAULTS = {"component_selection": "prefix", "anchor": 0, "server_optimizer": None, "error_feedback": False,
                     "client_training": "factors", "client_sampling": DEFAULT_CLIENT_SAMPLING,
                     "rank_sampling_rounds": None}
# Fields of the adapter config that change the math: an initial adapter that differs in one is another federation.
ADAPTER_MATH_FIELDS = ("lora_alpha", "rank_scaling", "target_modules", "layers_to_transform", "layers_pattern",
                       "bias", "fan_in_fan_out", "modules_to_save")


def scaling_from_config(adapter_config: Mapping[str, Any], r_max: int) -> float:
    """s = lora_alpha / r_max (`rank_scaling="fixed"`) or lora_alpha / sqrt(r_max) (`"rslora"`).

    Example:
        ```py
        >>> scaling_from_config({"lora_alpha": 32, "rank_scaling": "fixed"}, 16)
        2.0
        ```
    """
    return scaling_for(float(adapter_config.get("lora_alpha", 8)), r_max, adapter_config.get("rank_scaling", "fixed"))


def global_adapter_config(adapter_config: Mapping[str, Any], *, r_max: int, r_min: int) -> dict:
    """The HETLORA `adapter_config.json` of the global adapter (full rank r_max).

    A plain PEFT LoRA config (`"peft_type": "LORA"`) is converted: `use_rslora` becomes
    `rank_scaling="rslora"`; per-module patterns are refused (one r_max, one alpha).

    Example:
        ```py
        >>> cfg = global_adapter_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16}, r_max=8, r_min=2)
        >>> cfg["peft_type"], cfg["rank"], cfg["r_min"], cfg["rank_scaling"]
        ('HETLORA', 8, 2, 'fixed')
        ```
    """
    config = dict(adapter_config)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type == "LORA":
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise ValueError("The initial LoRA adapter uses rank_pattern/alpha_pattern; HetLoRA needs one r and one "
                             "lora_alpha for all modules. Start from an adapter without patterns.")
        config["rank_scaling"] = "rslora" if config.get("use_rslora") else "fixed"
        config["use_rslora"] = False
        config["peft_type"] = "HETLORA"
    elif peft_type != "HETLORA":
        raise ValueError(f"The initial adapter's peft_type is {config.get('peft_type')!r}; expected HETLORA or LORA.")
    if config.get("r") != r_max:
        raise ValueError(f"The initial adapter has r={config.get('r')} but the federation's r_max is {r_max}; "
                         "save the initial adapter at r_max (HetLoRAConfig(r=r_max)).")
    config["rank"] = r_max
    config["r_min"] = r_min
    config.setdefault("rank_scaling", "fixed")
    return config


def lora_module_dims(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """{module: (d_in, d_out)} of an adapter state dict (PEFT saved keys)."""
    spec = UploadSpec.from_state_dict(state_dict, r_min=1, r_max=1 << 30)
    return dict(spec.modules)


def initial_identity(state_dict: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any], *, r_max: Any,
                     r_min: Any) -> tuple[dict, dict, dict[str, tuple[int, int]]]:
    """(identity, global adapter config, module dims) of a federation started from this r_max adapter.

    Raises:
        RankError: r_max / r_min not integers with 1 <= r_min <= r_max.
        ValueError: the adapter is not at rank r_max, or its config cannot be a HetLoRA global's.
    """
    check_rank(r_max, 1, 1 << 30, what="r_max", hint="r_max defaults to the initial adapter's `r`")
    check_rank(r_min, 1, r_max, what="r_min", hi_name="r_max")
    module_dims = lora_module_dims(state_dict)
    ranks_found = set(module_ranks(state_dict).values())
    if ranks_found != {r_max}:
        raise ValueError(f"The initial adapter has rank(s) {sorted(ranks_found)} but r_max is {r_max}: save it at "
                         "full rank (set_rank(r_max) before save_pretrained).")
    config = global_adapter_config(adapter_config, r_max=r_max, r_min=r_min)
    identity = {
        "r_max": r_max,
        "base_model": config.get("base_model_name_or_path"),
        "modules": {name: list(dims) for name, dims in module_dims.items()},
    }
    return identity, config, module_dims


def _as_set_if_list(value: Any) -> Any:
    # PEFT saves set-valued options (target_modules) as lists in hash order, which differs between processes
    return frozenset(map(str, value)) if isinstance(value, (list, tuple, set, frozenset)) else value


def _same_setting(name: str, stored: Any, given: Any) -> bool:
    if name == "clients" and isinstance(stored, list) and isinstance(given, list):
        return sorted(stored) == sorted(given)
    return stored == given


def setting_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any], config: Any,
                        requested_rounds: int | None) -> list[str]:
    """The settings in ``wanted`` (and the adapter config's math fields) that differ from federation.json.

    ``rounds`` may only grow: a smaller requested number is a difference.

    Example:
        ```py
        >>> setting_differences({"r_max": 8}, {"r_max": 16}, None, None)
        ['r_max: store has 8, this coordinator 16']
        ```
    """
    # a federation.json written before these settings existed trained prefixes
    stored = {**_SETTING_DEFAULTS, **stored}
    diffs = [f"{name}: store has {stored[name]!r}, this coordinator {value!r}"
             for name, value in wanted.items() if name in stored and not _same_setting(name, stored[name], value)]
    if isinstance(config, Mapping) and isinstance(stored.get("adapter_config"), Mapping):
        stored_config = stored["adapter_config"]
        for name in ADAPTER_MATH_FIELDS:
            if _as_set_if_list(stored_config.get(name)) != _as_set_if_list(config.get(name)):
                diffs.append(f"adapter_config.{name}: store has {stored_config.get(name)!r}, the initial "
                             f"adapter {config.get(name)!r}")
    stored_rounds = stored.get("rounds")
    if requested_rounds is not None and isinstance(stored_rounds, int) and requested_rounds < stored_rounds:
        diffs.append(f"rounds: store has {stored_rounds!r}, this coordinator {requested_rounds!r} (rounds can "
                     "only be extended)")
    return diffs


def new_federation(identity: Mapping[str, Any], config: Mapping[str, Any], module_dims: Mapping[str, tuple[int, int]],
                   requested: Mapping[str, Any], policy: RankPolicy | None, created_at: float) -> dict:
    """The federation.json record of a new federation (initial ranks drawn from the rank policy).

    Raises:
        ValueError: no clients, fedavg with unequal ranks, or inconsistent ``min_clients`` / ``clients_per_round``.
    """
    clients: Sequence[str] | None = requested["clients"]
    if not clients:
        raise ValueError("A new federation needs its client ids (clients=[...]).")
    method = identity["method"]
    r_min, r_max = identity["r_min"], identity["r_max"]
    kind = get_aggregation(method)
    policy = policy or RankPolicy(kind.default_rank_policy)
    seed = requested["seed"] if requested["seed"] is not None else 0
    initial_ranks = policy.assign(clients, r_min=r_min, r_max=r_max, module_dims=module_dims, seed=seed)
    if kind.homogeneous and len(set(initial_ranks.values())) > 1:
        raise ValueError(f"{method} is homogeneous LoRA: every client needs the same rank; use "
                         "RankPolicy('constant', rank=r) (or a heterogeneous method such as hetlora).")
    clients_per_round = requested["clients_per_round"] or len(clients)
    min_clients = requested["min_clients"] or clients_per_round
    if not 1 <= min_clients <= clients_per_round <= len(clients):
        raise ValueError(f"Need 1 <= min_clients ({min_clients}) <= clients_per_round ({clients_per_round}) "
                         f"<= number of clients ({len(clients)}).")
    check_rank(r_min, 1, r_max, what="r_min", hi_name="r_max")
    record = {
        "format": FEDERATION_FORMAT,
        **identity,
        "adapter_config": dict(config),
        "scaling": requested["scaling"] or scaling_from_config(config, r_max),
        "clients": list(clients),
        "rank_policy": policy.to_dict(),
        "initial_ranks": initial_ranks,
        "clients_per_round": clients_per_round,
        "min_clients": min_clients,
        "rounds": requested["rounds"] or 1,
        "seed": seed,
        "clip_norm": requested["clip_norm"],
        "max_upload_bytes": requested["max_upload_bytes"],
        "deadline_s": requested["deadline_s"],
        "next_rank": requested["next_rank"] or "rank_out",
        "created_at": created_at,
    }
    if requested.get("dp") is not None:
        record["dp"] = requested["dp"]
    record["component_selection"] = requested.get("component_selection") or "prefix"
    record["anchor"] = requested.get("anchor") or 0
    record["message_formats"] = requested.get("message_formats")  # None: every format
    record["server_optimizer"] = requested.get("server_optimizer")  # None: the method's aggregate, no server step
    record["error_feedback"] = bool(requested.get("error_feedback"))
    record["client_training"] = requested.get("client_training") or "factors"
    record["client_sampling"] = requested.get("client_sampling") or DEFAULT_CLIENT_SAMPLING
    record["rank_sampling_rounds"] = requested.get("rank_sampling_rounds")  # None: every round by rank (or uniform)
    check_rank_sampling_rounds(record["rank_sampling_rounds"], record["client_sampling"])
    return record


class ResolvedSettings:
    """A federation's settings as a coordinator runs them: each the given value (the `FederationSettings` record),
    else federation.json's, else the default. The `Coordinator` holds one (``coordinator.resolved``).

    ``requested`` is ``settings.requested()`` (``None`` = not given); ``record`` is the store's ``federation.json``
    once read (checked against the given settings) or written.

    Example:
        ```py
        >>> from peft_hetlora.federated.stores import LocalStore
        >>> import tempfile
        >>> resolved = ResolvedSettings(LocalStore(tempfile.mkdtemp()), FederationSettings(clients=("a", "b")))
        >>> resolved.clients, resolved.seed, resolved.get("deadline_s", 60.0)
        (['a', 'b'], 0, 60.0)
        ```
    """

    def __init__(self, store: Any, settings: FederationSettings) -> None:
        self.store = store
        self.requested: dict[str, Any] = settings.requested()
        self.rank_policy = settings.rank_policy
        self.record: dict | None = None
        self._dp = settings.dp

    def get(self, name: str, default: Any = None) -> Any:
        """Setting ``name``: given, else federation.json's, else ``default``."""
        value = self.requested.get(name)
        if value is None:
            federation = self.stored_federation()
            if federation is not None:
                value = federation.get(name)
        return default if value is None else value

    def stored_federation(self) -> dict | None:
        """federation.json if the store has one (checked against this coordinator), else None."""
        if self.record is None and self.store.read_federation() is not None:
            return self.federation
        return self.record

    @property
    def federation(self) -> dict:
        """The store's federation.json (checked against this coordinator's settings)."""
        if self.record is None:
            stored = self.store.read_federation()
            if stored is None:
                raise CoordinatorError("The store holds no federation yet: call `init(initial_adapter_dir)` first "
                                       "(CLI: `hetlora coordinate --init-adapter DIR ...`).")
            self.check_identity(stored)
            self.record = stored
        return self.record

    def check_identity(self, stored: Mapping[str, Any], incoming: Mapping[str, Any] | None = None) -> None:
        """Refuse (FederationMismatch) any given setting that differs from federation.json; record extended rounds.

        `incoming` holds what `init()` derives from the initial adapter (r_max, base model, module shapes and
        the adapter config's math fields).
        """
        wanted: dict[str, Any] = {name: self.requested[name] for name in SETTING_FIELDS
                                  if self.requested.get(name) is not None}
        if self.rank_policy is not None:
            wanted["rank_policy"] = self.rank_policy.to_dict()
        incoming = dict(incoming or {})
        config = incoming.pop("adapter_config", None)
        wanted.update(incoming)
        requested_rounds = self.requested.get("rounds")
        diffs = setting_differences(stored, wanted, config, requested_rounds)
        if diffs:
            raise FederationMismatch(
                "The store already holds a different federation (" + "; ".join(diffs) + "). Resume it "
                "with the same settings (or leave them out to take them from federation.json), or start the new "
                "federation in another store."
            )
        if isinstance(stored, dict) and requested_rounds is not None and requested_rounds > stored.get("rounds", 0):
            # extending a federation: record it, so clients do not stop at the formerly final global
            logger.info("Extending the federation from %s to %d rounds.", stored.get("rounds"), requested_rounds)
            stored["rounds"] = requested_rounds
            self.store.write_federation(stored)

    @property
    def method(self) -> str:
        if self.requested.get("method") is None and self.stored_federation() is None:
            return default_method_and_selection(None, self.requested.get("component_selection"), self._dp)[0]
        return self.get("method", UNRECORDED_METHOD)

    @property
    def r_max(self) -> int:
        return int(self.get("r_max"))

    @property
    def r_min(self) -> int:
        return int(self.get("r_min", 1))

    @property
    def clients(self) -> list[str]:
        return list(self.get("clients"))

    @property
    def clients_per_round(self) -> int:
        return int(self.get("clients_per_round", len(self.clients)))

    @property
    def min_clients(self) -> int:
        return int(self.get("min_clients", self.clients_per_round))

    @property
    def rounds(self) -> int:
        return int(self.get("rounds", 1))

    @property
    def seed(self) -> int:
        return int(self.get("seed", 0))

    @property
    def scaling(self) -> float:
        return float(self.get("scaling"))

    @property
    def next_rank(self) -> str:
        return self.get("next_rank", "rank_out")

    @property
    def component_selection(self) -> str:
        """Which components each participant trains: "prefix" (default), "rolling" or "coverage"."""
        return self.get("component_selection", "prefix")

    @property
    def client_training(self) -> str:
        """What participants below r_max train: "factors" (default) or "core" (docs/methods.md#core-clients)."""
        return self.get("client_training", "factors")

    @property
    def client_sampling(self) -> str:
        """How a round's participants are drawn: "uniform" (default) or "rank" (docs/methods.md#client-sampling)."""
        return self.get("client_sampling", DEFAULT_CLIENT_SAMPLING)

    @property
    def rank_sampling_rounds(self) -> int | None:
        """With client_sampling "rank": the rounds drawn by rank before the draw turns uniform (None: every round)."""
        return self.get("rank_sampling_rounds")

    @property
    def anchor(self) -> int:
        """Components 0 .. anchor-1 are in every client's window (window policies)."""
        return int(self.get("anchor", 0))

    @property
    def server_optimizer(self) -> dict[str, Any] | None:
        """The server step's optimizer (`round.RoundSettings.server_optimizer`) in its dict form, or None."""
        return self.get("server_optimizer")

    @property
    def error_feedback(self) -> bool:
        """Whether the server step carries the truncation's residual to the next round."""
        return bool(self.get("error_feedback", False))

    @property
    def dp(self) -> DPConfig | None:
        """The federation's differential-privacy settings (given, or rebuilt from federation.json), or None."""
        if self._dp is None:
            stored = self.get("dp")
            if stored is not None:
                self._dp = dp_config_from_dict(stored)
        return self._dp
