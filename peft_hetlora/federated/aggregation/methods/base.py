"""The shared base of aggregation methods: :class:`AggregationMethod` and the per-module accumulators.

A method decides two things: which client weight it uses (sparsity ``S_k`` or data size ``n_k``) and how one
module's client factors become the global factors. Everything else (validation, clipping, the weight cap, dense
extras, the weighting fallbacks, the result record) is done once by
:class:`~peft_hetlora.federated.aggregation.streaming.StreamingAggregator`.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import numpy as np
import torch

__all__ = ["DATA", "NONE", "SPARSITY", "UNIFORM", "AggregationMethod", "ModuleAccumulator", "PaddedSum"]

# Weighting levels, best first: a client's level is the best one at which its weight is positive; the result uses
# the best level any client reached (clients below it get weight 0 there, which is exactly the formula's value).
SPARSITY, DATA, UNIFORM, NONE = 2, 1, 0, -1


class ModuleAccumulator(Protocol):
    """Running state of one LoRA module during one aggregation."""

    def add(self, client_id: str, a: torch.Tensor, b: torch.Tensor, level: int, weight: float) -> None:
        """Fold in one client's (clipped) factors at its own rank, with its weighting level and weight.

        The weight is final (the weight cap and the influence bound are applied before); each client is added
        once. Methods with ``accepts_components = True`` also receive ``components=`` (a tuple of global component
        indices, slot ``i`` -> ``components[i]``) for non-prefix uploads; prefix uploads never pass it.
        """

    def result(self, previous: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The global factors ``(A, B)`` at ``r_max``, float32 on CPU; must not change the state."""

    def level_used(self) -> int | None:
        """The worst weighting level the result used (``None`` if no component was covered)."""

    def clone(self) -> ModuleAccumulator:
        """An independent copy (result() of the copy after more add() calls leaves this one unchanged)."""


