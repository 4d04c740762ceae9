"""Which components of the global adapter each client trains in a round: ``prefix``, ``rolling``, ``coverage``.

A client with budget ``k`` trains ``k`` of the ``r_max`` global components (docs/design.md#component-rule) and uploads
them with
their indices (``ClientUpdate.components``); outside its set it keeps the global's components frozen. These are pure
functions of the round's sampled clients and their budgets, so the server (or every client, given the same inputs)
computes the same assignment.

``prefix``
    components ``0 .. k-1``: HetLoRA (arXiv 2401.06432) and RBLA (arXiv 2408.08699).
``rolling``
    a window of ``k`` components whose offset moves every round, as in FedRolex (Alam et al., arXiv 2212.01548),
    which rolls the extracted sub-model of HeteroFL (Diao et al., arXiv 2010.01264) over rounds. Default: each client's
    window moves by its own size, so successive rounds tile the components; ``step=1`` is FedRolex's shared offset
    that moves one component per round.
``coverage``
    the server assigns the round's windows so every component is trained by as many of the sampled clients as
    possible: greedy least-covered-first, largest budget first (this project's policy). After it, the coverage counts
    of the non-anchor components differ by at most one, which is the best any assignment can do, and every
    component is covered whenever the budgets add up to at least the number of components.

``anchor = a`` makes components ``0 .. a-1`` part of every client's set (they train the first ``min(a, k)`` and
their window covers the rest); the window policies then move over components ``a .. r_max-1`` only.

Example:
    >>> select_components("rolling", {"weak": 2, "strong": 4}, r_max=8, round_idx=1, seed=0)
    {'weak': (2, 3), 'strong': (4, 5, 6, 7)}
    >>> sel = select_components("coverage", {"a": 2, "b": 2, "c": 4}, r_max=8, round_idx=0, seed=0)
    >>> sorted(j for idx in sel.values() for j in idx)
    [0, 1, 2, 3, 4, 5, 6, 7]
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ...utils.errors import RankError
from ..adapter import is_int

__all__ = ["SELECTION_POLICIES", "select_components"]

SELECTION_POLICIES: tuple[str, ...] = ("prefix", "rolling", "coverage")
"""Names accepted by :func:`select_components`."""


def _check(policy: str, client_ranks: Mapping[str, int], r_max: int, round_idx: int, seed: int, anchor: int,
           step: int | None) -> None:
    if policy not in SELECTION_POLICIES:
        raise RankError(f"unknown component selection policy {policy!r}; choose one of {list(SELECTION_POLICIES)}")
    if not is_int(r_max) or r_max < 1:
        raise RankError(f"r_max must be an int >= 1, got {r_max!r}")
    if not is_int(round_idx) or round_idx < 0:
        raise RankError(f"round_idx must be an int >= 0, got {round_idx!r}")
    if not is_int(seed):
        raise RankError(f"seed must be an int, got {seed!r}")
    if not is_int(anchor) or not 0 <= anchor <= r_max:
        raise RankError(f"anchor must be an int in [0, r_max={r_max}], got {anchor!r}")
    if step is not None and (not is_int(step) or step < 1):
        raise RankError(f"step must be None or an int >= 1, got {step!r}")
    if not isinstance(client_ranks, Mapping):
        raise RankError(f"client_ranks must be a mapping client_id -> rank, got {type(client_ranks).__name__}")
    bad = {cid: k for cid, k in client_ranks.items() if not is_int(k) or k < 1}
    if bad:
        raise RankError(f"client ranks must be ints >= 1; got {dict(list(bad.items())[:5])}")


def select_components(
    policy: str,
    client_ranks: Mapping[str, int],
    *,
    r_max: int,
    round_idx: int,
    seed: int,
    anchor: int = 0,
    step: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """The global components each sampled client trains this round, ascending (slot order of its upload).

    Args:
        policy: ``"prefix"``, ``"rolling"`` or ``"coverage"`` (module docstring).
        client_ranks: ``client_id -> k``, the number of components the client can train (its rank); ``k > r_max``
            counts as ``r_max``.
        r_max: the global adapter's rank.
        round_idx: the round number (``>= 0``); moves the ``rolling`` windows and reseeds ``coverage``'s ties.
        seed: the federation's seed; ``coverage`` breaks ties between equally covered components and between
            clients of equal budget with it, so the assignment is deterministic given ``(seed, round_idx)``.
        anchor: components ``0 .. anchor-1`` are in every client's set (up to its budget).
        step: ``rolling`` only: ``None`` moves each client's window by its own size per round (successive rounds
            tile the components); an int moves one offset shared by all clients by ``step`` per round (``1`` is
            FedRolex).

    Returns:
        ``client_id -> sorted tuple of component indices`` (``min(k, r_max)`` of them), in ``client_ranks`` order.

    Raises:
        RankError: an unknown policy or a bad argument (the message says which).

    Example:
        >>> select_components("prefix", {"a": 3}, r_max=8, round_idx=5, seed=0)
        {'a': (0, 1, 2)}
        >>> select_components("rolling", {"a": 3}, r_max=8, round_idx=2, seed=0, anchor=1)
        {'a': (0, 5, 6)}
    """
    _check(policy, client_ranks, r_max, round_idx, seed, anchor, step)
    free = r_max - anchor
    budgets = {cid: min(int(k), r_max) for cid, k in client_ranks.items()}
    anchors = {cid: tuple(range(min(anchor, k))) for cid, k in budgets.items()}
    windows = {cid: k - len(anchors[cid]) for cid, k in budgets.items()}  # components beyond the anchors
    if policy == "prefix":
        chosen = {cid: tuple(range(anchor, anchor + w)) for cid, w in windows.items()}
    elif policy == "rolling":
        chosen = {}
        for cid, w in windows.items():
            if w == 0:
                chosen[cid] = ()
                continue
            offset = (round_idx * (w if step is None else step)) % free
            chosen[cid] = tuple(anchor + (offset + i) % free for i in range(w))
    else:
        chosen = _least_covered_first(windows, free, anchor, np.random.default_rng([seed, round_idx]))
    return {cid: tuple(sorted(anchors[cid] + chosen[cid])) for cid in client_ranks}


def _least_covered_first(
    windows: Mapping[str, int], free: int, anchor: int, rng: np.random.Generator
) -> dict[str, tuple[int, ...]]:
    """Largest window first, each client takes its ``w`` least-covered components (random tie order).

    Invariant: the counts of components ``anchor .. r_max-1`` differ by at most one after every client (taking the
    ``w <= free`` smallest of counts in ``{c, c + 1}`` leaves counts in ``{c, c + 1}`` or ``{c + 1, c + 2}``).
    """
    counts = np.zeros(free, dtype=np.int64)
    tie = rng.permutation(free)  # equal counts: this round's random order of components
    ids = list(windows)
    client_tie = rng.permutation(len(ids))
    order = sorted(range(len(ids)), key=lambda i: (-windows[ids[i]], client_tie[i]))
    chosen: dict[str, tuple[int, ...]] = {}
    for i in order:
        cid, w = ids[i], windows[ids[i]]
        picked = np.lexsort((tie, counts))[:w]  # by count, then by this round's tie order
        counts[picked] += 1
        chosen[cid] = tuple(int(anchor + j) for j in picked)
    return chosen
