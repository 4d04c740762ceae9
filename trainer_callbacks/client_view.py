"""The clients' view of a store: `get_global` / `latest_global` with `server_state=False` where the store takes it.

A client never reads the server optimizer's state (`SERVER_STATE_FILE`), so the callbacks ask the store for the
global without it (`server_state=False`; `HubStore` then does not download it). Stores written against the
`AdapterStore` protocol before the keyword existed (a user's own class, with `get_global(self, round_idx)`) keep
working: the signature of each store class's method is read once; a method without the keyword (and without
`**kwargs`) is called without it, after one `FutureWarning` that says what to add. Nothing wraps the real call in
a `try`, so a `TypeError` raised inside a store is never mistaken for a missing keyword.

Example:
    ```py
    >>> import tempfile, warnings
    >>> from peft_hetlora.federated import LocalStore
    >>> client_latest_global(LocalStore(tempfile.mkdtemp(), create=True)) is None  # nothing published yet
    True
    >>> class OldStore:  # a store from before the keyword: no server_state
    ...     def latest_global(self):
    ...         return None
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     client_latest_global(OldStore()) is None, client_latest_global(OldStore()) is None
    (True, True)
    >>> [type(w.message).__name__ for w in caught]  # once per store class
    ['FutureWarning']
    ```
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["accepts_server_state", "client_get_global", "client_latest_global"]

_KEYWORD = "server_state"
_ACCEPTS: dict[Any, bool] = {}
"""Per store method implementation (the function a class defines): whether it takes ``server_state``."""
_WARNED: set[Any] = set()
"""The store classes already warned about (one `FutureWarning` per class)."""


def _owner(method: Callable[..., Any]) -> tuple[Any, str]:
    """(the class that holds the bound `method`, or the function itself; a readable name of the method)."""
    owner = getattr(method, "__self__", None)
    name = getattr(method, "__name__", "method")
    if owner is None:
        return getattr(method, "__func__", method), getattr(method, "__qualname__", name)
    cls = type(owner)
    return cls, f"{cls.__module__}.{cls.__qualname__}.{name}"


def accepts_server_state(method: Callable[..., Any]) -> bool:
    """Whether a store's bound `get_global` / `latest_global` takes ``server_state`` (by its signature, read once per
    implementation; a ``**kwargs`` method counts as taking it). The first time a store class's method does not, one
    `FutureWarning` names it and what to add.

    Example:
        ```py
        >>> import tempfile
        >>> from peft_hetlora.federated import LocalStore
        >>> accepts_server_state(LocalStore(tempfile.mkdtemp(), create=True).get_global)
        True
        ```
    """
    function = getattr(method, "__func__", method)
    try:
        key: Any = function
        known = _ACCEPTS.get(key)
    except TypeError:  # an unhashable callable: one answer per type
        key = type(function)
        known = _ACCEPTS.get(key)
    if known is not None:
        return known
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no readable signature (a builtin): call it the way the old protocol did
        accepts = False
    else:
        accepts = any((p.name == _KEYWORD and p.kind is not p.POSITIONAL_ONLY) or p.kind is p.VAR_KEYWORD
                      for p in parameters)
    _ACCEPTS[key] = accepts
    owner, name = _owner(method)
    if not accepts and owner not in _WARNED:
        _WARNED.add(owner)
        warnings.warn(
            f"{name} takes no `{_KEYWORD}` keyword, so the client asks it for the whole global folder "
            f"(the server optimizer's state included). Add `*, {_KEYWORD}: bool = True` to the store's get_global and "
            "latest_global (False: the clients' view, which need not hold or download server_state.safetensors; "
            "see the AdapterStore protocol, docs/design.md#store-layout); stores without it will stop working in a "
            "future version.",
            FutureWarning,
            stacklevel=3,
        )
    return accepts


def client_get_global(store: Any, round_idx: int) -> Any:
    """``store.get_global(round_idx, server_state=False)``, or without the keyword for a store that lacks it.

    Example:
        ```py
        >>> client_get_global(store, 3).round  # doctest: +SKIP
        3
        ```
    """
    method = store.get_global
    return method(round_idx, server_state=False) if accepts_server_state(method) else method(round_idx)


def client_latest_global(store: Any) -> Any:
    """``store.latest_global(server_state=False)``, or without the keyword for a store that lacks it.

    Example:
        ```py
        >>> client_latest_global(store)  # doctest: +SKIP
        GlobalAdapter(round=3, ...)
        ```
    """
    method = store.latest_global
    return method(server_state=False) if accepts_server_state(method) else method()
