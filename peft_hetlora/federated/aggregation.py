"""Server-side aggregation of heterogeneous-rank LoRA adapters: the records and the streaming aggregator.

The adapter key format (module names, truncate, pad, norms) lives in :mod:`peft_hetlora.federated.keys`; the
methods live one per file in :mod:`peft_hetlora.federated.methods` behind a registry
(:func:`~peft_hetlora.federated.methods.register_aggregation`). This module does what every method shares:
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

**Influence bound** (``clip_norm = C``): each client's factors are clipped to a ball around the factors it was
sent, ``A0_k = truncate(previous, r_k)`` (zeros without ``previous``):
``sqrt(s) ||A_k - A0_k||_F <= sqrt(C)`` and ``sqrt(s) ||B_k - B0_k||_F <= sqrt(C)`` (norms over all modules).
With ``a = sqrt(s) ||A_prev||_F``, ``b = sqrt(s) ||B_prev||_F`` (``0`` without ``previous``) and ``c = sqrt(C)``,
for ``hetlora`` (per-client weighting), ``zero_pad``, ``fedavg``, ``flexlora`` and ``flexlora_held`` (a held
adapter is the clipped upload with the previous global's other components, within the same ball), whatever the
clients upload:

* the published global satisfies ``||delta W_new||_F <= (a + c) (b + c)``;
* replacing one client's upload by any other, its weight ``p_k`` held fixed (always so for data-size weights),
  moves ``delta W_new`` by at most ``2 p_k c (a + b + 2 c)`` (``flexlora``: the weighted sum before its SVD).

``rankwise`` and ``weighting="per_module"`` use one weight per component or module, so their global bound reads
``(a + sqrt(K) c) (b + sqrt(K) c)`` for ``K`` clients. Unbalanced factors (``A x 1e-6``, ``B x 1e6``) cannot
escape: each factor is bounded on its own, not only their product.

**Weight cap** (``max_weight_ratio = rho``, default 10): a data-size weight counts at most ``rho x median`` of the
round's positive ``n_k``, so one client claiming ``num_examples = 1e9`` weighs like a large honest client.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Iterable, Mapping

import torch

from .aggregation_checks import UpdateChecks, _ModuleSpec
from .aggregation_records import _ClientRecord, _ExtraSum, _Retained
from .components import coverage_counts
from .errors import AggregationError, AggregationRankError
from .influence import clip_to_sent_factors
from .keys import (
    is_real,
    lora_module_names,
    module_sq_norm,
    pad,
    truncate,
    update_norm,
)
from .methods import AGGREGATION_METHODS, AggregationMethod, ModuleAccumulator, get_aggregation
from .methods.base import DATA, SPARSITY, UNIFORM
from .ranks import MAX_RANK, check_rank
from .updates import AggregationResult, ClientUpdate

__all__ = [
    "AGGREGATION_METHODS",
    "WEIGHTINGS",
    "AggregationResult",
    "ClientUpdate",
    "StreamingAggregator",
    "aggregate",
    "lora_module_names",
    "pad",
    "truncate",
    "update_norm",
]

WEIGHTINGS: tuple[str, ...] = ("per_client", "per_module")
"""Sparsity weightings: one ``S_k`` per client over all modules (default, the paper's), or one ``S_km`` per module."""

DEFAULT_MAX_WEIGHT_RATIO = 10.0
"""Default weight cap: no data-size weight above 10 x the round's median ``n_k``."""

_FALLBACK_NAMES = {DATA: "data_size", UNIFORM: "uniform"}
# How many of the heaviest data-weighted clients keep their factors until result(), so the weight cap can lower
# their weight exactly; the cap binds on at most this many clients per round (a message says when more claim more).
_CAP_RETAINED = 2


def _level_and_weight(sparsity: float | None, num_examples: int) -> tuple[int, float]:
    """The best weighting level at which a client's weight is positive, and that weight."""
    if sparsity is not None and sparsity > 0.0:
        return SPARSITY, float(sparsity)
    if num_examples > 0:
        return DATA, float(num_examples)
    return UNIFORM, 1.0


class StreamingAggregator(UpdateChecks):
    """Aggregate client updates one at a time, with memory flat in the number of clients.

    Args:
        method: a registered method name (``AGGREGATION_METHODS``; add yours with ``register_aggregation``).
        r_max: rank of the global adapter (``HetLoRAConfig.r``); every client module must have rank ``<= r_max``.
        scaling: the LoRA scale ``s`` (``lora_alpha / r_max``); it enters the norms ``S_k`` (and so ``clip_norm``)
            but not the weights, which are ratios.
        previous: the global adapter the clients were sent (rank ``<= r_max``, zero-padded if lower). ``rankwise``
            keeps its values for components no client covers; ``clip_norm`` clips around it. Pass it whenever
            ``clip_norm`` is set: without it the clip is around zero factors (the bound then has ``a = b = 0``).
        clip_norm: the influence bound ``C``: each client's ``A_k`` and ``B_k`` are moved towards the factors it
            was sent, ``truncate(previous, r_k)``, until ``sqrt(s) ||A_k - A0_k||_F <= sqrt(C)`` and
            ``sqrt(s) ||B_k - B0_k||_F <= sqrt(C)`` (over all modules). Then the published global obeys
            ``||delta W_new||_F <= (sqrt(s)||A_prev|| + sqrt(C)) (sqrt(s)||B_prev|| + sqrt(C))`` and one client moves
            it by at most ``2 p_k sqrt(C) (sqrt(s)||A_prev|| + sqrt(s)||B_prev|| + 2 sqrt(C))`` at a fixed weight
            ``p_k`` (module docstring, docs/aggregation.md). Sparsity weights use the clipped update's norm. Dense
            extras are not clipped.
        weighting: ``"per_client"`` (default: one ``S_k`` over all modules) or ``"per_module"`` (``S_km`` per module;
            sparsity-weighted methods only).
        max_weight_ratio: the weight cap of data-weighted methods (``zero_pad``, ``fedavg``, ``flexlora``, user
            methods with ``weights="data"``): a client's ``n_k`` counts at most ``max_weight_ratio`` times the median
            of the round's positive ``n_k`` (default 10; ``None`` turns the cap off). The median is chosen because
            it is what a minority of liars cannot move, and a ratio (not a fixed share) leaves honest rounds with
            ordinary size differences exactly as before. The heaviest ``2`` clients keep their factors until
            :meth:`result` so the cap is exact for them.

    Only running sums at ``r_max`` are kept (``flexlora``: the weighted stacked factors; non-streaming registered
    methods: every client's padded factors); :meth:`add` validates a whole update before it changes anything, so a
    rejected update leaves the aggregator as it was.

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
        clip_norm: float | None = None,
        *,
        weighting: str = "per_client",
        max_weight_ratio: float | None = DEFAULT_MAX_WEIGHT_RATIO,
    ) -> None:
        impl = get_aggregation(method)
        check_rank(r_max, 1, MAX_RANK, what="r_max (the global adapter's rank, HetLoRAConfig.r)",
                   error=AggregationRankError)
        if not is_real(scaling) or not math.isfinite(scaling) or scaling <= 0:
            raise AggregationError(f"scaling must be a finite number > 0 (lora_alpha / r_max), got {scaling!r}")
        if clip_norm is not None and (not is_real(clip_norm) or not math.isfinite(clip_norm) or clip_norm <= 0):
            raise AggregationError(f"clip_norm must be None or a finite number > 0, got {clip_norm!r}")
        if max_weight_ratio is not None and (
            not is_real(max_weight_ratio) or not math.isfinite(max_weight_ratio) or max_weight_ratio < 1
        ):
            raise AggregationError(f"max_weight_ratio must be None or a finite number >= 1, got {max_weight_ratio!r}")
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
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.weighting = weighting
        self.max_weight_ratio = None if max_weight_ratio is None else float(max_weight_ratio)
        self._key_order: list[str] | None = None
        self._modules_keys: set[str] = set()
        self._modules: dict[str, _ModuleSpec] = {}
        self._extras: dict[str, tuple[int, ...]] = {}
        self._accs: dict[str, ModuleAccumulator] = {}
        self._extra_sums = _ExtraSum({})
        # The weight cap: the heaviest data-weighted clients are also held out of a second set of sums (``_rest``),
        # so a capped result adds them back at the capped weight instead of subtracting a huge weight in float32.
        self._capping = self.max_weight_ratio is not None and impl.weights == "data"
        self._rest_accs: dict[str, ModuleAccumulator] = {}
        self._rest_extras = _ExtraSum({})
        self._clients: list[_ClientRecord] = []
        self._seen_ids: set[str] = set()
        self._retained: list[_Retained] = []  # min-heap by weight

    @property
    def num_clients(self) -> int:
        """How many updates have been added."""
        return len(self._clients)

    # -- structure -------------------------------------------------------------------------------------------

    def _uses_previous(self) -> bool:
        return self.previous is not None and (self._impl.uses_previous or self.clip_norm is not None)

    def _init_structure(self, update: ClientUpdate, modules: dict[str, tuple[str, str]], extras: list[str]) -> None:
        sd = update.state_dict
        self._key_order = list(sd)
        self._modules_keys = set(sd)
        for name, (a_key, b_key) in modules.items():
            a, b = sd[a_key], sd[b_key]
            self._modules[name] = _ModuleSpec(a_key, b_key, tuple(a.shape), tuple(b.shape), int(a.shape[0]))
            self._accs[name] = self._impl.accumulator(tuple(a.shape), tuple(b.shape), self.r_max)
        for key in extras:
            self._extras[key] = tuple(sd[key].shape)
        self._extra_sums = _ExtraSum(self._extras)
        if self._capping:
            self._rest_accs = {name: acc.clone() for name, acc in self._accs.items()}
            self._rest_extras = self._extra_sums.clone()

    # -- adding ----------------------------------------------------------------------------------------------

    def add(self, update: ClientUpdate) -> None:
        """Validate one client's update, clip it and fold it into the running sums.

        Raises:
            AggregationError: the update does not fit (rank > r_max, other keys or shapes than the first client,
                non-finite values, a homogeneous method with another rank, duplicate client id); the aggregator is
                unchanged.
        """
        if not isinstance(update, ClientUpdate):
            raise TypeError(f"add() takes a ClientUpdate, got {type(update).__name__}")
        modules, extras, _ = self._check_structure(update)
        sd = update.state_dict
        cid = update.client_id
        if self._key_order is None and self._uses_previous():
            self._check_previous(modules, sd)
        module_sq: dict[str, float] = {}
        for name, (a_key, b_key) in modules.items():
            sq = module_sq_norm(name, sd[a_key], sd[b_key])
            if not math.isfinite(sq):
                raise AggregationError(
                    f"client {cid!r}: module {name!r} has non-finite (or overflowing) values; reject this upload"
                )
            module_sq[name] = max(sq, 0.0) * self.scaling**2
        for key in extras:
            if not bool(torch.isfinite(sd[key]).all()):
                raise AggregationError(
                    f"client {cid!r}: dense extra {key!r} has non-finite values; reject this upload"
                )
        norm = math.sqrt(sum(module_sq.values()))
        clip_scale = 1.0
        if self.clip_norm is None:
            factors = {name: (sd[a].detach().to("cpu"), sd[b].detach().to("cpu")) for name, (a, b) in modules.items()}
        else:
            factors, clip_scale = clip_to_sent_factors(
                modules, sd, self.previous, self.clip_norm, self.scaling, components=update.components
            )
            if clip_scale < 1.0:
                module_sq = {
                    name: max(module_sq_norm(name, a, b), 0.0) * self.scaling**2 for name, (a, b) in factors.items()
                }
        sparse = self._impl.weights == "sparsity"
        level, weight = _level_and_weight(math.sqrt(sum(module_sq.values())) if sparse else None, update.num_examples)

        if self._key_order is None:
            self._init_structure(update, modules, extras)
        indexed = {} if update.components is None else {"components": update.components}
        for name, (a, b) in factors.items():
            m_level, m_weight = level, weight
            if self.weighting == "per_module":
                m_level, m_weight = _level_and_weight(math.sqrt(module_sq[name]), update.num_examples)
            self._accs[name].add(cid, a, b, m_level, m_weight, **indexed)
        extra_values = {key: sd[key].detach().to("cpu") for key in extras}
        self._extra_sums.add(level, weight, extra_values)
        self._clients.append(
            _ClientRecord(
                cid, int(update.rank), int(update.num_examples), norm, clip_scale, level, weight, module_sq,
                update.components,
            )
        )
        self._seen_ids.add(cid)
        if self._capping:
            entry = _Retained(weight, cid, factors, extra_values, update.components)
            if level == DATA and len(self._retained) < _CAP_RETAINED:
                heapq.heappush(self._retained, entry)
                return
            if level == DATA and entry > self._retained[0]:
                entry = heapq.heapreplace(self._retained, entry)
            entry_indexed = {} if entry.components is None else {"components": entry.components}
            for name, (a, b) in entry.factors.items():  # the new client, or the retained one it displaced
                self._rest_accs[name].add(entry.client_id, a, b, level, entry.weight, **entry_indexed)
            self._rest_extras.add(level, entry.weight, entry.extras)

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
        """``client_id -> capped weight`` for the data-weighted clients above the cap, and messages."""
        if self.max_weight_ratio is None or self._impl.weights != "data":
            return {}, []
        sizes = [rec.weight for rec in self._clients if rec.level == DATA]
        if len(sizes) < 2:
            return {}, []
        limit = self.max_weight_ratio * statistics.median(sizes)
        over = [rec.client_id for rec in self._clients if rec.level == DATA and rec.weight > limit]
        if not over:
            return {}, []
        retained = {entry.client_id for entry in self._retained}
        caps = {cid: limit for cid in over if cid in retained}
        messages = [
            f"capped the data-size weight of {len(caps)} client(s) at {self.max_weight_ratio:g} x the median "
            f"num_examples = {limit:g}: {sorted(caps)[:10]}"
        ]
        missed = sorted(set(over) - set(caps))
        if missed:
            messages.append(
                f"{len(missed)} more client(s) claim more than {limit:g} examples but only the {_CAP_RETAINED} "
                f"heaviest are capped: {missed[:10]}; lower the coordinator's max_examples"
            )
        return caps, messages

    def _client_weights(self, caps: Mapping[str, float]) -> tuple[dict[str, float], int]:
        top = max(rec.level for rec in self._clients)
        used = {rec.client_id: caps.get(rec.client_id, rec.weight) for rec in self._clients}
        total = sum(used[rec.client_id] for rec in self._clients if rec.level == top)
        weights = {
            rec.client_id: (used[rec.client_id] / total if rec.level == top else 0.0) for rec in self._clients
        }
        return weights, top

    def _module_weights(self, name: str) -> dict[str, float]:
        pairs = []
        for rec in self._clients:
            s_km = math.sqrt(rec.module_sq_norms[name])
            pairs.append((rec.client_id, *_level_and_weight(s_km, rec.num_examples)))
        top = max(level for _, level, _ in pairs)
        total = sum(w for _, level, w in pairs if level == top)
        return {cid: (w / total if level == top else 0.0) for cid, level, w in pairs}

    def result(self) -> AggregationResult:
        """The aggregated global adapter (float32, CPU, rank ``r_max``); the aggregator can keep adding after it.

        Raises:
            AggregationError: no update was added.
        """
        if not self._clients:
            raise AggregationError("no client updates were added; add at least one ClientUpdate before result()")
        assert self._key_order is not None
        method_top = SPARSITY if self._impl.weights == "sparsity" else DATA
        caps, cap_messages = self._caps()
        weights, client_level = self._client_weights(caps)
        accs, extra_sums = self._accs, self._extra_sums
        if caps:  # the held-out heaviest clients go back in at their capped weight
            accs = {name: acc.clone() for name, acc in self._rest_accs.items()}
            extra_sums = self._rest_extras.clone()
            for entry in sorted(self._retained, key=lambda e: e.client_id):
                weight = caps.get(entry.client_id, entry.weight)
                entry_indexed = {} if entry.components is None else {"components": entry.components}
                for name, (a, b) in entry.factors.items():
                    accs[name].add(entry.client_id, a, b, DATA, weight, **entry_indexed)
                extra_sums.add(DATA, weight, entry.extras)
        out_factors: dict[str, torch.Tensor] = {}
        fallback_modules: list[str] = []
        worst = client_level
        for name, spec in self._modules.items():
            acc = accs[name]
            prev = self._previous_factors(name) if self._impl.uses_previous else None
            a, b = acc.result(prev)
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
                state_dict[key] = extra_sums.mean(key)

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
        if clipped:
            messages.append(f"clipped {len(clipped)} client update(s) to norm {self.clip_norm}: {clipped[:10]}")
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
        )


def aggregate(
    updates: Iterable[ClientUpdate],
    method: str = "hetlora",
    r_max: int | None = None,
    scaling: float = 1.0,
    previous: Mapping[str, torch.Tensor] | None = None,
    clip_norm: float | None = None,
    *,
    weighting: str = "per_client",
    max_weight_ratio: float | None = DEFAULT_MAX_WEIGHT_RATIO,
) -> AggregationResult:
    """Aggregate client updates into a new global adapter at rank ``r_max`` (see the module docstring).

    A thin loop over :class:`StreamingAggregator`; ``updates`` may be a generator that loads one client at a time.

    Args:
        updates: the accepted clients' updates.
        method: a registered method name (default ``"hetlora"``; see ``AGGREGATION_METHODS``).
        r_max: rank of the global adapter (required).
        scaling, previous, clip_norm, weighting, max_weight_ratio: see :class:`StreamingAggregator`.

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
    aggregator = StreamingAggregator(
        method, r_max, scaling, previous, clip_norm, weighting=weighting, max_weight_ratio=max_weight_ratio
    )
    for update in updates:
        aggregator.add(update)
    if aggregator.num_clients == 0:
        raise AggregationError("aggregate() got no client updates; pass at least one ClientUpdate")
    return aggregator.result()
