"""A one-pass two-sided sketch of a sum of low-rank products, with memory flat in the number of terms.

Tropp, Yurtsever, Udell and Cevher, "Practical sketching algorithms for low-rank matrix approximation", SIAM J.
Matrix Anal. Appl. 38(4), 2017 (arXiv 1609.00048): the simplest reconstruction and its fixed-rank truncation
(their ``k``, ``l`` are :attr:`TwoSidedSketch.range_size` and :attr:`TwoSidedSketch.corange_size` here).
``W = sum_k w_k B_k A_k`` is seen only through two linear images, accumulated exactly per term: ``Y = W Omega``
(``d_out x l``) and ``X = Psi W`` (``m x d_in``), ``Omega`` and ``Psi`` standard Gaussian, regenerated from a
seed. The reconstruction is ``W_hat = Q (Psi Q)^+ X`` with ``Q = orth(Y)``; its top ``r`` triplets are the
published factors. With ``l = 2r + 1`` and ``m = 2l + 1`` (Theorem 4.3 of the paper, with ``rho = r``):
``E ||W - W_hat||_F^2 <= 4 tau_{r+1}^2(W)``, ``tau_j^2 = sum_{i >= j} sigma_i^2``, and ``W_hat = W`` (so the top
``r`` triplets are exact) whenever ``rank(W) <= l``. docs/aggregation.md proves both.
"""

from __future__ import annotations

import hashlib
import math

import torch

CHUNK = 2048
"""Rows of ``Omega`` / columns of ``Psi`` converted to float64 at a time for a product (at most ~1 MB)."""

__all__ = ["TwoSidedSketch", "product_norm", "sketch_bytes", "sketch_seed", "sketch_sizes"]


def sketch_sizes(rank: int, d_out: int, d_in: int) -> tuple[int, int] | None:
    """``(l, m) = (2 rank + 1, 2 l + 1)``, or ``None`` when the sketch would not be smaller than the matrix.

    Example:
        >>> sketch_sizes(16, 2048, 8192), sketch_sizes(16, 40, 40)
        ((33, 67), None)
    """
    range_size = 2 * rank + 1
    corange_size = 2 * range_size + 1
    if corange_size > d_out or range_size > d_in:
        return None
    return range_size, corange_size


def sketch_bytes(d_out: int, d_in: int, range_size: int, corange_size: int) -> int:
    """Bytes of a :class:`TwoSidedSketch`'s tensors, whatever the number of terms: ``Y`` (``d_out x l``) and ``X``
    (``m x d_in``) in float64, the test matrices ``Omega`` (``d_in x l``) and ``Psi`` (``m x d_out``) in float32:
    ``8 (d_out l + m d_in) + 4 (d_in l + m d_out)``.

    Example:
        >>> sketch_bytes(2048, 8192, 33, 67)  # Llama-3.2-1B's down_proj at r_max 16: 6.6 MB
        6561792
    """
    return 8 * (d_out * range_size + corange_size * d_in) + 4 * (d_in * range_size + corange_size * d_out)


