"""The settings of a round (`RoundSettings`) and the checks that refuse settings the round engine cannot run.

Used by [`round.close_round`][peft_hetlora.federated.round.close_round] and exported from the `round` face.

Example:
    ```py
    >>> RoundSettings(method="hetlora", r_max=8, r_min=2, scaling=2.0).next_rank
    'rank_out'
    ```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...utils.errors import AggregationError
from ...utils.ranks import check_rank
from ..aggregation import DEFAULT_BOUND_MULTIPLIER, DEFAULT_INFLUENCE_BOUND, parse_influence_bound
from ..aggregation.methods import AGGREGATION_METHODS, FlexLoRA, get_aggregation
from ..policies import SELECTION_POLICIES
from .server_step import ServerOptimizer, parse_server_optimizer

__all__ = [
    "DEFAULT_DP_METHOD",
    "DEFAULT_METHOD",
    "CLIENT_TRAINING",
    "DEFAULT_SELECTION",
    "NEXT_RANK_RULES",
    "RoundSettings",
    "check_client_training",
    "check_dp",
    "core_methods",
    "check_selection",
    "check_server_step",
    "default_method_and_selection",
    "dp_method_for",
    "dp_methods",
    "window_methods",
]

NEXT_RANK_RULES = ("rank_out", "initial")
#: What clients below r_max train (docs/methods.md#core-clients): ``"factors"`` (their rank-k prefix of the global,
#: the default) or ``"core"`` (an r_c x r_c core inside the global's top-r_c singular subspace; capable clients,
#: rank r_max, train factors either way).
CLIENT_TRAINING = ("factors", "core")

#: The method of a federation that names none: ``flexlora_held``, FlexLoRA (SVD of the weighted sum of client
#: products, arXiv 2402.11505) over the adapters the clients held, so weak clients do not erase the global's
#: directions above their rank; the winner on client validation data of the study in benchmarks/README.md (issue 13:
#: each method at its best learning rate, 3 seeds, two corpora). Plain ``flexlora`` and the paper's ``hetlora`` stay
#: one argument away (``method="hetlora"``).
DEFAULT_METHOD = "flexlora_held"
#: The component selection of a federation that names neither a method nor a policy: clients train the prefix of
#: the SVD-ordered global, its best rank-k approximation, and need nothing beyond plain PEFT LoRA.
DEFAULT_SELECTION = "prefix"
#: The method a federation that names none gets under differential privacy, which FlexLoRA has no form for: the
#: component rule on prefixes (RBLA's per-component average, public weights).
DEFAULT_DP_METHOD = "component"


def default_method_and_selection(
    method: str | None, component_selection: str | None, dp: Any = None
) -> tuple[str, str]:
    """The ``(method, component_selection)`` a new federation gets from what was given.

    Nothing given: :data:`DEFAULT_METHOD` with :data:`DEFAULT_SELECTION` (:data:`DEFAULT_DP_METHOD` on prefixes
    under DP). A window policy given without a method gets the component rule, the method that aggregates windows.
    A method given without a policy keeps HetLoRA's ``prefix``.

    Example:
        ```py
        >>> default_method_and_selection(None, None)
        ('flexlora_held', 'prefix')
        >>> default_method_and_selection("hetlora", None)
        ('hetlora', 'prefix')
        >>> default_method_and_selection(None, "coverage")
        ('component', 'coverage')
        ```
    """
    if method is not None:
        return method, component_selection or "prefix"
    if dp is not None:
        return DEFAULT_DP_METHOD, component_selection or "prefix"
    if component_selection not in (None, "prefix"):
        return "component", component_selection
    return DEFAULT_METHOD, DEFAULT_SELECTION


@dataclass(frozen=True)
class RoundSettings:
    """The settings `close_round` needs; every engine builds one from its own options.

    Args:
        method: a registered aggregation method.
        r_max, r_min: the federation's rank bounds.
        scaling: ``s`` for norms and clipping.
        clip_norm: the influence bound (`influence.parse_influence_bound`): ``"adaptive"`` (the default, one source:
            `influence.DEFAULT_INFLUENCE_BOUND`; radii ``bound_multiplier`` x the round's median factor steps), a
            fixed number ``C``, or ``"off"`` / ``None`` (the operator's explicit "no bound"). DP rounds clip with
            ``dp.clip`` instead.
        bound_multiplier: ``c`` of the adaptive bound (default `influence.DEFAULT_BOUND_MULTIPLIER`).
        weighting: passed to the aggregator.
        next_rank: ``"rank_out"`` (a client's next rank is what it reported) or ``"initial"``.
        min_accepted: accepted uploads needed to change the global (else it is carried over).
        dp: a `privacy.DPConfig`: the round is aggregated with `privacy.dp_aggregate` instead.
        seed: seeds the DP noise only when ``dp_noise_seed`` is True (tests); otherwise the noise is secret.
        engine: ``"flower"`` / ``"inprocess"`` (recorded in round.json and summary.json), None for the coordinator.
        component_selection: which components each participant trains (`component_selection.SELECTION_POLICIES`):
            ``"prefix"`` (HetLoRA, the default), ``"rolling"`` or ``"coverage"``; a window policy needs a method
            that accepts component-indexed uploads and no DP (`check_selection`).
        anchor: components ``0 .. anchor-1`` are in every client's set (window policies).
        server_optimizer: the server step's optimizer on the product (`server_step.parse_server_optimizer`: a
            dict such as ``{"name": "fedavgm", "lr": 1.0, "momentum": 0.9}`` or ``{"name": "fedadam", ...}``);
            None (the default): the method's aggregate is the new global, as before.
        error_feedback: carry the residual of the truncation back to ``r_max`` to the next round (server-side).
        client_training: `CLIENT_TRAINING`: ``"core"`` makes every participant below ``r_max`` train a core
            (`check_client_training`; docs/methods.md#core-clients).
    """

    method: str
    r_max: int
    r_min: int
    scaling: float
    clip_norm: float | str | None = DEFAULT_INFLUENCE_BOUND
    weighting: str = "per_client"
    next_rank: str = "rank_out"
    min_accepted: int = 1
    dp: Any = None
    seed: int = 0
    dp_noise_seed: bool = False
    engine: str | None = None
    component_selection: str = "prefix"
    anchor: int = 0
    bound_multiplier: float = DEFAULT_BOUND_MULTIPLIER
    server_optimizer: ServerOptimizer | None = None
    error_feedback: bool = False
    client_training: str = "factors"

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "clip_norm", parse_influence_bound(self.clip_norm))
        except ValueError as err:
            raise AggregationError(str(err)) from None
        if self.next_rank not in NEXT_RANK_RULES:
            raise ValueError(f"next_rank must be one of {NEXT_RANK_RULES}, got {self.next_rank!r}.")
        check_rank(self.r_min, 1, self.r_max, what="r_min")
        check_dp(self.method, self.dp)
        check_selection(self.method, self.component_selection, self.anchor, r_max=self.r_max, dp=self.dp)
        object.__setattr__(self, "server_optimizer", parse_server_optimizer(self.server_optimizer))
        check_server_step(self.method, self.server_optimizer, self.error_feedback, dp=self.dp)
        check_client_training(self.method, self.client_training, self.component_selection, dp=self.dp)


def check_client_training(method: str, client_training: str, component_selection: str = "prefix", *,
                          dp: Any = None) -> None:
    """Refuse a ``client_training`` the round engine cannot aggregate.

    ``"core"`` needs a method with the ``accepts_core`` capability (`core_methods`), the ``prefix`` selection and
    no DP.

    Raises:
        AggregationError: with what to change.

    Example:
        ```py
        >>> check_client_training("flexlora_held", "core")
        >>> check_client_training("fedavg", "factors")
        ```
    """
    if client_training not in CLIENT_TRAINING:
        raise AggregationError(f"client_training must be one of {list(CLIENT_TRAINING)}, got {client_training!r}.")
    if client_training == "factors":
        return
    if not get_aggregation(method).accepts_core:
        raise AggregationError(f"client_training='core' makes clients upload cores, which method {method!r} cannot "
                               f"aggregate; use one of {list(core_methods())} (or client_training='factors').")
    if component_selection != "prefix" or dp is not None:
        raise AggregationError("client_training='core' needs component_selection='prefix' and no dp=...")


def core_methods() -> tuple[str, ...]:
    """The registered methods that take core uploads (``accepts_core``), in registration order.

    Example:
        ```py
        >>> core_methods()
        ('flexlora_held',)
        ```
    """
    return tuple(m for m in AGGREGATION_METHODS if get_aggregation(m).accepts_core)


def check_selection(method: str, component_selection: str, anchor: int = 0, *, r_max: int | None = None,
                    dp: Any = None) -> None:
    """Refuse a component selection the round engine cannot aggregate.

    A window policy (``rolling`` / ``coverage``) makes clients upload component-indexed factors, which only methods
    with the ``accepts_components`` capability aggregate (`window_methods`); the DP, robust and secure-sum paths
    handle prefixes only.

    Raises:
        AggregationError: with what to change.

    Example:
        ```py
        >>> check_selection("component", "coverage")
        >>> check_selection("fedavg", "prefix")
        ```
    """
    if component_selection not in SELECTION_POLICIES:
        raise AggregationError(f"component_selection must be one of {list(SELECTION_POLICIES)}, got "
                               f"{component_selection!r}.")
    if isinstance(anchor, bool) or not isinstance(anchor, int) or anchor < 0 or (r_max is not None and anchor > r_max):
        raise AggregationError(f"anchor must be an int in [0, r_max={r_max}], got {anchor!r}.")
    if component_selection == "prefix":
        return
    if not get_aggregation(method).accepts_components:
        takers = list(window_methods())
        raise AggregationError(
            f"component_selection={component_selection!r} makes clients train windows of components, which method "
            f"{method!r} cannot aggregate; use one of {takers} (or component_selection='prefix')."
        )
    if dp is not None:
        raise AggregationError(
            f"component_selection={component_selection!r} with dp=...: differentially private aggregation supports "
            "prefix uploads only; use component_selection='prefix' for a DP federation."
        )


def check_server_step(method: str, server_optimizer: Any, error_feedback: Any, *, dp: Any = None) -> None:
    """Refuse a server step that cannot do anything (`server_step`: docs/aggregation.md#server-step).

    Error feedback carries what the truncation back to ``r_max`` dropped; without a server optimizer the only
    truncation is the method's own, which only the FlexLoRA family (an SVD of a sum of products) has, and not
    under DP (the DP aggregate is a rank-``r_max`` average of factors). Anything else would carry a zero residual
    forever.

    Raises:
        AggregationError: with what to change.

    Example:
        ```py
        >>> check_server_step("flexlora_held", None, True)
        >>> check_server_step("fedavg", {"name": "fedavgm"}, True)
        ```
    """
    if not isinstance(error_feedback, bool):
        raise AggregationError(f"error_feedback must be True or False, got {error_feedback!r}")
    if not error_feedback or server_optimizer is not None:
        return
    factorises = isinstance(get_aggregation(method), FlexLoRA) if method in AGGREGATION_METHODS else False
    if dp is not None or not factorises:
        takers = [m for m in AGGREGATION_METHODS if isinstance(get_aggregation(m), FlexLoRA)]
        why = "under DP the aggregate" if dp is not None else f"the aggregate of method {method!r}"
        raise AggregationError(
            f"error_feedback=True without a server_optimizer does nothing here: {why} is never truncated, so the "
            f"residual stays zero. Add server_optimizer=... (its step is truncated back to r_max), or use one of "
            f"{takers} without DP."
        )


def window_methods() -> tuple[str, ...]:
    """The registered methods that aggregate window policies (``accepts_components``), in registration order.

    Example:
        ```py
        >>> "component" in window_methods(), "fedavg" in window_methods()
        (True, False)
        ```
    """
    return tuple(m for m in AGGREGATION_METHODS if get_aggregation(m).accepts_components)


def dp_methods() -> tuple[str, ...]:
    """The registered methods with a differentially private form (``dp_form``), in registration order.

    Example:
        ```py
        >>> "rankwise" in dp_methods(), "hetlora" in dp_methods()
        (True, False)
        ```
    """
    return tuple(m for m in AGGREGATION_METHODS if get_aggregation(m).dp_form is not None)


def dp_method_for(method: str) -> str:
    """The `dp_aggregate` method of an aggregation method: its ``dp_form`` capability (``rankwise`` ->
    ``component``; ``zero_pad`` / ``fedavg`` -> ``zero_pad``).

    Raises:
        AggregationError: for methods whose weights are data-dependent (``hetlora``) or that have no DP form.

    Example:
        ```py
        >>> dp_method_for("rankwise")
        'component'
        ```
    """
    form = get_aggregation(method).dp_form if method in AGGREGATION_METHODS else None
    if form is None:
        raise AggregationError(
            f"method {method!r} has no differentially private form: use rankwise (the component rule), zero_pad or "
            "fedavg with dp=... (hetlora's sparsity weights depend on the clients' data; docs/privacy.md)."
        )
    return form


def check_dp(method: str, dp: Any) -> None:
    """Refuse a DP setting the round engine cannot run (no DP form of ``method``, no public denominator).

    Raises:
        AggregationError: with what to change.

    Example:
        ```py
        >>> check_dp("rankwise", None)
        ```
    """
    if dp is None:
        return
    dp_method_for(method)
    if getattr(dp, "expected_clients", None) is None:
        raise AggregationError("DPConfig needs expected_clients=... (or population=N, then q * N): the public "
                               "denominator of every DP round.")
