"""Server-side aggregation of heterogeneous-rank LoRA adapters: the records and the streaming aggregator.

The adapter key format (module names, truncate, pad, norms) lives in :mod:`peft_hetlora.federated.adapter.keys`; the
methods live one per file in :mod:`peft_hetlora.federated.aggregation.methods` behind a registry
(:func:`~peft_hetlora.federated.aggregation.methods.register_aggregation`). This module does what every method shares:
validation of an update against the first one, the influence clip, the weight cap, the weighting fallbacks, dense
extras and the :class:`AggregationResult`.

The global adapter lives at rank ``r_max`` and every client uses the same scale ``s`` (``lora_alpha / r_max``), so
``delta W_m = s * B_m A_m``. Built-in methods (see docs/aggregation.md):

``hetlora``
    zero-pad every client to ``r_max``; sparsity weights ``p_k = S_k / sum_j S_j`` with
    ``S_k = ||delta W_k||_F`` over all modules; ``A = sum_k p_k pad(A_k)``, ``B = sum_k p_k pad(B_k)``
    (Cho et al., arXiv 2401.06432).
``zero_pad``
    the same padding with data-size weights ``n_k / N``.
``fedavg``
    homogeneous LoRA: every client at the same rank, data-size weights.
``flexlora``
    data-size weighted sum of the full updates ``B_k A_k``, then an SVD computed from the stacked low-rank factors;
    global ``B = U S``, ``A = V^T``, top ``r_max`` singular triplets in order (Bai et al., arXiv 2402.11505).
``flexlora_held``
    FlexLoRA over the adapters the clients held: a client's product also counts the ``previous`` global's
    components it did not upload (the frozen rest of a window client), so weak clients do not erase them.
``rankwise``
    component ``j`` is the sparsity-weighted average over only the clients whose module rank exceeds ``j``;
    components no client covers keep their ``previous`` global value (RBLA, arXiv 2408.08699).
``component`` / ``component_data``
    the general component rule (docs/design.md#component-rule) for component-indexed uploads
    (``ClientUpdate.components``):
    component ``j`` is the weighted average (sparsity / data-size weights) over the clients that trained ``j``;
    untrained components keep ``previous``. ``rankwise`` is its prefix case; ``hetlora`` / ``zero_pad`` scatter an
    indexed upload to its indices and zero-pad the rest; ``flexlora_held`` counts the rest at its previous value;
    ``fedavg`` / ``flexlora`` refuse non-prefix uploads.

**A round always closes.** Every problem one update can cause is decided for that update alone by
:meth:`StreamingAggregator.observe` / :meth:`StreamingAggregator.add` (an ``AggregationError`` the round turns into
a rejection): the structure checks, finite values, and a contribution ``||s B_k A_k||_F`` within
:data:`MAX_UPDATE_NORM`; sums are float64, so no finite validated input overflows (docs/aggregation.md).

**Influence bound** (``clip_norm``): each client's factors are clipped to a ball around the factors it was sent,
``A0_k = truncate(previous, r_k)`` (zeros without ``previous``): ``||A_k - A0_k||_F <= rho_A`` and
``||B_k - B0_k||_F <= rho_B`` (norms over all modules). ``"adaptive"`` (the engines' default):
``rho_A = c x median_k ||A_k - A0_k||_F``, ``rho_B`` alike, ``c = 4``, from the round's first pass (norm-bounding
with the threshold tracked from the updates, as in adaptive clipping, Andrew et al., arXiv 1905.03871); a number
``C``: ``rho_A = rho_B = sqrt(C / s)``. With ``a = ||A_prev||_F``, ``b = ||B_prev||_F``, for ``hetlora``
(per-client weighting), ``zero_pad``, ``fedavg``, ``flexlora`` and ``flexlora_held``, whatever the clients upload:

* the published global satisfies ``||delta W_new||_F <= s (a + rho_A) (b + rho_B)``;
* replacing one client's upload by any other, its weight ``p_k`` held fixed (always so for data-size weights),
  moves ``delta W_new`` by at most ``2 p_k s (rho_A (b + rho_B) + rho_B (a + rho_A))`` (``flexlora``: the weighted
  sum before its SVD).

``rankwise`` and ``weighting="per_module"`` use one weight per component or module, so their global bound reads
``s (a + sqrt(K) rho_A) (b + sqrt(K) rho_B)`` for ``K`` clients. Unbalanced factors (``A x 1e-6``, ``B x 1e6``)
cannot escape: each factor is bounded on its own, not only their product.

**Weight cap** (``max_weight_ratio = rho``, default 10, :func:`capped_weights`): a data-size weight counts at most
``rho x median`` of the round's positive ``n_k``, exactly, for any number of clients above it, so one client
claiming ``num_examples = 1e9`` weighs like a large honest client.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...utils.errors import AggregationError, AggregationRankError
from ...utils.ranks import MAX_RANK, check_rank
from ..adapter import (
    CORE_SUFFIX,
    CoreBases,
    core_bases,
    core_seed,
    coverage_counts,
    held_factors,
    is_real,
    lora_module_names,
    module_sq_norm,
    pad,
    split_lora_keys,
    truncate,
    update_norm,
)
from .checks import ModuleSpec, UpdateChecks, all_finite
from .influence import (
    ADAPTIVE,
    DEFAULT_BOUND_MULTIPLIER,
    OFF,
    adaptive_radii,
    clip_factor_steps,
    factor_steps,
    parse_influence_bound,
)
from .methods import AGGREGATION_METHODS, AggregationMethod, ModuleAccumulator, get_aggregation
from .methods.base import DATA, SPARSITY, UNIFORM
from .records import AggregationResult, ClientUpdate
from .sums import ClientRecord, ExtraSum

__all__ = [
    "AGGREGATION_METHODS",
    "MAX_UPDATE_NORM",
    "WEIGHTINGS",
    "AggregationResult",
    "ClientUpdate",
    "StreamingAggregator",
    "aggregate",
    "capped_weights",
    "lora_module_names",
    "non_finite_tensors",
    "pad",
    "truncate",
    "update_norm",
]

WEIGHTINGS: tuple[str, ...] = ("per_client", "per_module")
"""Sparsity weightings: one ``S_k`` per client over all modules (default, the paper's), or one ``S_km`` per module."""

DEFAULT_MAX_WEIGHT_RATIO = 10.0
"""Default weight cap: no data-size weight above 10 x the round's median ``n_k``."""

MAX_UPDATE_NORM = float(torch.finfo(torch.float32).max) / 4
"""The largest ``||B_k A_k||_F`` (and ``||s B_k A_k||_F``) a client's (clipped) contribution may have: a global whose
factors are convex combinations of such updates, or the SVD of their weighted sum, stays representable in float32.
A larger contribution is a rejection of that client, never an overflow of the round."""

_FALLBACK_NAMES = {DATA: "data_size", UNIFORM: "uniform"}


def _level_and_weight(sparsity: float | None, num_examples: float) -> tuple[int, float]:
    """The best weighting level at which a client's weight is positive, and that weight."""
    if sparsity is not None and sparsity > 0.0:
        return SPARSITY, float(sparsity)
    if num_examples > 0:
        return DATA, float(num_examples)
    return UNIFORM, 1.0


def capped_weights(
    sizes: Mapping[str, float], max_weight_ratio: float | None
) -> tuple[float | None, dict[str, float]]:
    """The weight cap, computed once for every method: ``n_k -> min(n_k, rho x median_j n_j)``.

    The median runs over the positive sizes of the round (``rho = max_weight_ratio``); ``None`` (or fewer than two
    positive sizes) caps nothing. Every capped weight is exactly the limit, whatever the number of liars: a minority
    cannot move the median, so each of them weighs at most ``rho x`` an honest median client.

    Returns:
        ``(limit, {client_id: capped n_k})`` (``limit`` None when nothing can be capped).

    Example:
        >>> limit, w = capped_weights({"a": 100, "b": 100, "c": 100, "x": 1e9, "y": 1e9}, 10.0)
        >>> limit, w["x"], w["a"]
        (1000.0, 1000.0, 100.0)
    """
    positive = [float(n) for n in sizes.values() if n > 0]
    if max_weight_ratio is None or len(positive) < 2:
        return None, {cid: float(n) for cid, n in sizes.items()}
    limit = float(max_weight_ratio) * statistics.median(positive)
    return limit, {cid: min(float(n), limit) for cid, n in sizes.items()}


def non_finite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of ``state_dict`` whose tensors hold a NaN or an infinity (the check before a global is staged).

    Example:
        >>> non_finite_tensors({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])})
        ['b']
    """
    return [key for key, value in state_dict.items()
            if value.is_floating_point() and not all_finite(value)]


@dataclass
class _Observed:
    """What the first pass learns of one client: its size and how far it moved each factor."""

    num_examples: int
    step_a: float
    step_b: float
    core: bool = False  # a core upload: its A is the global's by construction (A step 0), not a client's choice


class StreamingAggregator(UpdateChecks):
    """Aggregate client updates one at a time, with memory flat in the number of clients.

    A round is two passes over the same updates: :meth:`observe` each one (cheap: checks, sizes, factor step norms),
    then :meth:`add` each one (clip, weigh, accumulate). The first pass fixes the round's statistics (the median
    ``n_k`` of the weight cap, the median factor steps of the adaptive bound), so every client's weight and clip are
    exact when it is added. :func:`aggregate` and ``round.close_round`` run both passes. Methods that need no
    statistics (sparsity weights with a fixed or no bound) may skip :meth:`observe`.

    Every problem that one update can cause is decided for that update alone, before it changes anything: a check
    that fails, a contribution that is not finite or too large for float32 (:data:`MAX_UPDATE_NORM`) raises
    :class:`~peft_hetlora.utils.errors.AggregationError` (a ``ValueError``) from :meth:`observe` / :meth:`add`
    and leaves the aggregator as it was; the round turns it into a rejection of that client.

    Args:
        method: a registered method name (``AGGREGATION_METHODS``; add yours with ``register_aggregation``).
        r_max: rank of the global adapter (``HetLoRAConfig.r``); every client module must have rank ``<= r_max``.
        scaling: the LoRA scale ``s`` (``lora_alpha / r_max``); it enters the norms ``S_k`` (and so ``clip_norm``)
            but not the weights, which are ratios.
        previous: the global adapter the clients were sent (rank ``<= r_max``, zero-padded if lower). ``rankwise``
            keeps its values for components no client covers; the influence bound clips around it.
        clip_norm: the influence bound. ``None`` / ``"off"``: none. A number ``C``: each client's ``A_k`` and
            ``B_k`` are moved towards the factors it was sent, ``truncate(previous, r_k)``, until
            ``sqrt(s) ||A_k - A0_k||_F <= sqrt(C)`` and ``sqrt(s) ||B_k - B0_k||_F <= sqrt(C)`` (over all modules).
            ``"adaptive"`` (the engines' default): the radii are ``rho_A = c x median_k ||A_k - A0_k||_F`` and
            ``rho_B = c x median_k ||B_k - B0_k||_F`` of the round's observed updates (``c = bound_multiplier``).
            Then the published global obeys ``||delta W_new||_F <= s (||A_prev|| + rho_A)(||B_prev|| + rho_B)`` and
            one client moves it by at most ``2 p_k s (rho_A (||B_prev|| + rho_B) + rho_B (||A_prev|| + rho_A))`` at
            a fixed weight ``p_k`` (docs/aggregation.md). Sparsity weights use the clipped update's norm. Dense
            extras are not clipped.
        weighting: ``"per_client"`` (default: one ``S_k`` over all modules) or ``"per_module"`` (``S_km`` per module;
            sparsity-weighted methods only).
        max_weight_ratio: the weight cap (:func:`capped_weights`): a data-size weight counts at most
            ``max_weight_ratio`` times the median of the round's positive ``n_k`` (default 10; ``None`` turns the cap
            off), exactly, for any number of clients above it. The median is what a minority of liars cannot move,
            and a ratio (not a fixed share) leaves honest rounds with ordinary size differences exactly as before.
        bound_multiplier: ``c`` of the adaptive bound (default :data:`~peft_hetlora.federated.aggregation.influence.
            DEFAULT_BOUND_MULTIPLIER`).
        prefix_only: refuse component-indexed uploads (the DP path, whose aggregation takes prefixes only).
        one_pass: read each update once (see :meth:`settle`): :meth:`add` observes and adds it at its uncapped,
            unclipped weight; :meth:`settle` then fixes the round's statistics and says whether every added client
            was within them, in which case the sums are exactly (bit for bit) the two-pass ones. Otherwise the round
            must be aggregated again in two passes (``aggregate`` and ``close_round`` do).

    Raises:
        AggregationError: an unknown method or a bad setting (the message says which and what to pass).

    Example:
        >>> import torch
        >>> agg = StreamingAggregator("hetlora", r_max=4)
        >>> for i, r in enumerate([1, 4]):
        ...     sd = {"m.lora_A.weight": torch.randn(r, 8), "m.lora_B.weight": torch.randn(6, r)}
        ...     agg.add(ClientUpdate(f"c{i}", sd, rank=r, num_examples=10))
        >>> res = agg.result()
        >>> tuple(res.state_dict["m.lora_B.weight"].shape), round(sum(res.weights.values()), 6)
        ((6, 4), 1.0)
    """

    def __init__(
        self,
        method: str,
        r_max: int,
        scaling: float = 1.0,
        previous: Mapping[str, torch.Tensor] | None = None,
        clip_norm: float | str | None = None,
        *,
        weighting: str = "per_client",
        max_weight_ratio: float | None = DEFAULT_MAX_WEIGHT_RATIO,
        bound_multiplier: float = DEFAULT_BOUND_MULTIPLIER,
        prefix_only: bool = False,
        one_pass: bool = False,
    ) -> None:
        impl = get_aggregation(method)
        check_rank(r_max, 1, MAX_RANK, what="r_max (the global adapter's rank, HetLoRAConfig.r)",
                   error=AggregationRankError)
        if not is_real(scaling) or not math.isfinite(scaling) or scaling <= 0:
            raise AggregationError(f"scaling must be a finite number > 0 (lora_alpha / r_max), got {scaling!r}")
        try:
            bound = parse_influence_bound(clip_norm)
        except ValueError as err:
            raise AggregationError(str(err)) from None
        if max_weight_ratio is not None and (
            not is_real(max_weight_ratio) or not math.isfinite(max_weight_ratio) or max_weight_ratio < 1
        ):
            raise AggregationError(f"max_weight_ratio must be None or a finite number >= 1, got {max_weight_ratio!r}")
        if not is_real(bound_multiplier) or not math.isfinite(bound_multiplier) or bound_multiplier < 1:
            raise AggregationError(f"bound_multiplier must be a finite number >= 1, got {bound_multiplier!r}")
        if weighting not in WEIGHTINGS:
            raise AggregationError(f"unknown weighting {weighting!r}; choose one of {list(WEIGHTINGS)}")
        sparsity_methods = [name for name in AGGREGATION_METHODS if get_aggregation(name).weights == "sparsity"]
        if weighting == "per_module" and impl.weights != "sparsity":
            raise AggregationError(
                f"weighting='per_module' applies to sparsity weights, i.e. methods {sparsity_methods}; "
                f"method {method!r} uses data-size weights: drop the weighting argument"
            )
        if previous is not None and not isinstance(previous, Mapping):
            raise TypeError(f"previous must be None or an adapter state dict, got {type(previous).__name__}")
        self.method = method
        self._impl: AggregationMethod = impl
        self.r_max = int(r_max)
        self.scaling = float(scaling)
        self.previous = previous
        self.bound: float | str = bound
        self.clip_norm = bound if isinstance(bound, float) else None
        self.bound_multiplier = float(bound_multiplier)
        self.prefix_only = bool(prefix_only)
        self.weighting = weighting
        self.max_weight_ratio = None if max_weight_ratio is None else float(max_weight_ratio)
        self._key_order: list[str] | None = None
        self._first_id = ""
        self._modules_keys: set[str] = set()
        self._modules: dict[str, ModuleSpec] = {}
        self._extras: dict[str, tuple[int, ...]] = {}
        self._accs: dict[str, ModuleAccumulator] = {}
        self._extra_sums = ExtraSum({})
        self._clients: list[ClientRecord] = []
        self._seen_ids: set[str] = set()
        # the first pass: what each observed client looks like, and why the others were refused
        self._observed: dict[str, _Observed] = {}
        self._refused: dict[str, str] = {}
        self._frozen = False
        self._radii: tuple[float, float] | None = None
        self._weight_limit: float | None = None
        self._bound_record: dict[str, Any] | None = None
        self._cap_record: dict[str, Any] | None = None
        self._core_bases: dict[tuple[str, int], CoreBases] = {}
        self._previous64: dict[str, torch.Tensor] | None = None
        self.one_pass = bool(one_pass)
        self._settled: bool | None = None  # one pass: None until settle(), then whether the sums are the two-pass ones

    @property
    def num_clients(self) -> int:
        """How many updates have been added."""
        return len(self._clients)

    def needs_first_pass(self) -> bool:
        """Whether :meth:`add` needs every update observed first (the weight cap of data weights, the adaptive
        bound).

        Example:
            >>> StreamingAggregator("zero_pad", r_max=2).needs_first_pass()
            True
            >>> StreamingAggregator("hetlora", r_max=2).needs_first_pass()
            False
        """
        capping = self.max_weight_ratio is not None and self._impl.weights == "data"
        return capping or self.bound == ADAPTIVE

    # -- structure -------------------------------------------------------------------------------------------

    def _uses_previous(self) -> bool:
        return self.previous is not None and (self._impl.uses_previous or self.bound != OFF)

    def _init_structure(self, update: ClientUpdate, modules: dict[str, tuple[str, str]], extras: list[str]) -> None:
        sd = update.state_dict
        self._first_id = update.client_id
        self._key_order = list(sd)
        self._modules_keys = set(sd)
        for name, (a_key, b_key) in modules.items():
            a, b = sd[a_key], sd[b_key]
            self._modules[name] = ModuleSpec(a_key, b_key, tuple(a.shape), tuple(b.shape), int(a.shape[0]))
            self._accs[name] = self._impl.accumulator(tuple(a.shape), tuple(b.shape), self.r_max)
        for key in extras:
            self._extras[key] = tuple(sd[key].shape)
        self._extra_sums = ExtraSum(self._extras)

    def expand_core(self, update: ClientUpdate) -> ClientUpdate:
        """A core upload (``<module>.lora_core.weight`` keys, docs/methods.md#core-clients) as the held factors of
        rank ``r_c`` it stands for, rebuilt from ``previous`` (the global the client was sent); other updates as
        they are. Runs before every check, clip and weight, so a core client is aggregated as a prefix client of
        rank ``r_c``.

        Raises:
            AggregationError: the method does not take cores (``accepts_core``), no previous global, a module the
                global lacks, or cores that are not square and of one rank.

        Example:
            >>> import torch
            >>> prev = {"m.lora_A.weight": torch.randn(4, 6), "m.lora_B.weight": torch.zeros(5, 4)}
            >>> agg = StreamingAggregator("flexlora_held", r_max=4, previous=prev)
            >>> up = agg.expand_core(ClientUpdate("a", {"m.lora_core.weight": torch.eye(2)}, rank=1, num_examples=3))
            >>> up.rank, tuple(up.state_dict["m.lora_B.weight"].shape)
            (2, (5, 2))
        """
        if not isinstance(update, ClientUpdate):
            return update
        cores = {k: v for k, v in update.state_dict.items() if isinstance(k, str) and k.endswith(CORE_SUFFIX)}
        if not cores:
            return update
        cid = update.client_id
        if not self._impl.accepts_core:
            raise AggregationError(f"client {cid!r} uploaded a core, which method {self.method!r} does not take; "
                                   "only methods with accepts_core do (the round must not ask for cores)")
        if self.previous is None:
            raise AggregationError(f"client {cid!r} uploaded a core, but the round has no previous global to "
                                   "expand it with")
        ranks = {tuple(v.shape) for v in cores.values()}
        if len(ranks) != 1 or any(len(s) != 2 or s[0] != s[1] or s[0] < 1 for s in ranks):
            raise AggregationError(f"client {cid!r}: its cores must be square and of one rank, got {sorted(ranks)}")
        r_c = next(iter(ranks))[0]
        state: dict[str, torch.Tensor] = {}
        for key, value in update.state_dict.items():
            if key not in cores:
                state[key] = value
                continue
            module = key[: -len(CORE_SUFFIX)]
            a_key, b_key = module + ".lora_A.weight", module + ".lora_B.weight"
            if a_key not in self.previous or b_key not in self.previous:
                raise AggregationError(f"client {cid!r}: core {key!r} names a module the global does not have")
            a_g, b_g = self.previous[a_key], self.previous[b_key]
            if r_c > min(a_g.shape[1], b_g.shape[0], self.r_max):
                raise AggregationError(f"client {cid!r}: core rank {r_c} is above r_max or the module's size")
            bases = self._core_bases.get((module, r_c))
            if bases is None:
                bases = core_bases(a_g, b_g, r_c, seed=core_seed(module, a_g, b_g), scaling=self.scaling)
                self._core_bases[(module, r_c)] = bases
            if not all_finite(value):
                raise AggregationError(f"client {cid!r}: {key!r} has non-finite values; reject this upload")
            state[a_key], state[b_key] = held_factors(value, bases, a_g)
        return ClientUpdate(cid, state, rank=r_c, num_examples=update.num_examples, metadata=update.metadata)

    def _inspect(self, update: ClientUpdate, seen: set[str]) -> tuple[dict[str, tuple[str, str]], list[str]]:
        """Every check of one update that needs nothing but the update, the settings and the first client."""
        if not isinstance(update, ClientUpdate):
            raise TypeError(f"add() takes a ClientUpdate, got {type(update).__name__}")
        cid = update.client_id
        if cid in seen:
            raise AggregationError(f"client {cid!r} was already added to this aggregation; each client counts once")
        modules, extras, _ = self._check_structure(update)
        if self.prefix_only and update.components is not None:
            raise AggregationError(
                f"client {cid!r} uploads the components {list(update.components)[:8]} (not the prefix 0..r-1 in "
                "order); this round's aggregation (differential privacy) takes prefix uploads only: the client must "
                "upload its components in order"
            )
        sd = update.state_dict
        if self._key_order is None and self._uses_previous():
            self._check_previous(modules, sd)
        for key in list(sd):
            if not all_finite(sd[key]):
                raise AggregationError(f"client {cid!r}: {key!r} has non-finite values; reject this upload")
        return modules, extras

    def _module_sq(self, cid: str, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                   raw_sq: dict[str, float] | None = None) -> dict[str, float]:
        """``||s B A||_F^2`` per module of a (clipped) contribution; refuses one that float32 cannot hold.

        ``raw_sq``, if given, receives the unscaled ``||B A||_F^2`` of each module (computed once per pass and
        handed to accumulators that need it, :attr:`FactorStack.takes_sq_norm`)."""
        raw = {name: module_sq_norm(name, a, b) for name, (a, b) in factors.items()}
        if raw_sq is not None:
            raw_sq.update(raw)
        return self._checked_sq(cid, raw)

    def _checked_sq(self, cid: str, unscaled: Mapping[str, float]) -> dict[str, float]:
        """``||s B A||_F^2`` per module from the unscaled ``||B A||_F^2``; refuses what float32 cannot hold."""
        module_sq: dict[str, float] = {}
        for name, value in unscaled.items():
            sq = max(value, 0.0)
            module_sq[name] = sq * self.scaling**2
        total = math.sqrt(sum(module_sq.values()))
        raw = total / self.scaling
        if not math.isfinite(total) or max(total, raw) > MAX_UPDATE_NORM:
            raise AggregationError(
                f"client {cid!r}: its update's norm ||s B A||_F = {total:.3g} is beyond what a float32 global can "
                f"hold (limit {MAX_UPDATE_NORM:.3g}); reject this upload (an honest update is many orders smaller)"
            )
        return module_sq

    def _step_reference(self) -> Mapping[str, torch.Tensor] | None:
        """The previous global's factors in float64 (converted once per round, not once per client and pass), the
        reference of the factor steps and the clip; None when the round does not use it."""
        if not self._uses_previous():
            return None
        if self._previous64 is None:
            assert self.previous is not None
            modules, _ = split_lora_keys(self.previous)
            self._previous64 = {key: self.previous[key].detach().to("cpu", torch.float64)
                                for pair in modules.values() for key in pair}
        return self._previous64

    # -- the first pass --------------------------------------------------------------------------------------

    def observe(self, update: ClientUpdate) -> None:
        """First pass: check one update and record its size and factor steps for the round's statistics.

        Raises:
            AggregationError: the update does not fit (as for :meth:`add`); it is remembered, and adding it later
                raises the same reason.
        """
        if self._frozen or self.one_pass:
            raise AggregationError("observe() after add(): observe every update of the round before adding any"
                                   if self._frozen else "observe() in a one-pass aggregation: add() observes")
        self._observe(update)

    def _observe(self, update: ClientUpdate
                 ) -> tuple[ClientUpdate, dict[str, tuple[str, str]], list[str], dict[str, float]]:
        """:meth:`observe`'s work; returns the (core-expanded) update, its modules and extras, and each module's
        ``||B A||_F^2`` from the float64 copies of the factor steps."""
        cid = getattr(update, "client_id", None)
        try:
            core = self.expand_core(update)
            is_core, update = core is not update, core
            modules, extras = self._inspect(update, set(self._observed) | set(self._refused))
            raw_sq: dict[str, float] = {}  # from the float64 copies factor_steps makes anyway
            step_a, step_b = factor_steps(modules, update.state_dict, self._step_reference(),
                                          components=update.components, sq_norms=raw_sq)
            self._checked_sq(update.client_id, raw_sq)
            if not (math.isfinite(step_a) and math.isfinite(step_b)):
                raise AggregationError(f"client {update.client_id!r}: its factors are too large to measure; "
                                       "reject this upload")
        except (AggregationError, ValueError) as err:
            if isinstance(cid, str) and cid not in self._observed:
                self._refused.setdefault(cid, str(err))
            raise
        if self._key_order is None:
            self._init_structure(update, modules, extras)
        self._observed[update.client_id] = _Observed(int(update.num_examples), step_a, step_b, is_core)
        return update, modules, extras, raw_sq

    def _freeze(self) -> None:
        """Fix the round's statistics from the observed updates (at the first :meth:`add`)."""
        self._frozen = True
        observed = self._observed
        if self.needs_first_pass() or (observed and self.max_weight_ratio is not None):
            limit, _ = capped_weights({cid: o.num_examples for cid, o in observed.items()}, self.max_weight_ratio)
            self._weight_limit = limit
            if limit is not None:
                sizes = [o.num_examples for o in observed.values() if o.num_examples > 0]
                self._cap_record = {"max_weight_ratio": self.max_weight_ratio,
                                    "median_num_examples": statistics.median(sizes), "limit": limit}
        if isinstance(self.bound, float):
            radius = math.sqrt(self.bound / self.scaling)
            self._radii = (radius, radius)
            self._bound_record = {"mode": "fixed", "clip_norm": self.bound, "radius_a": radius, "radius_b": radius}
        elif self.bound == ADAPTIVE and observed:
            rho_a, rho_b, med_a, med_b = adaptive_radii([(o.step_a, o.step_b) for o in observed.values()],
                                                        self.bound_multiplier)
            factor_clients = [(o.step_a, o.step_b) for o in observed.values() if not o.core]
            if factor_clients and len(factor_clients) < len(observed):
                # core clients never move A (docs/methods.md#core-clients): A's radius follows the clients that can
                rho_a, _, med_a, _ = adaptive_radii(factor_clients, self.bound_multiplier)
            self._radii = (rho_a, rho_b)
            self._bound_record = {"mode": ADAPTIVE, "multiplier": self.bound_multiplier, "median_step_a": med_a,
                                  "median_step_b": med_b, "radius_a": rho_a, "radius_b": rho_b,
                                  "observed": len(observed)}
        elif self.bound == OFF:
            self._bound_record = {"mode": OFF}

    # -- adding ----------------------------------------------------------------------------------------------

    def add(self, update: ClientUpdate) -> None:
        """Check one client's update, clip and weigh it, and fold it into the running sums.

        Raises:
            AggregationError: the update does not fit (rank > r_max, other keys or shapes than the first client,
                non-finite values, a contribution beyond :data:`MAX_UPDATE_NORM`, a homogeneous method with another
                rank, a duplicate client id, refused in the first pass, or not observed when the round needs its
                statistics); the aggregator is unchanged.
        """
        if self.one_pass:
            self._add_one_pass(update)
            return
        if not self._frozen:
            self._freeze()
        cid = getattr(update, "client_id", None)
        if isinstance(cid, str) and cid in self._refused:
            raise AggregationError(self._refused[cid])
        if self.needs_first_pass() and isinstance(cid, str) and cid not in self._observed:
            raise AggregationError(
                f"client {cid!r} was not observed in the round's first pass, which fixes the weight cap and the "
                "influence bound; call observe() for every update before add() (aggregate() and close_round do)"
            )
        update = self.expand_core(update)
        modules, extras = self._inspect(update, self._seen_ids)
        self._fold_in(update, modules, extras)

    def _add_one_pass(self, update: ClientUpdate) -> None:
        """One pass: observe the update, then add it at its uncapped weight, clipped only by a fixed bound (an
        adaptive one is not known yet: :meth:`settle` checks that it would not have clipped it)."""
        if self._settled is not None:
            raise AggregationError("add() after settle() in a one-pass aggregation; aggregate the round again")
        if not self._frozen:  # the statistics a one-pass add may use: a fixed bound's radii, no cap yet
            self._frozen = True
            if isinstance(self.bound, float):
                radius = math.sqrt(self.bound / self.scaling)
                self._radii = (radius, radius)
        update, modules, extras, raw_sq = self._observe(update)
        if update.client_id in self._seen_ids:
            raise AggregationError(f"client {update.client_id!r} was already added to this aggregation; each "
                                   "client counts once")
        self._fold_in(update, modules, extras, None if self._radii is not None else raw_sq)

    def settle(self) -> bool:
        """One pass: fix the round's statistics (the weight cap's median, the adaptive bound's radii) from every
        update seen, and say whether the sums are exactly the two-pass ones: no added client's weight is above the
        cap and none would have been clipped (every factor step within its radius), so each was added with the
        weight and factors the second pass gives it. False: aggregate the round again in two passes (a round with
        a capped or clipped client reads its uploads three times, an honest one once). Idempotent.

        Example:
            >>> import torch
            >>> agg = StreamingAggregator("flexlora", r_max=2, one_pass=True)
            >>> for cid, n in [("a", 10), ("b", 20)]:
            ...     sd = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 2)}
            ...     agg.add(ClientUpdate(cid, sd, rank=2, num_examples=n))
            >>> agg.settle(), agg.result().weights
            (True, {'a': 0.3333333333333333, 'b': 0.6666666666666666})
        """
        if not self.one_pass:
            raise AggregationError("settle() is for one-pass aggregations (one_pass=True)")
        if self._settled is not None:
            return self._settled
        fixed = self._radii
        self._frozen = False
        self._freeze()
        ok = True
        if self.bound == ADAPTIVE and self._radii is not None:
            rho_a, rho_b = self._radii
            ok = all(self._observed[rec.client_id].step_a <= rho_a and self._observed[rec.client_id].step_b <= rho_b
                     for rec in self._clients)
        elif fixed is not None:
            self._radii = fixed
        limit = self._weight_limit
        if limit is not None:  # a size only weighs where a client (or, per module, a module) falls back to it
            ok = ok and all(rec.num_examples <= limit for rec in self._clients if rec.level == DATA or (
                self.weighting == "per_module" and min(rec.module_sq_norms.values(), default=0.0) <= 0.0))
        self._settled = ok
        return ok

    def _fold_in(self, update: ClientUpdate, modules: dict[str, tuple[str, str]], extras: list[str],
                 unclipped_sq: dict[str, float] | None = None) -> None:
        """Clip (unless ``unclipped_sq``: the one-pass add of an unclipped update and its ``||B A||_F^2``), weigh
        and accumulate one checked update."""
        cid = update.client_id
        sd = update.state_dict
        clip_scales = (1.0, 1.0)
        raw_sq: dict[str, float] = {}
        if unclipped_sq is not None:
            # what clip_factor_steps returns for an update within the radii: its own tensors, the same norms
            factors = {name: (sd[a].detach().to("cpu"), sd[b].detach().to("cpu")) for name, (a, b) in modules.items()}
            raw_sq = dict(unclipped_sq)
            uploaded_sq = self._checked_sq(cid, raw_sq)
        elif self._radii is None:
            factors = {name: (sd[a].detach().to("cpu"), sd[b].detach().to("cpu")) for name, (a, b) in modules.items()}
            uploaded_sq = self._module_sq(cid, {name: (sd[a], sd[b]) for name, (a, b) in modules.items()}, raw_sq)
        else:
            factors, *scales = clip_factor_steps(modules, sd, self._step_reference(), *self._radii,
                                                 components=update.components, sq_norms=raw_sq)
            clip_scales = (scales[0], scales[1])
            uploaded_sq = self._checked_sq(cid, raw_sq)
        if clip_scales == (1.0, 1.0):
            module_sq = uploaded_sq
        else:
            raw_sq = {}
            module_sq = self._module_sq(cid, factors, raw_sq)
        norm = math.sqrt(sum(uploaded_sq.values()))
        sparse = self._impl.weights == "sparsity"
        size = float(update.num_examples)
        if self._weight_limit is not None:
            size = min(size, self._weight_limit)
        level, weight = _level_and_weight(math.sqrt(sum(module_sq.values())) if sparse else None, size)

        if self._key_order is None:
            self._init_structure(update, modules, extras)
        indexed = {} if update.components is None else {"components": update.components}
        for name, (a, b) in factors.items():
            m_level, m_weight = level, weight
            if self.weighting == "per_module":
                m_level, m_weight = _level_and_weight(math.sqrt(module_sq[name]), size)
            acc = self._accs[name]
            norm_kw = {"sq_norm": raw_sq[name]} if getattr(acc, "takes_sq_norm", False) else {}
            acc.add(cid, a, b, m_level, m_weight, **indexed, **norm_kw)
        self._extra_sums.add(level, weight, {key: sd[key].detach().to("cpu") for key in extras})
        self._clients.append(
            ClientRecord(
                cid, int(update.rank), int(update.num_examples), norm, min(clip_scales), level, weight, module_sq,
                update.components, clip_scales,
            )
        )
        self._seen_ids.add(cid)

    # -- result ----------------------------------------------------------------------------------------------

    def _previous_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.previous is None:
            return None
        spec = self._modules[name]
        a = self.previous[spec.a_key].detach().to("cpu", torch.float32)
        b = self.previous[spec.b_key].detach().to("cpu", torch.float32)
        rank = a.shape[0]
        if rank < self.r_max:
            a = torch.cat([a, a.new_zeros((self.r_max - rank, *a.shape[1:]))], dim=0)
            b = torch.cat([b, b.new_zeros((b.shape[0], self.r_max - rank, *b.shape[2:]))], dim=1)
        return a, b

    def _caps(self) -> tuple[dict[str, float], list[str]]:
        """``client_id -> capped weight`` for the clients the weight cap lowered, and a message."""
        limit = self._weight_limit
        if limit is None:
            return {}, []
        caps = {rec.client_id: limit for rec in self._clients if rec.level == DATA and rec.num_examples > limit}
        if not caps:
            return {}, []
        return caps, [
            f"capped the data-size weight of {len(caps)} client(s) at {self.max_weight_ratio:g} x the median "
            f"num_examples = {limit:g}: {sorted(caps)[:10]}"
        ]

    def _client_weights(self) -> tuple[dict[str, float], int]:
        top = max(rec.level for rec in self._clients)
        total = math.fsum(rec.weight for rec in self._clients if rec.level == top)
        weights = {rec.client_id: (rec.weight / total if rec.level == top else 0.0) for rec in self._clients}
        return weights, top

    def _module_weights(self, name: str) -> dict[str, float]:
        pairs = []
        for rec in self._clients:
            s_km = math.sqrt(rec.module_sq_norms[name])
            size = rec.num_examples if self._weight_limit is None else min(rec.num_examples, self._weight_limit)
            pairs.append((rec.client_id, *_level_and_weight(s_km, size)))
        top = max(level for _, level, _ in pairs)
        total = math.fsum(w for _, level, w in pairs if level == top)
        return {cid: (w / total if level == top else 0.0) for cid, level, w in pairs}

    def _influence_record(self) -> dict[str, Any] | None:
        if self._bound_record is None:
            return None
        out = dict(self._bound_record)
        if out["mode"] != OFF:
            out["clipped"] = {rec.client_id: {"a": rec.factor_scales[0], "b": rec.factor_scales[1]}
                              for rec in self._clients if min(rec.factor_scales) < 1.0}
        return out

    def product_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``A key -> (B, A)``: float64 factors of each module's untruncated aggregate ``W_agg / s`` (of any rank),
        for the modules whose method keeps one (the FlexLoRA family, below its sketch switch); the server step
        (`round.server_step`) takes its pseudo-gradient from them. Empty before any update was added.

        Example:
            >>> StreamingAggregator("hetlora", r_max=2).product_factors()
            {}
        """
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, spec in self._modules.items():
            untruncated = getattr(self._accs[name], "untruncated", None)
            if not callable(untruncated):
                continue
            factors = untruncated(self._previous_factors(name) if self._impl.uses_previous else None)
            if factors is not None:
                out[spec.a_key] = factors
        return out

    def result(self) -> AggregationResult:
        """The aggregated global adapter (float32, CPU, rank ``r_max``); the aggregator can keep adding after it.

        Raises:
            AggregationError: no update was added.
        """
        if not self._clients:
            raise AggregationError("no client updates were added; add at least one ClientUpdate before result()")
        if self.one_pass and not self.settle():
            raise AggregationError("this one-pass aggregation capped or clipped a client it had added at its raw "
                                   "weight: aggregate the round again in two passes (observe, then add)")
        assert self._key_order is not None
        method_top = SPARSITY if self._impl.weights == "sparsity" else DATA
        caps, cap_messages = self._caps()
        weights, client_level = self._client_weights()
        out_factors: dict[str, torch.Tensor] = {}
        fallback_modules: list[str] = []
        factorization: dict[str, dict[str, Any]] = {}
        worst = client_level
        for name, spec in self._modules.items():
            acc = self._accs[name]
            prev = self._previous_factors(name) if self._impl.uses_previous else None
            a, b = acc.result(prev)
            describe = getattr(acc, "describe", None)
            if callable(describe):
                factorization[name] = describe()
            used = acc.level_used()
            used = method_top if used is None else used
            if used < method_top:
                fallback_modules.append(name)
            worst = min(worst, used)
            out_factors[spec.a_key], out_factors[spec.b_key] = a, b
        state_dict: dict[str, torch.Tensor] = {}
        for key in self._key_order:
            if key in out_factors:
                state_dict[key] = out_factors[key]
            else:
                state_dict[key] = self._extra_sums.mean(key)

        messages: list[str] = []
        fallback = _FALLBACK_NAMES.get(worst) if worst < method_top else None
        if fallback is not None:
            if method_top == DATA:
                messages.append("every client reports num_examples=0: used uniform weights instead of n_k / N")
            else:
                scope = (
                    "every client update has zero norm (all B still zero, e.g. at round start?)"
                    if client_level < SPARSITY
                    else f"{len(fallback_modules)} module(s) have zero norm for every client covering them"
                )
                instead = "data-size weights n_k / N" if worst == DATA else "uniform weights (num_examples all 0)"
                messages.append(f"{scope}: used {instead} instead of sparsity weights there")
        clipped = [rec.client_id for rec in self._clients if rec.clip_scale < 1.0]
        if clipped and self._radii is not None:
            what = (f"norm {self.clip_norm}" if isinstance(self.bound, float) else
                    f"the adaptive bound ({self.bound_multiplier:g} x the median factor step: "
                    f"rho_A={self._radii[0]:.4g}, rho_B={self._radii[1]:.4g})")
            messages.append(f"clipped {len(clipped)} client update(s) to {what}: {clipped[:10]}")
        messages.extend(cap_messages)
        module_weights = None
        if self.weighting == "per_module":
            module_weights = {name: self._module_weights(name) for name in self._modules}
        return AggregationResult(
            state_dict=state_dict,
            weights=weights,
            norms={rec.client_id: rec.norm for rec in self._clients},
            clip_scales={rec.client_id: rec.clip_scale for rec in self._clients},
            ranks={rec.client_id: rec.rank for rec in self._clients},
            method=self.method,
            weighting=self.weighting,
            fallback=fallback,
            fallback_modules=fallback_modules,
            module_weights=module_weights,
            messages=messages,
            capped=dict(caps),
            components={rec.client_id: rec.components for rec in self._clients if rec.components is not None},
            coverage=coverage_counts(
                (rec.components or range(rec.rank) for rec in self._clients), self.r_max
            ),
            influence=self._influence_record(),
            weight_cap=None if self._cap_record is None else {**self._cap_record, "capped": dict(caps)},
            factorization=factorization,
        )


def aggregate(
    updates: Iterable[ClientUpdate] | Callable[[], Iterable[ClientUpdate]],
    method: str = "hetlora",
    r_max: int | None = None,
    scaling: float = 1.0,
    previous: Mapping[str, torch.Tensor] | None = None,
    clip_norm: float | str | None = None,
    *,
    weighting: str = "per_client",
    max_weight_ratio: float | None = DEFAULT_MAX_WEIGHT_RATIO,
    bound_multiplier: float = DEFAULT_BOUND_MULTIPLIER,
) -> AggregationResult:
    """Aggregate client updates into a new global adapter at rank ``r_max`` (see the module docstring).

    One pass over :class:`StreamingAggregator` (``one_pass=True``): each update read once, observed and added; when
    :meth:`~StreamingAggregator.settle` finds a client the round's weight cap or adaptive bound would have changed,
    two passes: :meth:`~StreamingAggregator.observe` every update, then :meth:`~StreamingAggregator.add` every
    update (the same result bit for bit either way). ``updates`` may be a zero-argument callable that returns a fresh
    iterable (e.g. a generator function that loads one client at a time: memory stays flat); a one-shot iterator
    is read into a list first.

    Args:
        updates: the accepted clients' updates, or a callable returning them anew.
        method: a registered method name (default ``"hetlora"``; see ``AGGREGATION_METHODS``).
        r_max: rank of the global adapter (required).
        scaling, previous, clip_norm, weighting, max_weight_ratio, bound_multiplier: see
            :class:`StreamingAggregator` (``clip_norm`` defaults to no bound here; the round engines default to
            ``"adaptive"``).

    Raises:
        AggregationError: no updates, unknown method, or an update that does not fit
            (see :meth:`StreamingAggregator.add`).

    Example:
        >>> import torch
        >>> def client(cid, r, n):
        ...     sd = {"m.lora_A.weight": torch.randn(r, 16), "m.lora_B.weight": torch.randn(8, r)}
        ...     return ClientUpdate(cid, sd, rank=r, num_examples=n)
        >>> res = aggregate([client("a", 2, 10), client("b", 4, 30)], method="zero_pad", r_max=4)
        >>> res.weights
        {'a': 0.25, 'b': 0.75}
    """
    if r_max is None:
        raise AggregationError("aggregate() needs r_max=... (the global adapter's rank, HetLoRAConfig.r)")
    def make(one_pass: bool) -> StreamingAggregator:
        return StreamingAggregator(
            method, r_max, scaling, previous, clip_norm, weighting=weighting, max_weight_ratio=max_weight_ratio,
            bound_multiplier=bound_multiplier, one_pass=one_pass,
        )

    if callable(updates):
        source = updates
    else:
        items = updates if isinstance(updates, (list, tuple)) else list(updates)
        source = lambda: items  # noqa: E731 - a re-readable view of the same list
    one = make(True)  # one read of each update; two passes only when someone is capped or clipped
    for update in source():
        one.add(update)
    if one.num_clients and one.settle():
        return one.result()
    aggregator = make(False)
    for update in source():
        aggregator.observe(update)
    for update in source():
        aggregator.add(update)
    if aggregator.num_clients == 0:
        raise AggregationError("aggregate() got no client updates; pass at least one ClientUpdate")
    return aggregator.result()
