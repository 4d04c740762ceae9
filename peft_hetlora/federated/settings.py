"""One settings record: `FederationSettings`, the settings a federation is started or resumed with.

Validated once, in ``__post_init__``; frozen; serialised as the settings of ``federation.json`` (`to_json`) and read
back from any ``federation.json``, old ones included (`from_json`: fields an older file lacks mean what they meant
then). Built by ``hetlora coordinate`` / ``hetlora init`` from their arguments and by the `Coordinator` (its keyword
form ``Coordinator(store, method=..., ...)`` builds one); passed by composition: ``Coordinator(store, settings, *,
clock, sleep, progress, poll_interval_s)``. A field left ``None`` is not given: a resumed coordinator takes it from
``federation.json``, a new federation from the defaults (the method: `round_settings.default_method_and_selection`).

Example:
    ```py
    >>> s = FederationSettings(method="rankwise", clients=("a", "b"), rounds=3)
    >>> s.to_json()["method"], s.clients
    ('rankwise', ('a', 'b'))
    >>> FederationSettings.from_json(s.to_json()) == s
    True
    ```
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .aggregation import AGGREGATION_METHODS, parse_influence_bound
from .aggregation.privacy import DPConfig, dp_config_from_dict
from .rank_policy import RankPolicy
from .round_settings import NEXT_RANK_RULES, check_dp, check_selection, default_method_and_selection
from .stores import validate_client_id
from .upload import DEFAULT_MAX_EXAMPLES, parse_message_format

__all__ = ["FederationSettings", "RECORDED_FIELDS"]

#: The fields of `FederationSettings` that ``federation.json`` records (the rest are the coordinator's upload limits
#: and test switches, given again on every start).
RECORDED_FIELDS = ("method", "r_max", "r_min", "clients", "clients_per_round", "min_clients", "rounds", "seed",
                   "scaling", "clip_norm", "max_upload_bytes", "deadline_s", "next_rank", "dp", "component_selection",
                   "anchor", "message_formats", "rank_policy")


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
            # the method may still come from federation.json: round_settings() checks it again then
            check_selection(method, selection, self.anchor or 0, r_max=self.r_max, dp=self.dp)
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
