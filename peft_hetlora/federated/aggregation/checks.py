"""The checks `StreamingAggregator.add` runs on an update before it changes anything.

An update must match the first one (key set, module shapes, dense extras; the same rank for homogeneous methods),
declare ranks within `[1, r_max]`, and fit the previous global. `UpdateChecks` is a base class of
[`StreamingAggregator`][peft_hetlora.federated.aggregation.StreamingAggregator]; it reads the aggregator's state.

Example:
    ```py
    >>> from peft_hetlora.federated.aggregation import StreamingAggregator
    >>> issubclass(StreamingAggregator, UpdateChecks)
    True
    ```
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ...utils.errors import AggregationError, AggregationRankError, RankError
from ...utils.ranks import check_rank
from ..adapter import check_components, flat_b, module_rank, split_lora_keys
from .methods import AGGREGATION_METHODS, AggregationMethod, get_aggregation
from .records import ClientUpdate

__all__ = ["ModuleSpec", "UpdateChecks", "all_finite"]


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no NaN and no infinity, from one ``aminmax`` reduction (no boolean tensor).

    A NaN anywhere makes both the minimum and the maximum NaN, and an infinity is itself the minimum or the
    maximum, so the tensor is finite exactly when its minimum and maximum are. Integer / bool tensors (and empty
    ones) are finite. About 20x cheaper than ``torch.isfinite(t).all()`` on a 8192 x 16 float32 factor.

    Example:
        >>> all_finite(torch.ones(3)), all_finite(torch.tensor([1.0, float("nan")])), all_finite(torch.arange(3))
        (True, False, True)
    """
    if tensor.is_complex():
        return bool(torch.isfinite(tensor).all())
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return math.isfinite(float(low)) and math.isfinite(float(high))


@dataclass
class ModuleSpec:
    """Where one LoRA module's factors live and their shapes at the first client's rank (only ``[1:]`` is compared).

    Example:
        >>> ModuleSpec("m.lora_A.weight", "m.lora_B.weight", (2, 8), (4, 2), 2).first_rank
        2
    """

    a_key: str
    b_key: str
    a_shape: tuple[int, ...]  # at the first client's rank; only [1:] is compared
    b_shape: tuple[int, ...]
    first_rank: int


