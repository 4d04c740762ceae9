"""``flexlora``: SVD of the data-weighted sum of full updates (Bai et al., arXiv 2402.11505)."""

from __future__ import annotations

import ctypes
import functools
import math
from typing import ClassVar

import numpy as np
import torch

from ....utils.errors import AggregationError
from ...adapter import flat_a, flat_b, is_int
from .base import NONE, AggregationMethod
from .sketch import TwoSidedSketch, product_norm, sketch_bytes, sketch_sizes

__all__ = ["SVD_MODES", "FactorStack", "FlexLoRA", "FlexLoRAHeld"]


FLUSH_COMPONENTS = 16
"""Past the fold, client components are buffered and added to the sketch this many (at least ``r_max``) at a time."""

SVD_MODES: tuple[str, ...] = ("auto", "exact", "randomized", "sketch")
"""How :class:`FlexLoRA` computes the top ``r_max`` SVD of the stacked factors."""


@functools.lru_cache(maxsize=1)
def _malloc_trim():  # noqa: ANN202 - a ctypes function or None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Hand the pages of freed memory back to the operating system where the C allocator keeps them (glibc's
    ``malloc_trim``: the many small blocks of a folded stack stay in the heap otherwise, ~20 MB of resident memory
    for one Llama-3.2-1B layer at r_max 16). A no-op returning False elsewhere; never changes a value.

    Example:
        >>> release_freed_memory() in (True, False)
        True
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class FlexLoRA(AggregationMethod):
    """Data-size weighted sum of ``B_k A_k``, then its top ``r_max`` singular triplets: ``B = U S``, ``A = V^T``.

    From FlexLoRA, Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
    Resources", arXiv 2402.11505. Computed from the stacked low-rank factors, never from a dense ``d_out x d_in``
    matrix; truncating the global to ``r_k`` gives each client its best rank-``r_k`` approximation.

    Args:
        svd: ``"exact"``: two QRs of the stacked factors and an SVD of their ``min(d_out, R) x min(d_in, R)`` core
            (``R = sum_k r_k``); ``"randomized"``: a randomised range finder with oversampling and power
            iterations applied through the factors (Halko, Martinsson and Tropp, "Finding structure with
            randomness", arXiv 0909.4061 / SIAM Review 2011), whose top-``r_max`` error is within a small factor of
            ``sigma_{r_max+1}``; ``"auto"`` (default): exact while ``R <= min(d_out, d_in)`` and the float32 stack
            is no larger than the sketch, ``R <= fold_at`` (``1.5 (l + m)`` for a square module: 139-160 components
            for Llama-3.2-1B's modules at ``r_max`` 16, 582 for a square one at 64: small
            federations such as 4 clients at ranks 2 / 6 / 16 stay exact), and whenever the sketch would not be
            much smaller than the matrix; above it the stack is folded into a one-pass two-sided
            sketch (Tropp, Yurtsever, Udell and Cevher, "Practical sketching algorithms for low-rank matrix
            approximation", SIAM J. Matrix Anal. Appl. 2017, arXiv 1609.00048; :mod:`.sketch`) of range ``l =
            2 r_max + 1`` and co-range ``m = 2 l + 1``, which every later client updates exactly and whose memory is
            flat in the number of clients: ``E ||W - W_hat||_F^2 <= 4 tau_{r_max+1}^2(W)``, exact when ``rank(W) <=
            l`` (docs/aggregation.md); ``"sketch"``: the sketch from the first client (when it is smaller than the
            matrix, else exact).
        oversample: extra sketch columns ``p`` (sketch size ``r_max + p``); power_iters: ``q``; seed: of the
            Gaussian test matrix (the result is deterministic).

    Component-indexed uploads are refused: FlexLoRA sums the products of the adapters clients upload, and a window
    client's upload is not the adapter it held (use ``flexlora_held``, which adds the frozen rest back).

    Example:
        >>> FlexLoRA().weights, FlexLoRA(svd="randomized").svd
        ('data', 'randomized')
    """

    name: ClassVar[str] = "flexlora"
    weights: ClassVar[str] = "data"

    def __init__(self, svd: str = "auto", oversample: int = 16, power_iters: int = 2, seed: int = 0) -> None:
        if svd not in SVD_MODES:
            raise AggregationError(f"FlexLoRA: unknown svd mode {svd!r}; choose one of {list(SVD_MODES)}")
        if not is_int(oversample) or oversample < 0 or not is_int(power_iters) or power_iters < 0:
            raise AggregationError(
                f"FlexLoRA: oversample and power_iters must be ints >= 0, got {oversample!r}, {power_iters!r}"
            )
        self.svd, self.oversample, self.power_iters, self.seed = svd, int(oversample), int(power_iters), int(seed)

    def accumulator(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int) -> FactorStack:
        return FactorStack("", a_shape, b_shape, r_max, svd=self.svd, oversample=self.oversample,
                           power_iters=self.power_iters, seed=self.seed)


