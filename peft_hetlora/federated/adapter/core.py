"""Core clients: a small square core trained inside the global adapter's subspace (docs/methods.md#core-clients).

The round's global module, written in SVD form ``s B_g A_g = U diag(S) V^T`` (``U``: ``d_out x R`` orthonormal
columns, ``V^T``: ``R x d_in`` orthonormal rows), gives a client of rank ``k < r_max`` a *core rank* ``r_c``
(`core_rank`, the budget rule) and the frozen bases ``U_c = U[:, :r_c]``, ``V_c = V[:, :r_c]``. The client trains
only the ``r_c x r_c`` core ``C`` of

```text
delta W = s U_c C V_c^T            C_0 = diag(S_c) / s        dL/dC = s U_c^T G V_c       (G = dL/d delta W)
```

so it starts exactly at the global truncated to ``r_c`` and its update spans all ``r_c x r_c`` directions of that
subspace, even at round 0 where ``B_g = 0``. It uploads ``C`` only (``r_c^2`` numbers per module, key suffix
:data:`CORE_SUFFIX`); the server rebuilds the same bases from the global it published and expands the core into
held factors (`held_factors`) of rank ``r_c``.

Where ``S`` is (numerically) zero, e.g. round 0, the bases are completed deterministically: ``V`` from the global's
own ``A`` rows (orthonormalised, so ``A_g`` keeps its row space), then ``U`` (and ``V`` if still short) from a
Gaussian draw seeded by `core_seed` (a hash of the module name and the published tensors' bytes), so client and
server build exactly the same bases from the same published file. Signs are canonical (the largest entry of each
``V`` column is positive), so two LAPACK builds agree.

The idea is LoRA-XS (Balazy et al., arXiv 2405.17604: a trainable ``r x r`` matrix between frozen SVD factors of
the weights), in federated form Fed-SB (Singhal et al., arXiv 2502.15436: only the ``r x r`` core is trained and
communicated) and FedSVD (Lee et al., arXiv 2505.12805: the server re-factorises by SVD each round, so the frozen
bases follow the global). Mixing core clients with factor clients in one round, merged in product space by
``flexlora_held``, is this project's own.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> a_g, b_g = torch.randn(8, 32, generator=g), torch.randn(24, 8, generator=g)
    >>> bases = core_bases(a_g, b_g, 4, seed=core_seed("m", a_g, b_g), scaling=2.0)
    >>> a, b = expand_core(bases.initial_core(), bases)
    >>> a.shape, b.shape
    (torch.Size([4, 32]), torch.Size([24, 4]))
    >>> u, s, vh = torch.linalg.svd(2.0 * b_g.double() @ a_g.double())  # the global truncated to rank 4
    >>> top = (u[:, :4] * s[:4]) @ vh[:4]
    >>> bool(torch.allclose(2.0 * b.double() @ a.double(), top, atol=1e-4))
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

__all__ = [
    "CORE_SUFFIX",
    "CoreBases",
    "core_bases",
    "core_budget",
    "core_rank",
    "core_seed",
    "expand_core",
    "held_factors",
]

#: The key suffix of a core upload: ``<module>.lora_core.weight`` (``r_c x r_c``), beside PEFT's ``.lora_A.weight``.
CORE_SUFFIX = ".lora_core.weight"

# S_j counts as zero below this fraction of S_0 (float32 uploads carry ~1e-7 relative noise)
_ZERO_TOL = 1e-6
# the global's own A is kept in the held factors when its prefix is this well inside span(V_c) ...
_SPAN_TOL = 1e-6
# ... and the change of basis is no worse conditioned than this
_MAX_COND = 1e6


@dataclass(frozen=True)
class CoreBases:
    """The frozen bases of one module's core: ``u`` (``d_out x r_c``), ``v`` (``d_in x r_c``), float64, orthonormal
    columns; ``sigma``: the global's singular values of ``s B_g A_g`` along them (0 where completed); ``scaling``: s.

    Example:
        >>> import torch
        >>> bases = core_bases(torch.ones(2, 4), torch.zeros(3, 2), 2, seed=0, scaling=1.0)
        >>> bases.rank, bases.sigma.tolist()
        (2, [0.0, 0.0])
    """

    u: torch.Tensor
    v: torch.Tensor
    sigma: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        """``r_c``."""
        return int(self.u.shape[1])

    def initial_core(self) -> torch.Tensor:
        """``C_0 = diag(S_c) / s`` (float32): the core at which ``s U_c C V_c^T`` is the global truncated to ``r_c``.

        Example:
            >>> import torch
            >>> b = core_bases(torch.eye(2, 4), 3.0 * torch.eye(3, 2), 2, seed=0, scaling=2.0)
            >>> b.initial_core().tolist()
            [[3.0, 0.0], [0.0, 3.0]]
        """
        return (torch.diag(self.sigma) / self.scaling).to(torch.float32)


def core_seed(module: str, a_g: torch.Tensor, b_g: torch.Tensor) -> int:
    """The seed of one module's basis completion: sha256 of its name and the published float32 factors' bytes.

    Client and server hash the same published tensors, so they draw the same completion; another round's (or
    federation's) global gives another seed.

    Example:
        >>> import torch
        >>> core_seed("m", torch.ones(2, 3), torch.zeros(4, 2)) == core_seed("m", torch.ones(2, 3), torch.zeros(4, 2))
        True
        >>> core_seed("m", torch.ones(2, 3), torch.zeros(4, 2)) == core_seed("n", torch.ones(2, 3), torch.zeros(4, 2))
        False
    """
    digest = hashlib.sha256(module.encode())
    for tensor in (a_g, b_g):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    """Q of a QR of ``x`` with a positive diagonal of R (a unique, deterministic orthonormal basis of its columns)."""
    q, r = torch.linalg.qr(x)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def _complete(basis: torch.Tensor, candidates: torch.Tensor, need: int) -> torch.Tensor:
    """Add ``need`` orthonormal columns to ``basis`` taken from ``candidates`` (in order), projected off the basis."""
    if need <= 0:
        return basis
    rest = candidates - basis @ (basis.T @ candidates) if basis.shape[1] else candidates
    rest = rest - basis @ (basis.T @ rest) if basis.shape[1] else rest  # twice is enough (Kahan)
    new = _orthonormal(rest)[:, :need]
    return torch.cat([basis, new], dim=1)


def core_bases(a_g: torch.Tensor, b_g: torch.Tensor, r_c: int, seed: int, scaling: float) -> CoreBases:
    """The frozen bases of a rank-``r_c`` core inside one module's global ``s B_g A_g``.

    ``a_g`` (``R x d_in``) and ``b_g`` (``d_out x R``) are the module's published global factors; the SVD of their
    product is computed from two QRs and an ``R x R`` SVD in float64 on the CPU (no ``d_out x d_in`` matrix). The
    first ``min(r_c, #S>0)`` columns are the top singular vectors; the rest complete them deterministically (module
    docstring). Deterministic: the same inputs give bitwise the same bases.

    Raises:
        ValueError: ``r_c`` not in ``[1, min(d_in, d_out)]`` or factors that do not pair up.

    Example:
        >>> import torch
        >>> bases = core_bases(torch.randn(4, 16), torch.zeros(12, 4), 3, seed=7, scaling=1.0)
        >>> eye = torch.eye(3, dtype=torch.float64)
        >>> bool(torch.allclose(bases.u.T @ bases.u, eye)), bool(torch.allclose(bases.v.T @ bases.v, eye))
        (True, True)
    """
    if a_g.dim() != 2 or b_g.dim() != 2 or a_g.shape[0] != b_g.shape[1]:
        raise ValueError(f"core_bases: A {tuple(a_g.shape)} and B {tuple(b_g.shape)} are not (R, d_in), (d_out, R).")
    d_in, d_out = int(a_g.shape[1]), int(b_g.shape[0])
    if isinstance(r_c, bool) or not isinstance(r_c, int) or not 1 <= r_c <= min(d_in, d_out):
        raise ValueError(f"core_bases: r_c must be an integer in [1, {min(d_in, d_out)}], got {r_c!r}.")
    a = a_g.detach().to("cpu", torch.float64)
    b = b_g.detach().to("cpu", torch.float64)
    big = a.shape[0]
    if big:
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        um, sv, vmh = torch.linalg.svd(float(scaling) * rb @ ra.T)
        u_all, v_all = qb @ um, qa @ vmh.T
        positive = int((sv > _ZERO_TOL * sv[0]).sum()) if float(sv[0]) > 0 else 0
    else:
        u_all, v_all = b.new_zeros((d_out, 0)), a.new_zeros((d_in, 0))
        sv, positive = a.new_zeros(0), 0
    keep = min(positive, r_c)
    u, v = u_all[:, :keep].clone(), v_all[:, :keep].clone()
    for j in range(keep):  # canonical signs: the largest |entry| of each V column is positive
        if v[int(torch.argmax(v[:, j].abs())), j] < 0:
            u[:, j], v[:, j] = -u[:, j], -v[:, j]
    sigma = torch.zeros(r_c, dtype=torch.float64)
    sigma[:keep] = sv[:keep]
    generator = torch.Generator().manual_seed(int(seed))
    # V: the global's own A rows first (round 0: A_g is LoRA's random init and B_g = 0), then Gaussian columns
    if v.shape[1] < r_c:
        v = _complete(v, torch.cat([a[keep:].T, torch.randn(d_in, r_c, generator=generator, dtype=torch.float64)],
                                   dim=1), r_c - v.shape[1])
    if u.shape[1] < r_c:
        u = _complete(u, torch.randn(d_out, r_c, generator=generator, dtype=torch.float64), r_c - u.shape[1])
    return CoreBases(u.contiguous(), v.contiguous(), sigma, float(scaling))


def expand_core(core: torch.Tensor, bases: CoreBases) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B) = (V_c^T, U_c C)`` in float32: the factors of ``delta W = s U_c C V_c^T`` (rank ``r_c``).

    Example:
        >>> import torch
        >>> bases = core_bases(torch.randn(3, 8), torch.randn(6, 3), 2, seed=0, scaling=1.0)
        >>> a, b = expand_core(torch.eye(2), bases)
        >>> bool(torch.allclose((b @ a).double(), bases.u @ bases.v.T, atol=1e-6))
        True
    """
    c = _checked_core(core, bases)
    return bases.v.T.to(torch.float32).contiguous(), (bases.u @ c).to(torch.float32).contiguous()


