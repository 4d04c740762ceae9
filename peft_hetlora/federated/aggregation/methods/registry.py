"""The registry of aggregation methods: one name -> one :class:`~.base.AggregationMethod`.

Every place that accepts a method name (``aggregate``, ``StreamingAggregator``, the coordinator, the Flower
strategy, ``hetlora coordinate`` / ``simulate``) looks it up here, so a method registered with
:func:`register_aggregation` is accepted everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from ....utils.errors import AggregationError
from .base import AggregationMethod

__all__ = [
    "AGGREGATION_METHODS",
    "aggregation_methods",
    "get_aggregation",
    "is_builtin",
    "register_aggregation",
    "register_builtin",
    "unregister_aggregation",
]

_REGISTRY: dict[str, AggregationMethod] = {}
_BUILTIN: set[str] = set()
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")


def register_aggregation(name: str, method: AggregationMethod | type[AggregationMethod], *,
                         overwrite: bool = False) -> AggregationMethod:
    """Make ``method`` available under ``name`` to every part of peft-hetlora.

    Args:
        name: the method's name (letters, digits, ``_`` and ``-``, starting with a letter).
        method: an :class:`AggregationMethod` instance or subclass (instantiated without arguments).
        overwrite: replace a registered user method of the same name (built-ins can never be replaced).

    Returns:
        The registered instance.

    Raises:
        AggregationError: a bad name, or the name is taken (pass ``overwrite=True`` for your own method).
        TypeError: ``method`` is not an :class:`AggregationMethod`.

    Example:
        >>> import torch
        >>> from peft_hetlora.federated import AggregationMethod, register_aggregation, unregister_aggregation
        >>> class Median(AggregationMethod):
        ...     weights, streaming = "data", False
        ...     def combine(self, a_list, b_list, weights, previous):
        ...         return torch.stack(a_list).median(0).values, torch.stack(b_list).median(0).values
        >>> register_aggregation("factor_median", Median).name
        'factor_median'
        >>> unregister_aggregation("factor_median")
    """
    if isinstance(method, type):
        if not issubclass(method, AggregationMethod):
            raise TypeError(f"register_aggregation: {method!r} is not an AggregationMethod subclass")
        method = method()
    if not isinstance(method, AggregationMethod):
        raise TypeError(
            f"register_aggregation: expected an AggregationMethod (subclass or instance), got {type(method).__name__}"
        )
    if not isinstance(name, str) or not _NAME.match(name):
        raise AggregationError(
            f"register_aggregation: bad name {name!r}; use letters, digits, '_' or '-' (starting with a letter)"
        )
    if name in _BUILTIN and _REGISTRY.get(name) is not method:
        raise AggregationError(
            f"register_aggregation: {name!r} is a built-in method; register yours under another name"
        )
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not method:
        raise AggregationError(
            f"register_aggregation: {name!r} is already registered; pass overwrite=True to replace it"
        )
    if method.weights not in ("sparsity", "data"):
        raise AggregationError(
            f"register_aggregation: {name!r} has weights={method.weights!r}; use 'sparsity' or 'data'"
        )
    method.name = name  # type: ignore[misc]  # the instance carries its registry name
    _REGISTRY[name] = method
    return method


def unregister_aggregation(name: str) -> None:
    """Remove a user-registered method (built-ins stay).

    Raises:
        AggregationError: ``name`` is a built-in or not registered.
    """
    if name in _BUILTIN:
        raise AggregationError(f"unregister_aggregation: {name!r} is a built-in method and cannot be removed")
    if name not in _REGISTRY:
        raise AggregationError(f"unregister_aggregation: {name!r} is not registered")
    del _REGISTRY[name]


def get_aggregation(name: str) -> AggregationMethod:
    """The registered method called ``name``.

    Raises:
        AggregationError: no method has that name (the message lists the registered ones).

    Example:
        >>> get_aggregation("hetlora").weights
        'sparsity'
    """
    method = _REGISTRY.get(name) if isinstance(name, str) else None
    if method is None:
        raise AggregationError(
            f"unknown aggregation method {name!r}; choose one of {list(_REGISTRY)} or add yours with "
            "peft_hetlora.federated.register_aggregation(name, method)"
        )
    return method


def aggregation_methods() -> tuple[str, ...]:
    """The registered method names, built-ins first, in registration order.

    Example:
        >>> aggregation_methods()[:5]
        ('hetlora', 'zero_pad', 'fedavg', 'flexlora', 'rankwise')
    """
    return tuple(_REGISTRY)


class _LiveNames(Sequence):
    """A read-only, always-current view of the registered names (``in``, iteration, ``len``, indexing)."""

    def __getitem__(self, index):  # type: ignore[override]
        return tuple(_REGISTRY)[index]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_REGISTRY))

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __repr__(self) -> str:
        return repr(tuple(_REGISTRY))


AGGREGATION_METHODS: Sequence[str] = _LiveNames()
"""Names accepted by ``aggregate(method=...)``: a live view of the registry (includes registered methods)."""


def register_builtin(method: AggregationMethod) -> None:
    """Register ``method`` under its own name as a built-in: it can then be neither replaced nor unregistered.

    For the methods this package ships (called once at import by `methods/__init__` and `methods/robust`); a user
    method goes through :func:`register_aggregation`. Registering the same instance again changes nothing.

    Example:
        >>> register_builtin(get_aggregation("hetlora"))
        >>> is_builtin("hetlora")
        True
    """
    register_aggregation(method.name, method)
    _BUILTIN.add(method.name)


def is_builtin(name: str) -> bool:
    """True when ``name`` is one of the built-in methods (registered with :func:`register_builtin`).

    Example:
        >>> is_builtin("fedavg"), is_builtin("no-such-method")
        (True, False)
    """
    return name in _BUILTIN