class FlexLoRAHeld(FlexLoRA):
    """FlexLoRA over the adapters the clients *held*: a client's product counts the previous global's components it
    did not upload (its frozen rest) beside the ones it trained, so nothing it did not train is erased.

    ``W = sum_k n_k (sum_{i} B_k[:, i] A_k[i] + sum_{j not in I_k} B_prev[:, j] A_prev[j]) / sum_k n_k``, then the
    top ``r_max`` singular triplets as in :class:`FlexLoRA` (``I_k``: the global components client ``k`` uploaded,
    its window or ``0 .. r_k-1``; ``n_k`` capped like every data-weighted method). Equivalently
    ``W = W_prev + sum_k p_k (W_k - W_prev)`` restricted to what each client trained: FedAvg's step in product
    space. Without a previous global it is :class:`FlexLoRA`.

    Why: FlexLoRA (Bai et al., arXiv 2402.11505) averages each client's product ``B_k A_k``; a rank-``r_k`` product
    has nothing in the global's directions ``r_k+1 .. r_max``, so every weak client in a round shrinks them by its
    weight, the erasure HetLoRA's zero-padding (arXiv 2401.06432) suffers per component. With window clients
    (``component_selection="rolling"`` / ``"coverage"``, and ``anchor=r_max`` for "train the top ``r_k`` singular
    directions, hold the rest"), a weak client holds the whole global with the rest frozen, as in Fed-PLoRA
    (arXiv 2602.16936) and FedRolex (arXiv 2212.01548), and its held product is exactly what this sums. With prefix
    clients that hold only ``r_k`` components the server adds the rest back although the client trained without
    it (a cheaper, approximate form that needs nothing from the client).

    Example:
        >>> FlexLoRAHeld().accepts_components, FlexLoRAHeld().uses_previous
        (True, True)
    """

    name: ClassVar[str] = "flexlora_held"
    uses_previous: ClassVar[bool] = True
    accepts_components: ClassVar[bool] = True
    accepts_core: ClassVar[bool] = True

    def accumulator(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int) -> FactorStack:
        return FactorStack("", a_shape, b_shape, r_max, svd=self.svd, oversample=self.oversample,
                           power_iters=self.power_iters, seed=self.seed, held=True)