def held_factors(core: torch.Tensor, bases: CoreBases, a_global: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The held factors ``(A_k, B_k)`` the server aggregates for one core upload: ``s B_k A_k = s U_c C V_c^T``.

    When the global's first ``r_c`` rows ``a_global[:r_c]`` lie in ``span(V_c^T)`` (always after round 0 of an
    SVD-ordered global, and at round 0 by construction) the factors keep them, ``A_k = a_global[:r_c]`` and
    ``B_k = U_c C T^{-1}`` with ``T = a_global[:r_c] V_c``, so a factor-wise influence bound sees the client's real
    step (in ``B``) and no change of basis in ``A``; otherwise they are `expand_core`'s. The product is the same.

    Example:
        >>> import torch
        >>> a_g, b_g = torch.randn(4, 10), torch.zeros(8, 4)
        >>> bases = core_bases(a_g, b_g, 3, seed=1, scaling=1.0)
        >>> c = torch.randn(3, 3)
        >>> a, b = held_factors(c, bases, a_g)
        >>> bool(torch.equal(a, a_g[:3])), bool(torch.allclose((b @ a).double(), bases.u @ c.double() @ bases.v.T,
        ...                                                    atol=1e-5))
        (True, True)
    """
    c = _checked_core(core, bases)
    r_c = bases.rank
    if a_global is not None and a_global.dim() == 2 and a_global.shape[0] >= r_c \
            and a_global.shape[1] == bases.v.shape[0]:
        prefix = a_global[:r_c].detach().to("cpu", torch.float64)
        t = prefix @ bases.v
        residual = torch.linalg.matrix_norm(prefix - t @ bases.v.T)
        scale = torch.linalg.matrix_norm(prefix)
        if float(scale) > 0 and float(residual) <= _SPAN_TOL * float(scale) \
                and float(torch.linalg.cond(t)) <= _MAX_COND:
            b = bases.u @ torch.linalg.solve(t.T, c.T).T  # U_c C T^{-1}
            return a_global[:r_c].detach().to("cpu", torch.float32).clone(), b.to(torch.float32).contiguous()
    return expand_core(core, bases)


def _checked_core(core: torch.Tensor, bases: CoreBases) -> torch.Tensor:
    r_c = bases.rank
    if core.dim() != 2 or tuple(core.shape) != (r_c, r_c):
        raise ValueError(f"the core must be ({r_c}, {r_c}) for these bases, got {tuple(core.shape)}.")
    return core.detach().to("cpu", torch.float64)


def core_budget(r_c: int, d_in: int, d_out: int) -> dict[str, int]:
    """Per-module float counts of a rank-``r_c`` core client: frozen bases, core, gradient, Adam state, upload.

    ``params``: ``r_c (d_in + d_out)`` frozen + ``r_c^2`` trainable; ``optimizer``: ``2 r_c^2`` (Adam's two
    moments); ``grad``: ``r_c^2``; ``memory``: their sum; ``activations``: ``r_c`` per token (the re-parametrised
    ``B = U_c C`` applied after ``V_c^T x``); ``upload``: ``r_c^2``. The same counts for LoRA(k) are
    ``core_budget``'s ``lora`` twin in docs/methods.md: ``memory = 4 k (d_in + d_out)``, ``activations = k``,
    ``upload = k (d_in + d_out)``.

    Example:
        >>> core_budget(8, 576, 576)["memory"], 4 * 2 * (576 + 576)
        (9472, 9216)
    """
    width = d_in + d_out
    return {"params": r_c * width + r_c * r_c, "grad": r_c * r_c, "optimizer": 2 * r_c * r_c,
            "memory": r_c * width + 4 * r_c * r_c, "activations": r_c, "upload": r_c * r_c}


def core_rank(k: int, r_max: int, dims: Iterable[tuple[int, int]] | Mapping[str, tuple[int, int]], *,
              tokens: int = 0) -> int:
    """The budget rule: the largest ``r_c <= r_max`` whose core fits a rank-``k`` LoRA client on every module.

    For every module ``(d_in, d_out)``, with ``w = d_in + d_out`` and ``T = tokens`` (fp32 counts, per module):

    ```text
    memory:  r_c w + 4 r_c^2 + r_c T  <=  4 k w + k T   (frozen bases + core + gradient + Adam's two moments
                                                         + the adapter branch's activations, vs LoRA(k)'s)
    upload:  r_c^2                    <=  k w
    ```

    With ``tokens=0`` (the coordinator's plan) activations are left out; a client passes the tokens of its
    micro-batch (``FederatedClientCallback(core_tokens=...)``) to count them and may then train a smaller core.
    ``r_c >= k`` always holds for ``k <= 3 w / 4`` (a core of rank ``k`` costs less than LoRA(k)); a client with
    ``k >= r_max`` trains factors (the rule returns ``r_max``).

    Example:
        >>> core_rank(2, 16, [(576, 576), (576, 192)]), core_rank(6, 16, [(576, 576)]), core_rank(16, 16, [(8, 8)])
        (7, 16, 16)
        >>> core_rank(2, 16, [(576, 576)], tokens=512)  # 6 x 1152 + 144 + 6 x 512 = 10128 <= 9216 + 1024
        6
    """
    items = list(dims.values()) if isinstance(dims, Mapping) else list(dims)
    if not items:
        raise ValueError("core_rank needs the (d_in, d_out) of at least one module.")
    if k >= r_max:
        return int(r_max)
    best = 0
    for r in range(1, int(r_max) + 1):
        fits = all(r * (di + do) + 4 * r * r + r * tokens <= 4 * k * (di + do) + k * tokens
                   and r * r <= k * (di + do)
                   and r <= min(di, do) for di, do in items)
        if fits:
            best = r
    return max(best, 1)