class UpdateChecks:
    """Validation of one update against the aggregator's first update, settings and previous global."""

    method: str
    r_max: int
    previous: Mapping[str, torch.Tensor] | None
    _impl: AggregationMethod
    _key_order: list[str] | None
    _modules_keys: set[str]
    _modules: dict[str, ModuleSpec]
    _extras: dict[str, tuple[int, ...]]
    _first_id: str
    _seen_ids: set[str]

    def _check_structure(self, update: ClientUpdate) -> tuple[dict[str, tuple[str, str]], list[str], dict[str, int]]:
        cid = update.client_id
        if cid in self._seen_ids:
            raise AggregationError(f"client {cid!r} was already added to this aggregation; each client counts once")
        sd = update.state_dict
        for key, value in sd.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"client {cid!r}: state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
        modules, extras = split_lora_keys(sd)
        if not modules:
            raise AggregationError(
                f"client {cid!r}: the state dict has no LoRA factors (keys ending in .lora_A.weight / "
                ".lora_B.weight); pass the adapter state dict in PEFT's saved key format"
            )
        ranks: dict[str, int] = {}
        for name, (a_key, b_key) in modules.items():
            rank = module_rank(name, sd[a_key], sd[b_key])
            flat_b(name, sd[b_key])
            check_rank(rank, 1, self.r_max, what=f"client {cid!r}: module {name!r}: rank", hi_name="r_max",
                       hint="the client must truncate its adapter (or raise r_max for the federation)",
                       error=AggregationRankError)
            if rank > update.rank:
                raise AggregationError(
                    f"client {cid!r}: module {name!r} has rank {rank} but the update declares rank {update.rank}; "
                    "declare the rank actually uploaded"
                )
            ranks[name] = rank
        check_rank(update.rank, 1, self.r_max, what=f"client {cid!r}: declared rank", hi_name="r_max",
                   hint="the client must truncate its adapter (or raise r_max for the federation)",
                   error=AggregationRankError)
        if update.components is not None:
            try:
                check_components(update.components, r_max=self.r_max, budget=update.rank)
            except RankError as err:
                raise AggregationError(f"client {cid!r}: {err}") from None
            if not self._impl.accepts_components:
                takers = [m for m in AGGREGATION_METHODS if get_aggregation(m).accepts_components]
                raise AggregationError(
                    f"client {cid!r} uploads the components {list(update.components)[:8]} (not a prefix), which "
                    f"method {self.method!r} cannot place; use one of {takers} (e.g. 'component') or have the "
                    "client train a prefix"
                )
        for key in extras:
            if not sd[key].is_floating_point():
                raise AggregationError(
                    f"client {cid!r}: dense extra {key!r} has dtype {sd[key].dtype}; only floating-point extras can "
                    "be averaged"
                )
        if self._key_order is None:
            return modules, extras, ranks
        first = self._first_id
        missing = [k for k in self._key_order if k not in sd]
        unexpected = [k for k in sd if k not in self._modules_keys]
        if missing or unexpected:
            raise AggregationError(
                f"client {cid!r} has a different key set than client {first!r}: missing {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                f"{' ...' if len(unexpected) > 3 else ''}; all clients must train the same target modules"
            )
        for name, (a_key, b_key) in modules.items():
            spec = self._modules[name]
            a, b = sd[a_key], sd[b_key]
            if (
                tuple(a.shape[1:]) != spec.a_shape[1:]
                or b.shape[0] != spec.b_shape[0]
                or (tuple(b.shape[2:]) != spec.b_shape[2:])
            ):
                raise AggregationError(
                    f"client {cid!r}: module {name!r} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, but "
                    f"client {first!r} has d_in {spec.a_shape[1:]} / d_out {spec.b_shape[0]}; clients must share "
                    "the base model and target modules"
                )
            if self._impl.homogeneous and ranks[name] != spec.first_rank:
                others = [m for m in AGGREGATION_METHODS if not get_aggregation(m).homogeneous]
                raise AggregationError(
                    f"{self.method} needs every client at the same rank: client {cid!r} has rank {ranks[name]} at "
                    f"module {name!r}, client {first!r} has {spec.first_rank}; use one of {others} for "
                    "heterogeneous ranks"
                )
        for key in extras:
            if tuple(sd[key].shape) != self._extras[key]:
                raise AggregationError(
                    f"client {cid!r}: dense extra {key!r} has shape {tuple(sd[key].shape)}, client {first!r} has "
                    f"{self._extras[key]}; clients must share the same modules_to_save"
                )
        return modules, extras, ranks

    def _check_previous(self, modules: dict[str, tuple[str, str]], sd: Mapping[str, torch.Tensor]) -> None:
        prev = self.previous
        assert prev is not None
        for name, (a_key, b_key) in modules.items():
            if a_key not in prev or b_key not in prev:
                raise AggregationError(
                    f"previous global adapter lacks module {name!r}; pass the global adapter the clients started "
                    "from (or previous=None to fill uncovered components with zeros)"
                )
            a, b = prev[a_key], prev[b_key]
            rank = module_rank(name, a, b)
            fits = tuple(a.shape[1:]) == tuple(sd[a_key].shape[1:]) and b.shape[0] == sd[b_key].shape[0]
            if rank > self.r_max or not fits:
                raise AggregationError(
                    f"previous global adapter: module {name!r} has lora_A {tuple(a.shape)} / lora_B "
                    f"{tuple(b.shape)}, which does not fit r_max={self.r_max} and the clients' shapes"
                )