class FactorStack:
    """FlexLoRA's running data-weighted sum ``sum_k w_k B_k A_k`` of one module, kept as stacked factors.

    While the stack is small (``svd="auto"``: ``sum_k r_k <= min(d_out, d_in)`` and its float32 blocks no larger
    than the sketch, :attr:`fold_at` components), ``B_cat = [w_1 B_1 | w_2 B_2 | ...]``
    and ``A_cat = [A_1; A_2; ...]``, kept as float32 blocks of the unweighted
    ``B_k`` with a float64 weight per column, and multiplied out in float64 only for the QRs and the SVD, so finite
    float32 uploads never overflow there (``w_k B_k`` can exceed float32's range). When the stack exceeds ``limit``
    components it is recompressed exactly (two QRs and a small SVD, all singular triplets kept; the block is stored
    divided by the weight so far, which keeps it within the clients' own norms), so it never holds more than
    ``limit + r_k`` components. ``result`` takes the top ``r_max`` triplets exactly or with the randomised
    range finder (``svd``, see :class:`FlexLoRA`). With ``held`` (:class:`FlexLoRAHeld`) ``missing[j]`` is the weight
    of the clients that did not upload component ``j``; ``result`` stacks the previous global's component ``j`` at
    that weight. Above the switch (:meth:`uses_sketch`) the stack is folded into a :class:`~.sketch.TwoSidedSketch`
    (exactly: both sketches are linear in ``W``) and dropped; later clients go into the sketch only. ``add`` takes
    the client's ``||B A||_F^2`` (``sq_norm``, :attr:`takes_sq_norm`) from the aggregator, which computes it once
    per client for its checks, so the sketch's norm ball does not recompute it.
    """

    takes_sq_norm: ClassVar[bool] = True
    """``add`` accepts ``sq_norm=`` (the aggregator passes each client's ``||B A||_F^2``)."""

    def __init__(self, name: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int, *,
                 svd: str = "auto", oversample: int = 16, power_iters: int = 2, seed: int = 0,
                 held: bool = False) -> None:
        self.name = name
        self.held = held
        self.missing = np.zeros(r_max, dtype=np.float64)
        self.svd, self.oversample, self.power_iters, self.seed = svd, oversample, power_iters, seed
        self.a_shape = a_shape
        self.b_shape = b_shape
        self.r_max = r_max
        self.d_in = math.prod(a_shape[1:])
        self.d_out = b_shape[0]
        self.limit = max(2 * min(self.d_in, self.d_out), r_max)
        sizes = self.sketch_sizes()
        # "auto" folds the stack into the sketch once its float32 blocks (4 (d_out + d_in) bytes a component) hold
        # more than the sketch would (sketch_bytes / 4 (d_out + d_in) components); None: no sketch smaller than
        # the matrix
        self.fold_at = None if sizes is None else sketch_bytes(self.d_out, self.d_in, *sizes) // (
            4 * (self.d_out + self.d_in))
        # after the fold the stack is a buffer: clients' components wait there and go into the sketch flush_at at a
        # time (one pass over the sketch's float64 state per flush, not per client: ~1.4x cheaper); never more
        # than the stack held before the fold
        self.flush_at = max(r_max, FLUSH_COMPONENTS if self.fold_at is None else min(FLUSH_COMPONENTS, self.fold_at))
        self.b_blocks: list[torch.Tensor] = []
        self.w_blocks: list[torch.Tensor] = []  # float64 column weights of each B block
        self.a_blocks: list[torch.Tensor] = []
        self.stacked_rank = 0
        self.norm_pending = 0.0  # sum_k w_k ||B_k A_k||_F of the stacked clients (the sketch's norm ball)
        self.added_rank = 0  # every component added at the current level (the stack's and the sketch's)
        self.sketch: TwoSidedSketch | None = None
        self.level = NONE
        self.den = 0.0

    def add(self, client_id: str, a: torch.Tensor, b: torch.Tensor, level: int, weight: float,
            components: tuple[int, ...] | None = None, sq_norm: float | None = None) -> None:
        if level < self.level:
            return
        if level > self.level:
            self.b_blocks, self.w_blocks, self.a_blocks, self.stacked_rank, self.den = [], [], [], 0, 0.0
            self.added_rank, self.norm_pending = 0, 0.0
            if self.sketch is not None:
                self.sketch.reset()
            self.missing[:] = 0.0
            self.level = level
        self.den += weight
        if self.held:
            # the product is index-free; the indices only say which previous components the client held frozen
            uploaded = range(a.shape[0]) if components is None else components[: a.shape[0]]
            rest = np.ones(self.r_max, dtype=bool)
            rest[list(uploaded)] = False
            self.missing[rest] += weight
        self.added_rank += a.shape[0]
        b_flat, a_flat = flat_b(self.name, b), flat_a(a)
        if sq_norm is None:
            norm = product_norm(b_flat.to(torch.float64), a_flat.to(torch.float64))
        else:
            norm = math.sqrt(max(sq_norm, 0.0))
        self.norm_pending += float(weight) * norm
        self.b_blocks.append(b_flat.to(torch.float32, copy=True))
        self.w_blocks.append(torch.full((a.shape[0],), float(weight), dtype=torch.float64))
        self.a_blocks.append(a_flat.to(torch.float32, copy=True))
        self.stacked_rank += a.shape[0]
        if self.sketch is not None:
            if self.stacked_rank >= self.flush_at:
                self._flush()
            return
        if self.uses_sketch():
            self._fold_into_sketch()
        elif self.stacked_rank > self.limit:
            b_fac, a_fac = self._svd_factors(keep=None)
            k = a_fac.shape[0]
            self.b_blocks = [(b_fac / self.den).to(torch.float32)]
            self.w_blocks = [torch.full((k,), self.den, dtype=torch.float64)]
            self.a_blocks, self.stacked_rank = [a_fac.to(torch.float32)], k

    def sketch_sizes(self) -> tuple[int, int] | None:
        """``(l, m)`` of this module's sketch, or ``None`` when the sketch would not be smaller than the matrix."""
        return sketch_sizes(self.r_max, self.d_out, self.d_in)

    def uses_sketch(self) -> bool:
        """Whether the running sum is (or, after the current stack, must become) a sketch.

        ``"sketch"``: always, where the sketch is smaller than the matrix; ``"auto"``: once the stack exceeds
        ``min(d_out, d_in)`` components (where the result would leave the exact path, :meth:`uses_randomized`) or
        :attr:`fold_at` components (where the stack would hold more memory than the sketch), whichever comes first.

        Example:
            >>> stack = FactorStack("m", (16, 8192), (2048, 16), 16)
            >>> stack.fold_at, min(stack.d_out, stack.d_in)  # Llama-3.2-1B's down_proj at r_max 16
            (160, 2048)
        """
        if self.sketch is not None:
            return True
        if self.svd == "sketch":
            return self.sketch_sizes() is not None
        if self.svd != "auto" or self.fold_at is None:
            return False
        small = min(self.d_out, self.d_in)
        return self.stacked_rank > min(small, self.fold_at) and 4 * (self.r_max + self.oversample) <= small

    def _fold_into_sketch(self) -> None:
        """Move the stack into a fresh sketch (the same sum: ``Y`` and ``X`` are linear in it), :attr:`flush_at`
        components at a time, dropping each block as it goes in (the stack and the sketch never both whole)."""
        self.sketch = TwoSidedSketch(self.d_out, self.d_in, self.r_max, self.seed)
        self._flush()
        release_freed_memory()

    def _flush(self) -> None:
        """Add the stacked components to the sketch in chunks of about :attr:`flush_at`; the stack is empty after."""
        assert self.sketch is not None
        self.b_blocks.reverse()
        self.w_blocks.reverse()
        self.a_blocks.reverse()
        while self.b_blocks:
            chunk_b, chunk_w, chunk_a, size = [], [], [], 0
            while self.b_blocks and (not size or size + self.a_blocks[-1].shape[0] <= self.flush_at):
                chunk_b.append(self.b_blocks.pop())
                chunk_w.append(self.w_blocks.pop())
                chunk_a.append(self.a_blocks.pop())
                size += chunk_a[-1].shape[0]
            b_cat = chunk_b[0] if len(chunk_b) == 1 else torch.cat(chunk_b, dim=1)
            a_cat = chunk_a[0] if len(chunk_a) == 1 else torch.cat(chunk_a, dim=0)
            del chunk_b, chunk_a
            self.sketch.add_terms(b_cat, torch.cat(chunk_w), a_cat, 0.0)
            del b_cat, a_cat
        self.sketch.norm_sum += self.norm_pending
        self.norm_pending, self.stacked_rank = 0.0, 0

    def state_bytes(self) -> int:
        """Bytes of the tensors the accumulator holds (the stack's blocks, or the sketch), for the memory check.

        Example:
            >>> FactorStack("m", (4, 300), (200, 4), 4, svd="sketch").state_bytes() > 0
            True
        """
        held = sum(t.numel() * t.element_size() for t in (*self.b_blocks, *self.w_blocks, *self.a_blocks))
        return held + self.missing.nbytes + (0 if self.sketch is None else self.sketch.nbytes())

    def describe(self) -> dict[str, object]:
        """Which path the result takes and its sizes (for the round's ``summary.json``).

        Example:
            >>> FactorStack("m", (4, 300), (200, 4), 4).describe()
            {'path': 'exact', 'components': 0}
        """
        if self.sketch is not None:
            return {"path": "sketch", "components": self.added_rank, "range_size": self.sketch.range_size,
                    "corange_size": self.sketch.corange_size}
        path = "randomized" if self.uses_randomized() else "exact"
        return {"path": path, "components": self.added_rank}

    def _held_rest(self, previous: tuple[torch.Tensor, torch.Tensor] | None
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The previous global's components at their ``missing`` weights, ``(B_prev[:, J] diag(w), A_prev[J])``."""
        if not self.held or previous is None:
            return None
        idx = np.nonzero(self.missing)[0]
        if not idx.size:
            return None
        prev_a, prev_b = previous
        rows = torch.from_numpy(idx)
        scale = torch.from_numpy(self.missing[idx])
        return flat_b(self.name, prev_b).to(torch.float64)[:, rows] * scale, flat_a(prev_a).to(torch.float64)[rows]

    def _stacked(self, previous: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 ``(B_cat, A_cat)``, weights applied; with ``held`` and a previous global, its components at their
        ``missing`` weights."""
        b_blocks = [blk.to(torch.float64) * w for blk, w in zip(self.b_blocks, self.w_blocks)]
        a_blocks = [blk.to(torch.float64) for blk in self.a_blocks]
        rest = self._held_rest(previous)
        if rest is not None:
            b_blocks.append(rest[0])
            a_blocks.append(rest[1])
        b_cat = b_blocks[0] if len(b_blocks) == 1 else torch.cat(b_blocks, dim=1)  # (d_out, R)
        a_cat = a_blocks[0] if len(a_blocks) == 1 else torch.cat(a_blocks, dim=0)  # (R, d_in)
        return b_cat, a_cat

    def _svd_factors(self, keep: int | None, previous: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U S, V^T)`` of the stacked sum (top ``keep`` triplets, all if None), from QRs of the stacked factors."""
        b_cat, a_cat = self._stacked(previous)
        stacked = b_cat.shape[1]
        # Householder QRs kept in factored form (geqrf): B_cat = Q_B R_B, A_cat^T = Q_A R_A, Q never formed.
        h_b, tau_b = torch.geqrf(b_cat)
        h_a, tau_a = torch.geqrf(a_cat.T.contiguous())
        p, q = min(self.d_out, stacked), min(self.d_in, stacked)
        r_b = torch.triu(h_b[:p])  # (p, R)
        r_a = torch.triu(h_a[:q])  # (q, R)
        # B_cat A_cat = Q_B (R_B R_A^T) Q_A^T: only this small (p x q) matrix needs an SVD.
        u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
        k = s.shape[0] if keep is None else min(keep, s.shape[0])
        left = torch.zeros((self.d_out, k), dtype=torch.float64)
        left[:p] = u[:, :k] * s[:k]
        right = torch.zeros((self.d_in, k), dtype=torch.float64)
        right[:q] = vh[:k].T
        new_b = torch.ormqr(h_b, tau_b, left)  # Q_B U S   (d_out, k)
        new_a = torch.ormqr(h_a, tau_a, right).T.contiguous()  # (Q_A V)^T   (k, d_in)
        return new_b, new_a

    def uses_randomized(self, extra: int = 0) -> bool:
        """Whether :meth:`result` takes the randomised path for the current stack (plus ``extra`` components)."""
        if self.sketch is not None:
            return True
        if self.svd != "auto":
            return self.svd == "randomized"
        small = min(self.d_out, self.d_in)
        return self.stacked_rank + extra > small and 4 * (self.r_max + self.oversample) <= small

    def _randomized_factors(self, keep: int, previous: tuple[torch.Tensor, torch.Tensor] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``keep`` triplets ``(U S, V^T)`` of ``M = B_cat A_cat`` by a randomised range finder.

        Halko, Martinsson and Tropp 2011 (arXiv 0909.4061), Algorithms 4.4 (power iterations, re-orthonormalised
        after every product) and 5.1 (direct SVD of ``Q^T M``). ``M`` is only ever applied through its factors,
        ``O(R (d_out + d_in) l)`` per product for a sketch of ``l = keep + oversample`` columns.
        """
        b_cat, a_cat = self._stacked(previous)
        width = min(keep + self.oversample, self.d_out, self.d_in)
        gen = torch.Generator().manual_seed(self.seed)
        omega = torch.randn((self.d_in, width), generator=gen, dtype=torch.float32).to(torch.float64)
        q, _ = torch.linalg.qr(b_cat @ (a_cat @ omega))  # (d_out, l): the range of M, sketched
        for _ in range(self.power_iters):
            z, _ = torch.linalg.qr(a_cat.T @ (b_cat.T @ q))  # (d_in, l): range of M^T
            q, _ = torch.linalg.qr(b_cat @ (a_cat @ z))
        small = (q.T @ b_cat) @ a_cat  # Q^T M, (l, d_in)
        u, s, vh = torch.linalg.svd(small, full_matrices=False)
        k = min(keep, s.shape[0])
        return q @ (u[:, :k] * s[:k]), vh[:k].contiguous()

    def result(self, previous: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        prev = previous if self.held else None
        extra = int(np.count_nonzero(self.missing)) if prev is not None else 0
        if self.sketch is not None:
            self._flush()
            b_fac, a_fac = self.sketch.factors(self.r_max, self._held_rest(prev))
        elif self.uses_randomized(extra):
            b_fac, a_fac = self._randomized_factors(keep=self.r_max, previous=prev)
        else:
            b_fac, a_fac = self._svd_factors(keep=self.r_max, previous=prev)
        b_fac = b_fac / self.den
        got = a_fac.shape[0]
        a = torch.zeros((self.r_max, self.d_in), dtype=torch.float32)
        b = torch.zeros((self.d_out, self.r_max), dtype=torch.float32)
        a[:got] = a_fac
        b[:, :got] = b_fac
        return a.reshape(self.r_max, *self.a_shape[1:]), b.reshape(self.d_out, self.r_max, *self.b_shape[2:])

    def untruncated(self, previous: tuple[torch.Tensor, torch.Tensor] | None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Float64 factors ``(B, A)`` of the whole weighted sum ``sum_k w_k B_k A_k / sum_k w_k`` (held rest
        included), before the truncation to ``r_max``; None once the sum is a sketch (only its top part is known).
        The server step (`round.server_step`) takes its pseudo-gradient from it. Changes nothing.

        Example:
            >>> import torch
            >>> stack = FactorStack("m", (2, 5), (4, 2), 2)
            >>> stack.add("a", torch.ones(2, 5), torch.ones(4, 2), 1, 3.0)
            >>> b, a = stack.untruncated(None)
            >>> bool(torch.allclose(b @ a, torch.full((4, 5), 2.0, dtype=torch.float64)))
            True
        """
        if self.sketch is not None or not self.b_blocks:
            return None
        b_cat, a_cat = self._stacked(previous if self.held else None)
        return b_cat / self.den, a_cat

    def level_used(self) -> int | None:
        return None if self.level == NONE else self.level

    def clone(self) -> FactorStack:
        copy = FactorStack(self.name, self.a_shape, self.b_shape, self.r_max, svd=self.svd,
                           oversample=self.oversample, power_iters=self.power_iters, seed=self.seed, held=self.held)
        copy.missing = self.missing.copy()
        copy.b_blocks, copy.w_blocks, copy.a_blocks = list(self.b_blocks), list(self.w_blocks), list(self.a_blocks)
        copy.stacked_rank, copy.level, copy.den = self.stacked_rank, self.level, self.den
        copy.added_rank, copy.norm_pending = self.added_rank, self.norm_pending
        copy.sketch = None if self.sketch is None else self.sketch.clone()
        return copy
