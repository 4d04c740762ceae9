"""Component index sets: which components of the global adapter a client trained and uploaded
(docs/design.md#component-rule).

Component ``j`` of a module is row ``j`` of the global ``A`` together with column ``j`` of the global ``B``. A client
that trains the index set ``I_k`` uploads its factors in *slot order*: uploaded row ``i`` of ``A`` (column ``i`` of
``B``) is global component ``components[i]``. HetLoRA and RBLA clients train a prefix, ``components = range(r_k)``,
which is also what ``components=None`` means everywhere, so every prefix path is unchanged.

A client's report is hostile until checked: :func:`check_components` is what validation runs on the ``components``
field of a ``client.json`` before the aggregator sees it.

Example:
    >>> check_components([5, 0, 7], r_max=8, budget=4)
    (5, 0, 7)
    >>> is_prefix((0, 1, 2)), is_prefix((1, 2))
    (True, False)
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

import numpy as np

from ...utils.errors import RankError

__all__ = ["check_components", "coverage_counts", "is_int", "is_prefix", "unique_indices"]


def is_int(value: Any) -> bool:
    """True for Python / numpy integers, False for bools (a hostile ``true`` is no component index or rank).

    Example:
        >>> is_int(3), is_int(np.int64(3)), is_int(True), is_int(3.0)
        (True, True, False, False)
    """
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


_SHOWN = 8  # how many offending values an error message lists


def check_components(
    indices: Any, *, r_max: int, budget: int, allowed: Collection[int] | None = None
) -> tuple[int, ...]:
    """Validate a client's component index list and return it as a tuple of ints, in slot order.

    Args:
        indices: the ``components`` a client reports (a list of ints; slot ``i`` is global component
            ``indices[i]``).
        r_max: the global adapter's rank; every index must be in ``[0, r_max)``.
        budget: the most components this client may train (its assigned rank, ``rank_in``); ``len(indices)``
            must not exceed it.
        allowed: the components the server assigned this client for the round (``select_components``), when it
            assigns them; every index must be one of them, so a client cannot move its weight onto components it
            was not given. ``None``: any component below ``r_max``.

    Returns:
        ``tuple(indices)``, unchanged order.

    Raises:
        RankError: not a list of ints, empty, a bool or non-int entry, a duplicate, an index outside ``[0, r_max)``,
            or more indices than the budget; the message says which entries and what to send instead.

    Example:
        >>> check_components((0, 1), r_max=4, budget=2)
        (0, 1)
        >>> check_components([6, 1], r_max=8, budget=2, allowed=(1, 6))
        (6, 1)
        >>> try:
        ...     check_components([0, 0], r_max=4, budget=2)
        ... except RankError as err:
        ...     print(type(err).__name__)
        RankError
    """
    if not is_int(r_max) or r_max < 1:
        raise RankError(f"components: r_max must be an int >= 1, got {r_max!r}")
    out = unique_indices(indices, budget=budget)
    outside = [value for value in out if not value < r_max]
    if outside:
        raise RankError(
            f"components: indices {outside[:_SHOWN]} are outside [0, {r_max}); the global adapter has r_max={r_max} "
            "components"
        )
    if allowed is not None:
        allowed_set = set(allowed)
        foreign = [value for value in out if value not in allowed_set]
        if foreign:
            raise RankError(
                f"components {foreign[:_SHOWN]} were not assigned to this client this round (assigned: "
                f"{sorted(allowed_set)[:16]}); upload only the components in the round plan"
            )
    return out


def unique_indices(indices: Any, *, budget: int) -> tuple[int, ...]:
    """The checks of :func:`check_components` that need no ``r_max``: ints, ``>= 0``, unique, ``1 .. budget`` of them.

    Example:
        >>> unique_indices([3, 1], budget=2)
        (3, 1)
    """
    if not is_int(budget) or budget < 1:
        raise RankError(f"components: budget must be an int >= 1, got {budget!r}")
    if isinstance(indices, np.ndarray) and indices.ndim == 1:
        indices = indices.tolist()
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
        raise RankError(
            "components must be a list of ints (the global component index of each uploaded slot), "
            f"got {type(indices).__name__}"
        )
    bad = [value for value in indices if not is_int(value)]
    if bad:
        raise RankError(
            f"components must hold ints only; got {[repr(v) for v in bad[:_SHOWN]]} (bools and floats are refused)"
        )
    out = tuple(int(value) for value in indices)
    if not out:
        raise RankError("components is empty; a client uploads at least one component (or omit the field)")
    if len(out) > budget:
        raise RankError(
            f"components lists {len(out)} indices but this client's budget is {budget} components; upload at most "
            f"{budget} (the rank it was assigned)"
        )
    negative = [value for value in out if value < 0]
    if negative:
        raise RankError(f"components: indices {negative[:_SHOWN]} are negative; indices start at 0")
    seen: set[int] = set()
    for value in out:
        if value in seen:
            raise RankError(
                f"components: index {value} appears more than once; each component of the global adapter may be "
                "uploaded once (send unique indices, one per uploaded slot)"
            )
        seen.add(value)
    return out


def is_prefix(components: Sequence[int] | None) -> bool:
    """True when ``components`` is ``None`` or ``0, 1, ..., n - 1`` in order (the HetLoRA / RBLA case).

    Example:
        >>> is_prefix(None), is_prefix([0, 1]), is_prefix([1, 0])
        (True, True, False)
    """
    return components is None or all(value == slot for slot, value in enumerate(components))


def coverage_counts(index_sets: Iterable[Sequence[int]], r_max: int) -> list[int]:
    """How many of the given index sets contain each component ``0 .. r_max - 1``.

    Example:
        >>> coverage_counts([(0, 1), (1, 3)], 4)
        [1, 2, 0, 1]
    """
    counts = [0] * r_max
    for indices in index_sets:
        for value in indices:
            counts[value] += 1
    return counts
