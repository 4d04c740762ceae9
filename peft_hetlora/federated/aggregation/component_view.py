"""The component view of a round's uploads, shared by the robust, DP and secure-sum aggregators.

A *component* ``j`` of module ``m`` is row ``j`` of ``A_m`` together with column ``j`` of ``B_m``
(docs/design.md#component-rule).
A client with module rank ``r_km`` covers components ``0 .. r_km - 1`` of that module. This module validates a
round's uploads once (same keys, same shapes, ranks within ``r_max``, finite values, unique ids) and exposes them
as float64 factor matrices: ``A`` flattened to ``(r, d_in)``, ``B`` to ``(d_out, r)``.

It only reads the public data structures of :mod:`peft_hetlora.federated.aggregation`; the integrator may swap
the key parsing for the shared key-format module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ...utils.errors import HetLoRAError, RankError
from ...utils.ranks import check_rank
from ..adapter import FACTOR_SUFFIXES as _SUFFIXES
from ..adapter import flat_a, flat_b, lora_module_names
from .checks import all_finite
from .records import ClientUpdate


class UpdateShapeError(HetLoRAError, ValueError):
    """A client's upload does not fit the round (other keys, shapes, non-finite values, duplicate id)."""


@dataclass
class ModuleSpec:
    """Where one LoRA module's factors live and their shapes at ``r_max``."""

    a_key: str
    b_key: str
    a_shape: tuple[int, ...]  # at r_max
    b_shape: tuple[int, ...]  # at r_max

    @property
    def d_in(self) -> int:
        return math.prod(self.a_shape[1:])

    @property
    def d_out(self) -> int:
        return self.b_shape[0]


@dataclass
class Layout:
    """The key layout every client of a round shares."""

    modules: dict[str, ModuleSpec]
    extras: dict[str, tuple[int, ...]]
    key_order: list[str]
    r_max: int

    def ranks(self, update: ClientUpdate) -> dict[str, int]:
        """The rank of each module of a validated update, in the layout's module order."""
        return {name: int(update.state_dict[spec.a_key].shape[0]) for name, spec in self.modules.items()}