class AggregationMethod:
    """Base class of every aggregation method; subclass it and pass an instance to ``register_aggregation``.

    Contract (what :class:`~peft_hetlora.federated.aggregation.streaming.StreamingAggregator` guarantees and expects):

    * Class attributes: ``name`` (the registry name), ``weights`` (``"sparsity"``: ``S_k = ||s B_k A_k||_F`` after
      clipping; ``"data"``: ``n_k``, capped at ``max_weight_ratio`` x the round's median), ``homogeneous`` (every
      client must upload the first client's rank), ``uses_previous`` (``combine``/``result`` receives the previous
      global, zero-padded to ``r_max``, for components nobody covers), ``streaming``.
    * **Capabilities** (class attributes the engines ask instead of comparing method names; a new method sets
      them and nothing outside its file names it): ``homogeneous`` (every client trains the same rank: no
      pruning, ``required_rank`` on uploads), ``default_rank_policy`` (the rank policy a federation that names
      none gets: ``"uniform"``, ``"constant"`` for homogeneous methods), ``accepts_components`` (the window
      policies ``rolling`` / ``coverage`` need it), ``dp_form`` (the form of
      :func:`~peft_hetlora.federated.privacy.dp_aggregate` that runs the method under DP: ``"component"`` or
      ``"zero_pad"``; ``None``: no DP form, e.g. data-dependent sparsity weights), ``per_component`` (a client's
      weight enters the denominators of its own components only: the component rule), ``secure_sum`` (the
      method is a sum the secure-sum path can compute: ``"prefix"`` for prefix uploads, ``"indexed"`` when it also
      takes explicit component indices; ``None``: not expressible as sums).
    * Before a method sees a client, the aggregator has validated it (keys, shapes, ranks ``<= r_max``, finite
      values) and clipped it (the influence bound); weights are positive floats at the best common level (a
      zero-norm round falls back to data-size, then uniform weights), normalisation is the method's job.
    * **Streaming methods** (default) override :meth:`accumulator` and return one :class:`ModuleAccumulator` per
      module, so the server holds running sums, not every client.
    * **Non-streaming methods** (a coordinate-wise median needs all updates at once) set ``streaming = False``
      and override only :meth:`combine`, which gets every client's factors zero-padded to ``r_max`` (float32,
      CPU) and their weights; the aggregator keeps the clients' factors in memory for them.
    * Dense extras (``modules_to_save``) are always the weighted mean; a method does not see them.
    * **Component-indexed uploads** (docs/design.md#component-rule): a client may upload a non-prefix set of components
      (``ClientUpdate.components``). Only methods with ``accepts_components = True`` receive them: their
      accumulator's ``add`` gets the keyword ``components=`` (the indices of the uploaded slots, already checked:
      unique, ``< r_max``); the aggregator refuses such uploads for every other method with a message naming the
      methods that accept them. A non-streaming method with ``accepts_components = True`` gets the client's factors
      scattered to their indices in zero ``r_max`` factors. Prefix uploads (``components=None``) are unchanged.

    Example:
        >>> import torch
        >>> class CoordinateMedian(AggregationMethod):
        ...     name, weights, streaming = "median", "data", False
        ...     def combine(self, a_list, b_list, weights, previous):
        ...         return torch.stack(a_list).median(0).values, torch.stack(b_list).median(0).values
        >>> CoordinateMedian().streaming
        False
    """

    name: ClassVar[str] = ""
    weights: ClassVar[str] = "data"
    homogeneous: ClassVar[bool] = False
    uses_previous: ClassVar[bool] = False
    streaming: ClassVar[bool] = True
    accepts_components: ClassVar[bool] = False
    #: takes core uploads (docs/methods.md#core-clients): the round expands each core into held factors of rank r_c
    #: with the previous global before the influence bound, the weights and the accumulators
    accepts_core: ClassVar[bool] = False
    default_rank_policy: ClassVar[str] = "uniform"
    dp_form: ClassVar[str | None] = None
    per_component: ClassVar[bool] = False
    secure_sum: ClassVar[str | None] = None

    def accumulator(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int) -> ModuleAccumulator:
        """A fresh accumulator for one module (``a_shape`` / ``b_shape`` at the first client's rank)."""
        if self.streaming:
            raise NotImplementedError(f"streaming method {self.name!r} must override accumulator()")
        return _Collected(self, r_max)

    def combine(
        self,
        a_list: list[torch.Tensor],
        b_list: list[torch.Tensor],
        weights: list[float],
        previous: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-streaming methods: the global ``(A, B)`` of one module from every client's padded factors.

        ``weights`` are the clients' weights at the best common level, not normalised; ``previous`` is the
        previous global's padded factors when ``uses_previous`` and one was given, else ``None``.
        """
        raise NotImplementedError(f"non-streaming method {self.name!r} must override combine()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class _Collected:
    """Keeps every client's padded factors for a non-streaming method's :meth:`AggregationMethod.combine`."""

    def __init__(self, method: AggregationMethod, r_max: int) -> None:
        self.method = method
        self.r_max = r_max
        self.entries: dict[str, list] = {}  # client_id -> [a, b, level, weight]

    def add(self, client_id: str, a: torch.Tensor, b: torch.Tensor, level: int, weight: float,
            components: tuple[int, ...] | None = None) -> None:
        rank = a.shape[0]
        slots = slice(0, rank) if components is None else torch.tensor(components[:rank], dtype=torch.long)
        pa = torch.zeros((self.r_max, *a.shape[1:]), dtype=torch.float32)
        pa[slots] = a.to(torch.float32)
        pb = torch.zeros((b.shape[0], self.r_max, *b.shape[2:]), dtype=torch.float32)
        pb[:, slots] = b.to(torch.float32)
        self.entries[client_id] = [pa, pb, level, weight]

    def level_used(self) -> int | None:
        return max((e[2] for e in self.entries.values()), default=None)

    def result(self, previous: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        top = self.level_used()
        chosen = [e for e in self.entries.values() if e[2] == top]
        a, b = self.method.combine(
            [e[0] for e in chosen], [e[1] for e in chosen], [e[3] for e in chosen],
            previous if self.method.uses_previous else None,
        )
        return a.detach().to("cpu", torch.float32), b.detach().to("cpu", torch.float32)

    def clone(self) -> _Collected:
        copy = _Collected(self.method, self.r_max)
        copy.entries = {cid: list(e) for cid, e in self.entries.items()}
        return copy


class PaddedSum:
    """Weighted running sums of one module's zero-padded factors, with a weighting level per component.

    ``den[j]`` is the total weight of component ``j`` at level ``level[j]``. A client at a better level than a
    component's current level resets that component (every earlier contribution had weight 0 at the better level).
    With ``covered_only`` a client's weight enters the denominator of its own components only (``rankwise`` /
    ``component``: the general component rule of docs/design.md#component-rule), else of all ``r_max`` components
    (zero padding).
    A client's own components are ``[0, r_k)``, or ``components[:r_k]`` for a component-indexed upload, whose slots
    are scattered to those indices (``hetlora`` / ``zero_pad``: scatter, then zero-pad the rest).
    With ``pad_previous`` (and ``covered_only=False``) a client that did not train a component counts as having left
    it at its previous global value instead of zero (``component_fedavg``): ``den_own[j]`` is the weight of the clients
    that trained ``j``, and the result adds ``(den[j] - den_own[j]) / den[j]`` times the previous component.
    """

    def __init__(
        self,
        a_shape: tuple[int, ...],
        b_shape: tuple[int, ...],
        r_max: int,
        covered_only: bool,
        pad_previous: bool = False,
    ) -> None:
        if pad_previous and covered_only:
            raise ValueError("pad_previous needs covered_only=False: every client votes on every component")
        self.r_max = r_max
        self.covered_only = covered_only
        self.pad_previous = pad_previous
        self.den_own = np.zeros(r_max, dtype=np.float64)
        # float64 sums: weights up to the weight cap times finite float32 factors cannot overflow, and the result
        # (a convex combination of finite float32 values) rounds back into float32's range
        self.a_sum = torch.zeros((r_max, *a_shape[1:]), dtype=torch.float64)
        self.b_sum = torch.zeros((b_shape[0], r_max, *b_shape[2:]), dtype=torch.float64)
        self.level = np.full(r_max, NONE, dtype=np.int8)
        self.den = np.zeros(r_max, dtype=np.float64)

    def add(self, client_id: str, a: torch.Tensor, b: torch.Tensor, level: int, weight: float,
            components: tuple[int, ...] | None = None) -> None:
        if components is not None:
            self._add_indexed(a, b, level, weight, components)
            return
        rank = a.shape[0]
        span = rank if self.covered_only else self.r_max
        levels = self.level[:span]
        alpha = weight
        if not (levels == level).all():
            self._raise_level(np.nonzero(levels < level)[0], level)
            active = self.level[:span] == level
            if not active[:rank].all():
                idx_np = np.nonzero(active[:rank])[0]
                if idx_np.size:
                    idx = torch.from_numpy(idx_np)
                    self.a_sum.index_add_(0, idx, a[idx].to(torch.float64), alpha=alpha)
                    self.b_sum.index_add_(1, idx, b[:, idx].to(torch.float64), alpha=alpha)
                self.den[:span][active] += weight
                self.den_own[:rank][active[:rank]] += weight
                return
            self.den[:span][active] += weight
        else:
            self.den[:span] += weight
        self.den_own[:rank] += weight
        self.a_sum[:rank].add_(a.to(torch.float64), alpha=alpha)
        self.b_sum[:, :rank].add_(b.to(torch.float64), alpha=alpha)

    def _raise_level(self, raise_idx: np.ndarray, level: int) -> None:
        """Components ``raise_idx`` drop their sums and restart at the better weighting ``level``."""
        if raise_idx.size:
            idx = torch.from_numpy(raise_idx)
            self.a_sum[idx] = 0.0
            self.b_sum[:, idx] = 0.0
            self.den[raise_idx] = 0.0
            self.den_own[raise_idx] = 0.0
            self.level[raise_idx] = level

    def _add_indexed(self, a: torch.Tensor, b: torch.Tensor, level: int, weight: float,
                     components: tuple[int, ...]) -> None:
        """The same update as :meth:`add` for slots that hold global components ``components[:r_k]``."""
        rank = a.shape[0]
        own = np.asarray(components[:rank], dtype=np.int64)
        span = own if self.covered_only else np.arange(self.r_max)
        self._raise_level(span[self.level[span] < level], level)
        self.den[span[self.level[span] == level]] += weight
        active_slots = np.nonzero(self.level[own] == level)[0]
        if active_slots.size:
            slots = torch.from_numpy(active_slots)
            idx = torch.from_numpy(own[active_slots])
            self.den_own[own[active_slots]] += weight
            self.a_sum.index_add_(0, idx, a[slots].to(torch.float64), alpha=weight)
            self.b_sum.index_add_(1, idx, b[:, slots].to(torch.float64), alpha=weight)

    def result(self, previous: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        covered = self.level >= 0
        inv = np.where(covered, 1.0 / np.where(covered, self.den, 1.0), 0.0)
        inv_t = torch.from_numpy(inv)
        a = self.a_sum * inv_t.view(-1, *([1] * (self.a_sum.ndim - 1)))
        b = self.b_sum * inv_t.view(1, -1, *([1] * (self.b_sum.ndim - 2)))
        if self.pad_previous and previous is not None:
            # the clients that did not train j vote for its previous value (clamped: float error in den - den_own)
            missing = torch.from_numpy(np.clip((self.den - self.den_own) * inv, 0.0, 1.0))
            prev_a, prev_b = previous
            a = a + prev_a.to(torch.float64) * missing.view(-1, *([1] * (a.ndim - 1)))
            b = b + prev_b.to(torch.float64) * missing.view(1, -1, *([1] * (b.ndim - 2)))
        a, b = a.to(torch.float32), b.to(torch.float32)
        if previous is not None and not covered.all():
            idx = torch.from_numpy(np.nonzero(~covered)[0])
            prev_a, prev_b = previous
            a[idx] = prev_a[idx]
            b[:, idx] = prev_b[:, idx]
        return a, b

    def level_used(self) -> int | None:
        covered = self.level[self.level >= 0]
        return int(covered.min()) if covered.size else None

    def clone(self) -> PaddedSum:
        copy = PaddedSum.__new__(PaddedSum)
        copy.r_max, copy.covered_only, copy.pad_previous = self.r_max, self.covered_only, self.pad_previous
        copy.a_sum, copy.b_sum = self.a_sum.clone(), self.b_sum.clone()
        copy.level, copy.den, copy.den_own = self.level.copy(), self.den.copy(), self.den_own.copy()
        return copy