def sketch_seed(seed: int, d_out: int, d_in: int, rank: int) -> int:
    """The seed of one module's test matrices: a hash of the method's seed and the module's shape and rank.

    The same round (same seed, shapes, ``r_max``) regenerates the same ``Omega`` and ``Psi``, so a resumed round is
    bit-identical; two modules of different shapes never share a test matrix.

    Example:
        >>> sketch_seed(0, 8, 6, 2) == sketch_seed(0, 8, 6, 2) != sketch_seed(1, 8, 6, 2)
        True
    """
    digest = hashlib.sha256(f"flexlora-sketch:{seed}:{d_out}:{d_in}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def product_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """``||B A||_F`` from the ``r x r`` Gram matrices (``O(r^2 (d_out + d_in))``, no ``d_out x d_in`` product).

    Example:
        >>> b, a = torch.randn(7, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
        >>> abs(product_norm(b, a) - float(torch.linalg.norm(b @ a))) < 1e-9
        True
    """
    gram = (b.T @ b) * (a @ a.T)
    return math.sqrt(max(float(gram.sum()), 0.0))


class TwoSidedSketch:
    """The running sketch ``(Y, X)`` of ``W = sum_k w_k B_k A_k`` for one ``d_out x d_in`` module (float64).

    Memory: ``Y``, ``X``, ``Omega``, ``Psi`` = ``(d_out + d_in)(l + m)`` float64 numbers, whatever the number of
    terms; per term ``O(r_k (d_out + d_in)(l + m))`` flops. :meth:`factors` also bounds the result's norm by
    ``sum_k w_k ||B_k A_k||_F`` (accumulated exactly), a ball that contains ``W``: projecting onto it never moves the
    result away from ``W`` and keeps the global's norm bound of the exact path.

    Example:
        >>> sk = TwoSidedSketch(30, 20, rank=2, seed=0)
        >>> b, a = torch.randn(30, 2, dtype=torch.float64), torch.randn(2, 20, dtype=torch.float64)
        >>> sk.add(b, a, 0.5); sk.add(b, a, 0.5)  # W = B A, rank 2 <= l = 5: exact
        >>> new_b, new_a = sk.factors(2)
        >>> bool(torch.linalg.norm(new_b @ new_a - b @ a) <= 1e-12 * torch.linalg.norm(b @ a))
        True
    """

    def __init__(self, d_out: int, d_in: int, rank: int, seed: int) -> None:
        sizes = sketch_sizes(rank, d_out, d_in)
        if sizes is None:
            raise ValueError(f"a rank-{rank} sketch of a {d_out} x {d_in} matrix is not smaller than the matrix")
        self.d_out, self.d_in, self.rank, self.seed = d_out, d_in, rank, seed
        self.range_size, self.corange_size = sizes
        gen = torch.Generator().manual_seed(sketch_seed(seed, d_out, d_in, rank))
        # the test matrices are drawn as float32 numbers (half the memory); every product takes those numbers
        # exactly in float64
        self.omega = torch.randn((d_in, self.range_size), generator=gen, dtype=torch.float32)
        self.psi = torch.randn((self.corange_size, d_out), generator=gen, dtype=torch.float32)
        self.y = torch.zeros((d_out, self.range_size), dtype=torch.float64)
        self.x = torch.zeros((self.corange_size, d_in), dtype=torch.float64)
        self.norm_sum = 0.0

    def _images(self, b: torch.Tensor, weights: torch.Tensor, a: torch.Tensor
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """The two images of ``B diag(w) A`` as float64 factor pairs: ``B diag(w) (A Omega)`` and
        ``(Psi B) diag(w) A``, every product in float64 (``Omega`` and ``Psi`` are stored as float32 numbers and
        converted :data:`CHUNK` rows at a time, so no float64 copy of them is ever whole). Float32 products were
        measured and not kept (docs/aggregation.md: 1.1-1.2x on the sketch's time in a round, below the 1.3x that
        would pay for their rounding)."""
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        a_omega = torch.zeros((a64.shape[0], self.range_size), dtype=torch.float64)
        for start in range(0, self.d_in, CHUNK):
            a_omega.addmm_(a64[:, start:start + CHUNK], self.omega[start:start + CHUNK].to(torch.float64))
        return (b64 * weights, a_omega), (self._psi_times(b64) * weights, a64)

    def _psi_times(self, q: torch.Tensor) -> torch.Tensor:
        """``Psi Q`` in float64 (``Psi``'s float32 numbers exactly), :data:`CHUNK` columns of ``Psi`` at a time."""
        out = torch.zeros((self.corange_size, q.shape[1]), dtype=torch.float64)
        for start in range(0, self.d_out, CHUNK):
            out.addmm_(self.psi[:, start:start + CHUNK].to(torch.float64), q[start:start + CHUNK])
        return out

    def add(self, b: torch.Tensor, a: torch.Tensor, weight: float, norm: float | None = None) -> None:
        """``Y += w B (A Omega)``, ``X += w (Psi B) A`` (``b``: ``d_out x r``, ``a``: ``r x d_in``).

        ``norm``: ``||B A||_F`` if the caller already has it (the aggregator computes it once per client for its
        checks: the same float64 Gram formula as :func:`product_norm`, so the same bits); else computed here."""
        if norm is None:
            norm = product_norm(b.to(torch.float64), a.to(torch.float64))
        self.add_terms(b, torch.full((b.shape[1],), float(weight), dtype=torch.float64), a, weight * norm)

    def add_terms(self, b: torch.Tensor, weights: torch.Tensor, a: torch.Tensor, norm_sum: float) -> None:
        """Add ``B diag(w) A`` (many clients' components at once, ``w`` their float64 column weights) and
        ``norm_sum = sum_k w_k ||B_k A_k||_F`` to the norm ball. One pass over ``Y`` and ``X`` for all ``R``
        components: for a client's small rank that pass is most of the cost, so batching clients
        is cheaper (1.35x at 16).

        Example:
            >>> sk = TwoSidedSketch(30, 20, rank=2, seed=0)
            >>> b, a = torch.randn(30, 3), torch.randn(3, 20)
            >>> w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
            >>> sk.add_terms(b, w, a, 0.0)
            >>> ref = (b.double() * w) @ a.double()
            >>> ref_y, ref_x = ref @ sk.omega.double(), sk.psi.double() @ ref
            >>> float(torch.linalg.norm(sk.y - ref_y) / torch.linalg.norm(ref_y)) < 1e-14
            True
            >>> float(torch.linalg.norm(sk.x - ref_x) / torch.linalg.norm(ref_x)) < 1e-14
            True
        """
        (left_y, right_y), (left_x, right_x) = self._images(b, weights, a)
        self.y.addmm_(left_y, right_y)
        self.x.addmm_(left_x, right_x)
        self.norm_sum += norm_sum

    def reset(self) -> None:
        """Forget every term (the test matrices stay)."""
        self.y.zero_()
        self.x.zero_()
        self.norm_sum = 0.0

    def nbytes(self) -> int:
        """Bytes held by the sketch's tensors (flat in the number of terms): :func:`sketch_bytes`."""
        return sum(t.numel() * t.element_size() for t in (self.omega, self.psi, self.y, self.x))

    def clone(self) -> TwoSidedSketch:
        copy = TwoSidedSketch.__new__(TwoSidedSketch)
        copy.__dict__.update(self.__dict__)
        copy.y, copy.x = self.y.clone(), self.x.clone()
        return copy

    def factors(self, keep: int, extra: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``keep`` triplets ``(U S, V^T)`` of ``W_hat`` (float64), of ``W + B_e A_e`` with ``extra = (B_e, A_e)``.

        The state is unchanged (``extra`` goes through the same two products; only ``Y`` is copied).
        """
        y, bound, corange_extra = self.y, self.norm_sum, None
        if extra is not None:
            b_e, a_e = extra[0].to(torch.float64), extra[1].to(torch.float64)
            (left_y, right_y), corange_extra = self._images(b_e, torch.ones(b_e.shape[1], dtype=torch.float64), a_e)
            y = torch.addmm(y, left_y, right_y)
            bound += product_norm(b_e, a_e)
        q, _ = torch.linalg.qr(y)  # (d_out, l): an orthonormal basis of the sketched range
        # (Psi Q)^+ X = R^-1 Q_2^T X with Psi Q = Q_2 R (m x l, full column rank): X itself is never copied, the
        # extra's co-range image enters as the l x d_in product Q_2^T (Psi B_e) A_e
        q2, r2 = torch.linalg.qr(self._psi_times(q))
        rhs = q2.T @ self.x
        if corange_extra is not None:
            rhs.addmm_(q2.T @ corange_extra[0], corange_extra[1])
        core = torch.linalg.solve_triangular(r2, rhs, upper=True)  # (l, d_in) = (Psi Q)^+ (X + X_e)
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        k = min(keep, s.shape[0])
        s = s[:k]
        size = float(torch.linalg.norm(s))
        if size > bound:  # only in a bad draw: project onto the ball ||Z||_F <= bound, which holds W
            s = s * (bound / size)
        return q @ (u[:, :k] * s), vh[:k].contiguous()
