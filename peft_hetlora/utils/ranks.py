"""The one rank check: "an integer in [lo, hi]", raising the project's `RankError`.

Every place in the tuner, `federated/` and `flower/` that takes a rank from a setting, a policy, a client report or an
upload's shapes calls `check_rank`, so the rule and its message are written once.

Example:
    ```py
    >>> check_rank(4, 1, 16)
    4
    >>> try:
    ...     check_rank(20, 1, 16, what="client.json rank_out", hi_name="r_max")
    ... except RankError as err:
    ...     print(err)
    client.json rank_out 20 is outside [1, r_max=16]
    ```
"""

from __future__ import annotations

from numbers import Integral

from .errors import RankError
from .untrusted_text import brief

__all__ = ["MAX_RANK", "RankError", "RankTypeError", "check_rank", "is_rank"]

#: the upper bound used where a rank has no federation bound (a sanity cap, far above any real adapter)
MAX_RANK = 1 << 30


class RankTypeError(RankError, TypeError):
    """A rank that is not an integer at all (a bool, a float, a string)."""


def is_rank(value: object, lo: int, hi: int) -> bool:
    """True when ``value`` is an integer (not a bool; numpy integers count) with ``lo <= value <= hi``.

    Example:
        ```py
        >>> is_rank(True, 0, 2), is_rank(2.0, 0, 2), is_rank(2, 0, 2)
        (False, False, True)
        ```
    """
    return isinstance(value, Integral) and not isinstance(value, bool) and lo <= int(value) <= hi


def _bound(name: str, value: int) -> str:
    return f"{name}={value}" if name else str(value)


def check_rank(value: object, lo: int, hi: int, *, what: str = "rank", lo_name: str = "", hi_name: str = "",
               hint: str = "", error: type[RankError] = RankError) -> int:
    """``int(value)`` if it is an integer in ``[lo, hi]``, else a `RankError` naming ``what`` and the range.

    Args:
        value: the candidate rank (from a config, a policy, a client report, an upload's shapes).
        lo, hi: the inclusive bounds; lo_name, hi_name: their names in the message (``"r_min"``, ``"r_max"``).
        what: what the value is (``"client.json rank_in"``, ``"Client 'a': rank"``).
        hint: appended to the message: what the user should do.
        error: the `RankError` subclass to raise (e.g. ``AggregationRankError`` where callers catch
            ``AggregationError``); type errors raise it too unless it is `RankError` itself (then `RankTypeError`).

    Raises:
        RankTypeError: not an integer (bools refused); a `RankError` and a `TypeError`.
        RankError: an integer outside ``[lo, hi]`` (a `ValueError`).

    Example:
        ```py
        >>> check_rank(3, 2, 8, what="r_min")
        3
        ```
    """
    unbounded = hi >= MAX_RANK and not hi_name  # no real upper bound: say ">= lo", not a huge number
    span = f">= {_bound(lo_name, lo)}" if unbounded else f"in [{_bound(lo_name, lo)}, {_bound(hi_name, hi)}]"
    tail = f"; {hint}" if hint else ""
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise (RankTypeError if error is RankError else error)(f"{what} must be an integer {span}, got "
                                                               f"{brief(value)}{tail}")
    if not lo <= int(value) <= hi:
        if unbounded:
            raise error(f"{what} must be {span}, got {int(value)}{tail}")
        raise error(f"{what} {int(value)} is outside {span[3:]}{tail}")
    return int(value)
