"""Byzantine-robust aggregation per component: coordinate-wise median and trimmed mean under heterogeneous ranks.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"
(ICML 2018, arXiv 1803.01498) define the coordinate-wise median and the coordinate-wise beta-trimmed mean. Here they
run **per component** (docs/design.md#component-rule): coordinate ``(j, i)`` of ``A_m`` (row ``j``) and ``(o, j)`` of
``B_m``
(column ``j``) are aggregated over only the clients that trained component ``j`` of module ``m``, i.e. whose module
rank exceeds ``j``. Components no client covers (or fewer than ``min_clients``) keep their ``previous`` value.

Why factors and not per-client ``delta W_k = s B_k A_k``: a coordinate median of dense ``d_out x d_in`` updates
costs ``n d_out d_in`` memory, is full rank (it would need a truncated SVD to return to rank ``r_max``) and loses
the component structure that heterogeneous ranks need. On factors, each output coordinate lies inside the box the
honest clients span, and that box bounds the global's ``delta W`` too, whatever the attackers send: unbalanced
factors (``A x 1e-6``, ``B x 1e6``) are outliers in *both* factors and are discarded coordinate by coordinate.

Guarantee (proved in docs/privacy.md). Let ``H_j`` / ``F_j`` be the honest / Byzantine clients covering component
``j`` (``n_j = |H_j| + |F_j|``) and assume, for every component some client covers, ``|H_j| >= 1`` and
``|F_j| < n_j / 2`` (median) or ``|F_j| <= floor(trim * n_j)`` (trimmed mean). Then every output coordinate lies in
``[min_{H_j}, max_{H_j}]`` of the honest values, and so does the same rule applied to the honest clients alone.
With ``R`` the coordinate-wise honest range (``max - min``, 0 for uncovered components) and ``M`` the coordinate-wise
honest bound (``max |.|``, ``|previous|`` for uncovered components), per module::

    || delta W_robust - delta W_honest ||_F  <=  s * ( ||R_B||_F ||M_A||_F + ||M_B||_F ||R_A||_F )

The plain mean has no such bound: one client moves it arbitrarily far.

Example:
    >>> import torch
    >>> from peft_hetlora.federated.aggregation import ClientUpdate
    >>> ups = [ClientUpdate(f"c{k}", {"m.lora_A.weight": torch.full((r, 2), float(k)),
    ...                               "m.lora_B.weight": torch.ones(3, r)}, rank=r, num_examples=1)
    ...        for k, r in enumerate([1, 2, 2])]
    >>> res = robust_aggregate(ups, rule="median", r_max=3)
    >>> res.state_dict["m.lora_A.weight"][:, 0].tolist()  # row 0: median(0, 1, 2); row 1: median(1, 2); row 2: none
    [1.0, 1.5, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from ....utils.errors import HetLoRAError
from ..component_view import float64_a, float64_b, previous_factors, to_state_dict, validate_round
from ..streaming import AggregationResult, ClientUpdate, update_norm
from .base import AggregationMethod
from .registry import is_builtin, register_builtin

__all__ = ["ROBUST_RULES", "RobustConfigError", "RobustMethod", "robust_aggregate", "robust_module", "robust_stat"]

ROBUST_RULES: tuple[str, ...] = ("median", "trimmed_mean")
"""Rules accepted by :func:`robust_aggregate` (the names to register as aggregation methods)."""


class RobustConfigError(HetLoRAError, ValueError):
    """An invalid robust-aggregation setting (unknown rule, trim outside [0, 0.5), bad min_clients)."""


def robust_stat(values: torch.Tensor, rule: str, trim: float = 0.2) -> torch.Tensor:
    """Coordinate-wise median or trimmed mean over dimension 0 (the clients).

    The median of an even count is the mean of the two middle values. The trimmed mean drops
    ``k = floor(trim * n)`` values from each end of every coordinate and averages the ``n - 2k`` left.

    Example:
        >>> robust_stat(torch.tensor([[1.0], [100.0], [2.0], [3.0]]), "median").tolist()
        [2.5]
        >>> robust_stat(torch.tensor([[1.0], [100.0], [2.0], [3.0], [-50.0]]), "trimmed_mean", trim=0.2).tolist()
        [2.0]
    """
    n = values.shape[0]
    ordered = torch.sort(values, dim=0).values
    if rule == "median":
        return 0.5 * (ordered[(n - 1) // 2] + ordered[n // 2])
    if rule == "trimmed_mean":
        k = math.floor(trim * n)
        return ordered[k : n - k].mean(dim=0)
    raise RobustConfigError(f"unknown robust rule {rule!r}; choose one of {list(ROBUST_RULES)}")


def robust_module(
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
    previous: tuple[torch.Tensor, torch.Tensor],
    *,
    rule: str,
    trim: float = 0.2,
    min_clients: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One module's robust factors from every client's ``A_k`` (``r_k x d_in``) and ``B_k`` (``d_out x r_k``).

    ``previous`` is the module's ``(A, B)`` at ``r_max`` (kept for components covered by fewer than ``min_clients``
    clients). Components covered by the same clients form blocks between consecutive distinct ranks; returns
    ``(A, B, thin blocks as "[lo:hi]")`` in the dtype of ``previous``.

    Example:
        >>> a, b, thin = robust_module([torch.ones(1, 2), 3 * torch.ones(2, 2)], [torch.ones(3, 1), torch.ones(3, 2)],
        ...                            (torch.zeros(2, 2), torch.zeros(3, 2)), rule="median")
        >>> a[:, 0].tolist(), thin
        ([2.0, 3.0], [])
    """
    a_out, b_out = (t.clone() for t in previous)
    ranks = [int(a.shape[0]) for a in a_list]
    thin: list[str] = []
    bounds = sorted({0, *ranks})
    for lo, hi in zip(bounds, bounds[1:]):
        covering = [k for k, r in enumerate(ranks) if r >= hi]
        if len(covering) < min_clients:
            thin.append(f"[{lo}:{hi}]")
            continue
        a_stack = torch.stack([a_list[k][lo:hi].to(a_out.dtype) for k in covering])
        b_stack = torch.stack([b_list[k][:, lo:hi].to(b_out.dtype) for k in covering])
        a_out[lo:hi] = robust_stat(a_stack, rule, trim)
        b_out[:, lo:hi] = robust_stat(b_stack, rule, trim)
    return a_out, b_out, thin