def factor_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Module name -> (A key, B key) for every LoRA module of ``state_dict``."""
    out: dict[str, tuple[str, str]] = {}
    for name in lora_module_names(state_dict):
        for a_suffix, b_suffix in _SUFFIXES:
            if name + a_suffix in state_dict and name + b_suffix in state_dict:
                out[name] = (name + a_suffix, name + b_suffix)
                break
    return out


def float64_a(a: torch.Tensor) -> torch.Tensor:
    """``A`` as a float64 CPU ``(r, d_in)`` matrix: the key format's :func:`~peft_hetlora.federated.adapter.flat_a`.

    Example:
        >>> float64_a(torch.ones(2, 3, 1, 1)).shape, float64_a(torch.ones(2, 3)).dtype
        (torch.Size([2, 3]), torch.float64)
    """
    return flat_a(a).detach().to("cpu", torch.float64)


def float64_b(b: torch.Tensor, name: str = "") -> torch.Tensor:
    """``B`` as a float64 CPU ``(d_out, r)`` matrix: the key format's :func:`~peft_hetlora.federated.adapter.flat_b`.

    Raises:
        AggregationError: ``B`` has trailing dimensions other than 1 (``name`` names the module in the message).

    Example:
        >>> float64_b(torch.ones(4, 2, 1, 1)).shape
        torch.Size([4, 2])
    """
    return flat_b(name, b).detach().to("cpu", torch.float64)


def validate_round(updates: Iterable[ClientUpdate], r_max: int) -> tuple[list[ClientUpdate], Layout]:
    """Check a round's uploads against each other and ``r_max``; return them as a list and their layout.

    Raises:
        RankError: a module's rank exceeds ``r_max`` or the client's declared rank.
        UpdateShapeError: a component-indexed (non-prefix) upload, no updates, a duplicate client id, other keys
            or shapes than the first client, a
            non-floating or non-finite tensor, a B factor that is not 2-D (after trailing 1s).
    """
    check_rank(r_max, 1, 1 << 30, what="r_max (the global adapter's rank, HetLoRAConfig.r)")
    items = list(updates)
    if not items:
        raise UpdateShapeError("no client updates: pass at least one ClientUpdate")
    layout: Layout | None = None
    seen: set[str] = set()
    for update in items:
        if not isinstance(update, ClientUpdate):
            raise TypeError(f"expected ClientUpdate objects, got {type(update).__name__}")
        cid = update.client_id
        if cid in seen:
            raise UpdateShapeError(f"client {cid!r} appears twice in this round; each client counts once")
        if update.components is not None:
            raise UpdateShapeError(
                f"client {cid!r} uploads the components {list(update.components)[:8]} (not a prefix); the robust, "
                "differentially private and secure-sum aggregations support prefix uploads only: use the streaming "
                "methods (component, rankwise, hetlora, zero_pad) with component_selection='rolling'/'coverage', or "
                "component_selection='prefix' here"
            )
        seen.add(cid)
        sd = update.state_dict
        for key, value in sd.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise UpdateShapeError(f"client {cid!r}: {key!r} must be a floating-point tensor; reject this upload")
            if not all_finite(value):
                raise UpdateShapeError(f"client {cid!r}: {key!r} has non-finite values; reject this upload")
        keys = factor_keys(sd)
        if not keys:
            raise UpdateShapeError(
                f"client {cid!r}: no LoRA factors (keys ending in .lora_A.weight / .lora_B.weight); pass the "
                "adapter state dict in PEFT's saved key format"
            )
        for name, (a_key, b_key) in keys.items():
            a, b = sd[a_key], sd[b_key]
            if a.ndim < 2 or b.ndim < 2 or a.shape[0] != b.shape[1] or math.prod(b.shape[2:]) != 1:
                raise UpdateShapeError(
                    f"client {cid!r}: module {name!r} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}; "
                    "both factors need the same rank and B must be (d_out, r)"
                )
            if a.shape[0] > r_max or a.shape[0] > update.rank:
                raise RankError(
                    f"client {cid!r}: module {name!r} has rank {a.shape[0]} but r_max={r_max} and the declared "
                    f"rank is {update.rank}; the client must truncate its adapter to its rank"
                )
        if layout is None:
            modules = {
                name: ModuleSpec(
                    a_key, b_key, (r_max, *sd[a_key].shape[1:]), (sd[b_key].shape[0], r_max, *sd[b_key].shape[2:])
                )
                for name, (a_key, b_key) in keys.items()
            }
            factor = {k for pair in keys.values() for k in pair}
            extras = {key: tuple(t.shape) for key, t in sd.items() if key not in factor}
            layout = Layout(modules, extras, list(sd), r_max)
            continue
        if set(sd) != set(layout.key_order):
            missing = sorted(set(layout.key_order) - set(sd))[:3]
            unexpected = sorted(set(sd) - set(layout.key_order))[:3]
            raise UpdateShapeError(
                f"client {cid!r} has a different key set than client {items[0].client_id!r}: missing {missing}, "
                f"unexpected {unexpected}; all clients must train the same target modules"
            )
        for name, spec in layout.modules.items():
            a, b = sd[spec.a_key], sd[spec.b_key]
            if tuple(a.shape[1:]) != spec.a_shape[1:] or tuple(b.shape[:1] + b.shape[2:]) != (
                spec.b_shape[0],
                *spec.b_shape[2:],
            ):
                raise UpdateShapeError(
                    f"client {cid!r}: module {name!r} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, which "
                    "does not match the first client's d_in / d_out; clients must share the base model"
                )
        for key, shape in layout.extras.items():
            if tuple(sd[key].shape) != shape:
                raise UpdateShapeError(
                    f"client {cid!r}: dense extra {key!r} has shape {tuple(sd[key].shape)}, expected {shape}"
                )
    assert layout is not None
    return items, layout


def previous_factors(
    previous: Mapping[str, torch.Tensor] | None, layout: Layout, *, extras_needed: bool = True
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """The previous global as float64 ``(A (r_max, d_in), B (d_out, r_max))`` per module (zero-padded; zeros when
    ``previous`` is None) and its dense extras (zeros when missing and ``previous`` is None).

    Raises:
        UpdateShapeError: ``previous`` lacks a module or has shapes that do not fit the round.
    """
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    extras: dict[str, torch.Tensor] = {}
    r_max = layout.r_max
    for name, spec in layout.modules.items():
        a = torch.zeros((r_max, spec.d_in), dtype=torch.float64)
        b = torch.zeros((spec.d_out, r_max), dtype=torch.float64)
        if previous is not None:
            if spec.a_key not in previous or spec.b_key not in previous:
                raise UpdateShapeError(
                    f"previous global adapter lacks module {name!r}; pass the global adapter the clients started from"
                )
            pa, pb = float64_a(previous[spec.a_key]), previous[spec.b_key]
            rank = pa.shape[0]
            if rank > r_max or pa.shape[1] != spec.d_in or pb.shape[0] != spec.d_out or pb.shape[1] != rank:
                raise UpdateShapeError(
                    f"previous global adapter: module {name!r} has lora_A {tuple(previous[spec.a_key].shape)} / "
                    f"lora_B {tuple(pb.shape)}, which does not fit r_max={r_max} and the clients' shapes"
                )
            a[:rank] = pa
            b[:, :rank] = float64_b(pb, name)
        factors[name] = (a, b)
    for key, shape in layout.extras.items():
        if previous is not None and key in previous:
            if tuple(previous[key].shape) != shape:
                raise UpdateShapeError(f"previous global adapter: {key!r} has shape {tuple(previous[key].shape)}")
            extras[key] = previous[key].detach().to("cpu", torch.float64)
        elif previous is not None and extras_needed:
            raise UpdateShapeError(f"previous global adapter lacks the dense extra {key!r}")
        else:
            extras[key] = torch.zeros(shape, dtype=torch.float64)
    return factors, extras


def to_state_dict(
    layout: Layout, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], extras: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Float32 state dict in the first client's key order from float64 ``(A, B)`` matrices and extras."""
    out: dict[str, torch.Tensor] = {}
    by_key: dict[str, torch.Tensor] = {}
    for name, spec in layout.modules.items():
        a, b = factors[name]
        by_key[spec.a_key] = a.to(torch.float32).reshape(spec.a_shape)
        by_key[spec.b_key] = b.to(torch.float32).reshape(spec.b_shape)
    for key in layout.key_order:
        out[key] = by_key[key] if key in by_key else extras[key].to(torch.float32)
    return out