class _RobustModule:
    """Keeps every client's factors of one module at its own rank (a robust statistic needs them all)."""

    def __init__(self, method: RobustMethod, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int) -> None:
        self.method, self.r_max = method, r_max
        self.a_tail, self.b_tail = tuple(a_shape[1:]), tuple(b_shape[2:])
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def add(self, client_id: str, a: torch.Tensor, b: torch.Tensor, level: int, weight: float) -> None:
        if client_id not in self.entries:  # a second add only changes the weight (the cap), which is unused here
            self.entries[client_id] = (float64_a(a), float64_b(b), level)

    def level_used(self) -> int | None:
        return max((e[2] for e in self.entries.values()), default=None)

    def result(self, previous: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        entries = list(self.entries.values())
        d_in = entries[0][0].shape[1]
        d_out = entries[0][1].shape[0]
        if previous is None:
            prev = (torch.zeros(self.r_max, d_in, dtype=torch.float64), torch.zeros(d_out, self.r_max,
                                                                                   dtype=torch.float64))
        else:
            prev = (float64_a(previous[0]), float64_b(previous[1]))
        a, b, _ = robust_module([e[0] for e in entries], [e[1] for e in entries], prev, rule=self.method.rule,
                                trim=self.method.trim, min_clients=self.method.min_clients)
        a = a.to(torch.float32).reshape(self.r_max, *self.a_tail)
        b = b.to(torch.float32).reshape(d_out, self.r_max, *self.b_tail)
        return a, b

    def clone(self) -> _RobustModule:
        copy = _RobustModule(self.method, (0, *self.a_tail), (0, 0, *self.b_tail), self.r_max)
        copy.entries = dict(self.entries)
        return copy


class RobustMethod(AggregationMethod):
    """A robust statistic per component as a registered aggregation method (``median``, ``trimmed_mean``).

    Non-streaming: every client's factors are kept (at their own ranks, so coverage is exact) and combined per
    component with :func:`robust_module`; components covered by fewer than ``min_clients`` clients keep the previous
    global. Dense extras (``modules_to_save``) are the aggregator's data-weighted mean, and the reported weights are
    those data-size weights (a robust statistic has none of its own). Register variants under your own name:

    Example:
        >>> from peft_hetlora.federated import register_aggregation, unregister_aggregation
        >>> register_aggregation("trimmed_35", RobustMethod("trimmed_mean", trim=0.35, min_clients=5)).trim
        0.35
        >>> unregister_aggregation("trimmed_35")
    """

    weights = "data"
    uses_previous = True
    streaming = False

    def __init__(self, rule: str = "median", *, trim: float = 0.2, min_clients: int = 1) -> None:
        if rule not in ROBUST_RULES:
            raise RobustConfigError(f"unknown robust rule {rule!r}; choose one of {list(ROBUST_RULES)}")
        self.name = rule  # type: ignore[misc]
        self.rule, self.trim, self.min_clients = rule, float(trim), int(min_clients)

    def accumulator(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int) -> _RobustModule:
        return _RobustModule(self, a_shape, b_shape, r_max)


def robust_aggregate(
    updates: Iterable[ClientUpdate],
    *,
    rule: str = "median",
    r_max: int,
    previous: Mapping[str, torch.Tensor] | None = None,
    trim: float = 0.2,
    min_clients: int = 1,
    scaling: float = 1.0,
) -> AggregationResult:
    """Aggregate with a coordinate-wise robust statistic per component (see the module docstring).

    Args:
        updates: the round's client updates (held in memory: a median needs every client at once, one module at a
            time is stacked, ``n x r_max x (d_in + d_out)`` floats).
        rule: ``"median"`` or ``"trimmed_mean"``.
        r_max: rank of the global adapter.
        previous: the global adapter the clients started from; components covered by fewer than ``min_clients``
            clients keep its values (zeros when None).
        trim: the trimmed mean's fraction ``beta`` dropped from *each* end, ``0 <= beta < 0.5``; it tolerates
            ``floor(beta * n_j)`` Byzantine clients among the ``n_j`` covering component ``j``.
        min_clients: components covered by fewer clients keep ``previous`` (raise it to the number of Byzantine
            clients you must tolerate times 2, plus 1, so that a component only attackers claim is never taken).
        scaling: the LoRA scale ``s``; only used for the reported norms ``||s B_k A_k||_F``.

    Returns:
        An :class:`AggregationResult` with ``method=rule`` and uniform reporting ``weights`` (a robust statistic
        has no per-client weights); dense extras use the same rule over all clients.

    Example:
        >>> import torch
        >>> ups = [ClientUpdate(f"c{k}", {"m.lora_A.weight": torch.ones(2, 4) * k,
        ...                               "m.lora_B.weight": torch.ones(3, 2)}, 2, 1) for k in range(5)]
        >>> float(robust_aggregate(ups, rule="trimmed_mean", r_max=2, trim=0.2).state_dict["m.lora_A.weight"][0, 0])
        2.0
    """
    if rule not in ROBUST_RULES:
        raise RobustConfigError(f"unknown robust rule {rule!r}; choose one of {list(ROBUST_RULES)}")
    if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0.0 <= trim < 0.5:
        raise RobustConfigError(f"trim must be a fraction in [0, 0.5) dropped from each end, got {trim!r}")
    if isinstance(min_clients, bool) or not isinstance(min_clients, int) or min_clients < 1:
        raise RobustConfigError(f"min_clients must be an int >= 1, got {min_clients!r}")
    items, layout = validate_round(updates, r_max)
    prev_factors, _ = previous_factors(previous, layout, extras_needed=False)

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    thin: list[str] = []
    for name, spec in layout.modules.items():
        a_list = [float64_a(u.state_dict[spec.a_key]) for u in items]
        b_list = [float64_b(u.state_dict[spec.b_key], name) for u in items]
        a_out, b_out, gaps = robust_module(a_list, b_list, prev_factors[name], rule=rule, trim=trim,
                                           min_clients=min_clients)
        thin += [f"{name}{gap}" for gap in gaps]
        factors[name] = (a_out, b_out)
    extras = {
        key: robust_stat(torch.stack([u.state_dict[key].detach().to("cpu", torch.float64) for u in items]), rule, trim)
        for key in layout.extras
    }
    messages = [f"robust {rule}" + (f" (trim={trim})" if rule == "trimmed_mean" else "") + " per component"]
    if thin:
        messages.append(
            f"{len(thin)} component block(s) covered by < {min_clients} client(s) kept previous: {thin[:5]}"
        )
    n = len(items)
    return AggregationResult(
        state_dict=to_state_dict(layout, factors, extras),
        weights={u.client_id: 1.0 / n for u in items},
        norms={u.client_id: update_norm(u.state_dict, scaling) for u in items},
        clip_scales={u.client_id: 1.0 for u in items},
        ranks={u.client_id: int(u.rank) for u in items},
        method=rule,
        messages=messages,
    )


# ``median`` and ``trimmed_mean`` are built-in names: accepted by aggregate, the coordinator, ``hetlora coordinate``
# and the Flower strategy (import-time registration; the `aggregation` face imports this module).
for _rule in ROBUST_RULES:
    if not is_builtin(_rule):
        register_builtin(RobustMethod(_rule))
