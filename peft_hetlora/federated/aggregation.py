"""Server-side aggregation of heterogeneous-rank LoRA adapters (HetLoRA and baselines).

Everything here works on plain ``dict[str, torch.Tensor]`` adapter state dicts in PEFT's *saved* key format
(adapter name removed)::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (r_k, d_in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   (d_out, r_k)

A *module* is the key prefix before ``.lora_A.weight`` / ``.lora_B.weight`` (PEFT's embedding keys
``.lora_embedding_A`` / ``.lora_embedding_B`` and convolution factors with a ``1 x 1`` B work too). The rank of a
module is ``A.shape[0] == B.shape[1]``; it may differ per module. All other keys are *dense extras*
(``modules_to_save``, LoRA biases, DoRA magnitudes): they are averaged with the method's client weights and never
truncated or padded.

The global adapter lives at rank ``r_max`` and every client uses the same scale ``s`` (``lora_alpha / r_max``), so
``delta W_m = s * B_m A_m``. Methods (see ``AGGREGATION_METHODS``):

``hetlora``
    zero-pad every client to ``r_max``; sparsity weights ``p_k = S_k / sum_j S_j`` with
    ``S_k = ||delta W_k||_F`` over all modules; ``A = sum_k p_k pad(A_k)``, ``B = sum_k p_k pad(B_k)``.
``zero_pad``
    the same padding with data-size weights ``n_k / N``.
``fedavg``
    homogeneous LoRA: every client at the same rank, data-size weights.
``flexlora``
    data-size weighted sum of the full updates ``B_k A_k``, then an SVD computed from the stacked low-rank factors
    (two QRs and a small SVD, never a dense ``d_out x d_in`` SVD); global ``B = U S``, ``A = V^T``, top ``r_max``
    singular triplets in order, so truncating to ``r_k`` is the best rank-``r_k`` approximation.
``rankwise``
    component ``j`` is the sparsity-weighted average over only the clients whose module rank exceeds ``j``;
    components no client covers keep their ``previous`` global value (zeros if there is none).

Aggregation streams: :class:`StreamingAggregator` keeps running sums at ``r_max`` (``flexlora``: the stacked
factors), so the server holds one ``r_max`` adapter plus the client being added, whatever the number of clients.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "AGGREGATION_METHODS",
    "WEIGHTINGS",
    "AggregationResult",
    "ClientUpdate",
    "StreamingAggregator",
    "aggregate",
    "lora_module_names",
    "pad",
    "truncate",
    "update_norm",
]

AGGREGATION_METHODS: tuple[str, ...] = ("hetlora", "zero_pad", "fedavg", "flexlora", "rankwise")
"""Names accepted by ``aggregate(method=...)`` and :class:`StreamingAggregator`."""

WEIGHTINGS: tuple[str, ...] = ("per_client", "per_module")
"""Sparsity weightings: one ``S_k`` per client over all modules (default, the paper's), or one ``S_km`` per module."""

# (A suffix, B suffix) pairs that mark the two LoRA factors of one module in PEFT's saved format.
_FACTOR_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_embedding_A", ".lora_embedding_B"),
)

# Weighting levels, best first: a client's level is the best one at which its weight is positive; the result uses
# the best level any client reached (clients below it get weight 0 there, which is exactly the formula's value).
_SPARSITY, _DATA, _UNIFORM, _NONE = 2, 1, 0, -1
_FALLBACK_NAMES = {_DATA: "data_size", _UNIFORM: "uniform"}
_SPARSITY_METHODS = ("hetlora", "rankwise")


# ----------------------------------------------------------------------------------------------------------------
# Public data structures
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ClientUpdate:
    """One client's upload for a round.

    Args:
        client_id: unique id of the client within the round.
        state_dict: the client's adapter in PEFT's saved key format, at the client's rank (``A`` is ``r_k x d_in``).
        rank: the rank the client reports (``rank_out`` of its ``client.json``); no module may exceed it.
        num_examples: local examples behind the update (the data-size weight ``n_k``); ``0`` is allowed.
        metadata: free-form extras (loss, tail norms, ...); not used by the aggregation.

    Example:
        >>> import torch
        >>> sd = {"m.lora_A.weight": torch.zeros(2, 8), "m.lora_B.weight": torch.zeros(4, 2)}
        >>> ClientUpdate("client-0", sd, rank=2, num_examples=100).rank
        2
    """

    client_id: str
    state_dict: Mapping[str, torch.Tensor]
    rank: int
    num_examples: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.client_id, str) or not self.client_id:
            raise ValueError(f"ClientUpdate.client_id must be a non-empty string, got {self.client_id!r}")
        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(f"ClientUpdate {self.client_id!r}: rank must be an int >= 1, got {self.rank!r}")
        if not _is_int(self.num_examples) or self.num_examples < 0:
            raise ValueError(
                f"ClientUpdate {self.client_id!r}: num_examples must be an int >= 0, got {self.num_examples!r}"
            )
        if not isinstance(self.state_dict, Mapping):
            raise TypeError(
                f"ClientUpdate {self.client_id!r}: state_dict must be a mapping of key -> torch.Tensor, "
                f"got {type(self.state_dict).__name__}"
            )


@dataclass
class AggregationResult:
    """The new global adapter and how it was weighted.

    Attributes:
        state_dict: the global adapter, float32 on CPU, every module at ``r_max``, in the first client's key order.
        weights: ``client_id -> p_k``, the client weights actually used (they sum to 1). For ``hetlora`` /
            ``rankwise`` these are the sparsity weights of components every client covers and of the dense
            extras; with ``weighting="per_module"`` see ``module_weights`` for the LoRA factors.
        norms: ``client_id -> S_k = ||s B A||_F`` over all modules, as uploaded (before clipping).
        clip_scales: ``client_id -> c_k``, the factor applied to the client's update ``s B A`` (1.0 = unclipped).
        ranks: ``client_id -> declared rank``.
        method: the aggregation method.
        weighting: ``"per_client"`` or ``"per_module"``.
        fallback: ``None`` when the method's own weights were used; ``"data_size"`` when every relevant norm was zero
            (e.g. all ``B`` still zero at round start) and data-size weights ``n_k / N`` were used instead;
            ``"uniform"`` when in addition every ``num_examples`` was 0.
        fallback_modules: modules whose weights fell back (per-module weighting and ``rankwise`` can fall back for
            some modules only; with per-client weighting every module falls back together).
        module_weights: ``module -> {client_id: p_km}`` for ``weighting="per_module"``, else ``None``.
        messages: human-readable notes about the round (fallbacks, clipping).

    Example:
        >>> import torch
        >>> sd = {"m.lora_A.weight": torch.ones(1, 3), "m.lora_B.weight": torch.ones(2, 1)}
        >>> res = aggregate([ClientUpdate("a", sd, 1, 10)], r_max=2)
        >>> res.weights, tuple(res.state_dict["m.lora_A.weight"].shape)
        ({'a': 1.0}, (2, 3))
    """

    state_dict: dict[str, torch.Tensor]
    weights: dict[str, float]
    norms: dict[str, float] = field(default_factory=dict)
    clip_scales: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    method: str = "hetlora"
    weighting: str = "per_client"
    fallback: str | None = None
    fallback_modules: list[str] = field(default_factory=list)
    module_weights: dict[str, dict[str, float]] | None = None
    messages: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-ready Python types (for a round's ``summary.json``)."""
        return {
            "method": self.method,
            "weighting": self.weighting,
            "weights": dict(self.weights),
            "norms": dict(self.norms),
            "clip_scales": dict(self.clip_scales),
            "ranks": dict(self.ranks),
            "fallback": self.fallback,
            "fallback_modules": list(self.fallback_modules),
            "messages": list(self.messages),
        }


# ----------------------------------------------------------------------------------------------------------------
# State-dict helpers
# ----------------------------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _split_keys(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Module name -> (A key, B key) in order of first appearance, and the dense-extra keys."""
    found: dict[str, list[str | None]] = {}
    extras: list[str] = []
    for key in state_dict:
        for a_suffix, b_suffix in _FACTOR_SUFFIXES:
            if key.endswith(a_suffix):
                found.setdefault(key[: -len(a_suffix)], [None, None])[0] = key
                break
            if key.endswith(b_suffix):
                found.setdefault(key[: -len(b_suffix)], [None, None])[1] = key
                break
        else:
            extras.append(key)
    modules: dict[str, tuple[str, str]] = {}
    for name, (a_key, b_key) in found.items():
        if a_key is None or b_key is None:
            have, lack = ("lora_B", "lora_A") if a_key is None else ("lora_A", "lora_B")
            raise ValueError(
                f"module {name!r} has a {have} factor but no {lack} factor; pass the complete adapter state dict "
                "(both factors of every LoRA module)"
            )
        modules[name] = (a_key, b_key)
    return modules, extras


def _module_rank(name: str, a: torch.Tensor, b: torch.Tensor) -> int:
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(
            f"module {name!r}: lora_A and lora_B must have at least 2 dimensions, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] != b.shape[1]:
        raise ValueError(
            f"module {name!r}: lora_A has rank {a.shape[0]} (shape {tuple(a.shape)}) but lora_B has rank "
            f"{b.shape[1]} (shape {tuple(b.shape)}); both factors must have the same rank"
        )
    return int(a.shape[0])


def lora_module_names(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the LoRA modules of an adapter state dict, in order of first appearance.

    A module's name is the key prefix before ``.lora_A.weight`` / ``.lora_B.weight``.

    Example:
        >>> import torch
        >>> sd = {"layer.q_proj.lora_A.weight": torch.zeros(2, 4), "layer.q_proj.lora_B.weight": torch.zeros(4, 2),
        ...       "head.weight": torch.zeros(3)}
        >>> lora_module_names(sd)
        ['layer.q_proj']
    """
    return list(_split_keys(state_dict)[0])


def _rank_for(name: str, rank: int | Mapping[str, int]) -> int | None:
    if isinstance(rank, Mapping):
        value = rank.get(name)
        if value is None:
            return None
    else:
        value = rank
    if not _is_int(value) or value < 1:
        raise ValueError(f"rank for module {name!r} must be an int >= 1, got {value!r}")
    return int(value)


def truncate(state_dict: Mapping[str, torch.Tensor], rank: int | Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Keep the first ``rank`` components of every LoRA module: ``A[:k]`` and ``B[:, :k]``.

    Args:
        state_dict: an adapter state dict (any dtype / device; both are kept).
        rank: one rank for all modules, or ``module name -> rank`` (modules not in the mapping are kept whole).

    Returns:
        A new dict; the LoRA factors are new contiguous tensors, dense extras are passed through unchanged.

    Raises:
        ValueError: a requested rank exceeds a module's current rank (use :func:`pad` to grow), or names an
            unknown module.

    Example:
        >>> import torch
        >>> sd = {"m.lora_A.weight": torch.randn(8, 16), "m.lora_B.weight": torch.randn(32, 8)}
        >>> {k: tuple(v.shape) for k, v in truncate(sd, 2).items()}
        {'m.lora_A.weight': (2, 16), 'm.lora_B.weight': (32, 2)}
    """
    modules, _ = _split_keys(state_dict)
    if isinstance(rank, Mapping):
        unknown = sorted(set(rank) - set(modules))
        if unknown:
            raise ValueError(f"truncate: rank mapping names modules that are not in the state dict: {unknown[:5]}")
    out: dict[str, torch.Tensor] = {}
    factor_of = {a_key: (name, "A") for name, (a_key, _) in modules.items()}
    factor_of.update({b_key: (name, "B") for name, (_, b_key) in modules.items()})
    for key, tensor in state_dict.items():
        if key not in factor_of:
            out[key] = tensor
            continue
        name, which = factor_of[key]
        a_key, b_key = modules[name]
        current = _module_rank(name, state_dict[a_key], state_dict[b_key])
        k = _rank_for(name, rank)
        if k is None:
            k = current
        if k > current:
            raise ValueError(
                f"truncate: module {name!r} has rank {current}, cannot truncate it to rank {k}; use pad() to grow "
                "an adapter"
            )
        piece = tensor[:k] if which == "A" else tensor[:, :k]
        out[key] = piece.clone(memory_format=torch.contiguous_format)
    return out


def pad(state_dict: Mapping[str, torch.Tensor], r_max: int) -> dict[str, torch.Tensor]:
    """Zero-pad every LoRA module to rank ``r_max`` (rows of ``A``, columns of ``B``); ``B A`` is unchanged.

    Returns:
        A new dict; the LoRA factors are new tensors with the input's dtype and device, dense extras are passed
        through unchanged.

    Raises:
        ValueError: a module's rank exceeds ``r_max`` (use :func:`truncate` to shrink).

    Example:
        >>> import torch
        >>> sd = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 2)}
        >>> padded = pad(sd, 4)
        >>> tuple(padded["m.lora_A.weight"].shape), float(padded["m.lora_A.weight"][2:].abs().sum())
        ((4, 3), 0.0)
    """
    if not _is_int(r_max) or r_max < 1:
        raise ValueError(f"pad: r_max must be an int >= 1, got {r_max!r}")
    modules, _ = _split_keys(state_dict)
    out: dict[str, torch.Tensor] = dict(state_dict)
    for name, (a_key, b_key) in modules.items():
        a, b = state_dict[a_key], state_dict[b_key]
        rank = _module_rank(name, a, b)
        if rank > r_max:
            raise ValueError(
                f"pad: module {name!r} has rank {rank} > r_max={r_max}; truncate() it first or raise r_max"
            )
        new_a = a.new_zeros((r_max, *a.shape[1:]))
        new_a[:rank] = a
        new_b = b.new_zeros((b.shape[0], r_max, *b.shape[2:]))
        new_b[:, :rank] = b
        out[a_key], out[b_key] = new_a, new_b
    return out


def _flat_a(a: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape[0], -1)


def _flat_b(name: str, b: torch.Tensor) -> torch.Tensor:
    if b.ndim > 2 and math.prod(b.shape[2:]) != 1:
        raise ValueError(
            f"module {name!r}: lora_B has shape {tuple(b.shape)}; only factors whose trailing dimensions are 1 "
            "(linear, embedding, 1x1-convolution B) can be aggregated"
        )
    return b.reshape(b.shape[0], b.shape[1])


def _module_sq_norm(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    """``||B A||_F^2 = trace((B^T B)(A A^T))`` from the two r x r Gram matrices (float32 Grams, float64 sum)."""
    a2 = _flat_a(a).float()
    b2 = _flat_b(name, b).float()
    gram_a = a2 @ a2.T
    gram_b = b2.T @ b2
    # Both Grams are symmetric, so trace(G_B G_A) is the sum of their elementwise product.
    return float(torch.sum(gram_a.double() * gram_b.double()))


def update_norm(state_dict: Mapping[str, torch.Tensor], scaling: float = 1.0) -> float:
    """``||s B A||_F`` over all LoRA modules: ``sqrt(sum_m s^2 trace((B_m^T B_m)(A_m A_m^T)))``.

    No ``d_out x d_in`` matrix is formed: the cost is two ``r x r`` Gram matrices per module.

    Example:
        >>> import torch
        >>> sd = {"m.lora_A.weight": torch.tensor([[3.0, 0.0]]), "m.lora_B.weight": torch.tensor([[0.0], [2.0]])}
        >>> update_norm(sd, scaling=0.5)
        3.0
    """
    modules, _ = _split_keys(state_dict)
    total = 0.0
    for name, (a_key, b_key) in modules.items():
        a, b = state_dict[a_key], state_dict[b_key]
        _module_rank(name, a, b)
        total += _module_sq_norm(name, a, b)
    return float(abs(scaling)) * math.sqrt(max(total, 0.0))


# ----------------------------------------------------------------------------------------------------------------
# Running sums
# ----------------------------------------------------------------------------------------------------------------


def _level_and_weight(sparsity: float | None, num_examples: int) -> tuple[int, float]:
    """The best weighting level at which a client's weight is positive, and that weight."""
    if sparsity is not None and sparsity > 0.0:
        return _SPARSITY, float(sparsity)
    if num_examples > 0:
        return _DATA, float(num_examples)
    return _UNIFORM, 1.0


class _FactorSum:
    """Weighted running sums of one module's zero-padded factors, with a weighting level per component.

    ``den[j]`` is the total weight of component ``j`` at level ``level[j]``. A client at a better level than a
    component's current level resets that component (every earlier contribution had weight 0 at the better level).
    """

    def __init__(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int) -> None:
        self.r_max = r_max
        self.a_sum = torch.zeros((r_max, *a_shape[1:]), dtype=torch.float32)
        self.b_sum = torch.zeros((b_shape[0], r_max, *b_shape[2:]), dtype=torch.float32)
        self.level = np.full(r_max, _NONE, dtype=np.int8)
        self.den = np.zeros(r_max, dtype=np.float64)

    def add(self, a: torch.Tensor, b: torch.Tensor, level: int, weight: float, scale: float, covered_only: bool):
        """Add ``weight * scale * (A, B)``; the denominator spans ``[0, r_k)`` if ``covered_only`` else all."""
        rank = a.shape[0]
        span = rank if covered_only else self.r_max
        levels = self.level[:span]
        alpha = weight * scale
        if not (levels == level).all():
            raise_idx = np.nonzero(levels < level)[0]
            if raise_idx.size:
                idx = torch.from_numpy(raise_idx)
                self.a_sum[idx] = 0.0
                self.b_sum[:, idx] = 0.0
                self.den[raise_idx] = 0.0
                self.level[raise_idx] = level
            active = self.level[:span] == level
            if not active[:rank].all():
                idx_np = np.nonzero(active[:rank])[0]
                if idx_np.size:
                    idx = torch.from_numpy(idx_np)
                    self.a_sum.index_add_(0, idx, a[idx].to(torch.float32), alpha=alpha)
                    self.b_sum.index_add_(1, idx, b[:, idx].to(torch.float32), alpha=alpha)
                self.den[:span][active] += weight
                return
            self.den[:span][active] += weight
        else:
            self.den[:span] += weight
        self.a_sum[:rank].add_(a, alpha=alpha)
        self.b_sum[:, :rank].add_(b, alpha=alpha)

    def result(self, previous: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        covered = self.level >= 0
        inv = np.where(covered, 1.0 / np.where(covered, self.den, 1.0), 0.0)
        inv_t = torch.from_numpy(inv).to(torch.float32)
        a = self.a_sum * inv_t.view(-1, *([1] * (self.a_sum.ndim - 1)))
        b = self.b_sum * inv_t.view(1, -1, *([1] * (self.b_sum.ndim - 2)))
        if previous is not None and not covered.all():
            idx = torch.from_numpy(np.nonzero(~covered)[0])
            prev_a, prev_b = previous
            a[idx] = prev_a[idx]
            b[:, idx] = prev_b[:, idx]
        return a, b

    def levels_used(self) -> np.ndarray:
        return self.level


class _FactorStack:
    """FlexLoRA's running data-weighted sum ``sum_k w_k B_k A_k`` of one module, kept as stacked factors.

    ``B_cat = [w_1 B_1 | w_2 B_2 | ...]`` and ``A_cat = [A_1; A_2; ...]``. When the stack exceeds ``limit``
    components it is recompressed exactly (two QRs and a small SVD, all singular triplets kept), so it never holds
    more than ``limit + r_k`` components.
    """

    def __init__(self, name: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], r_max: int) -> None:
        self.name = name
        self.a_shape = a_shape
        self.b_shape = b_shape
        self.r_max = r_max
        self.d_in = math.prod(a_shape[1:])
        self.d_out = b_shape[0]
        self.limit = max(2 * min(self.d_in, self.d_out), r_max)
        self.b_blocks: list[torch.Tensor] = []
        self.a_blocks: list[torch.Tensor] = []
        self.stacked_rank = 0
        self.level = _NONE
        self.den = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor, level: int, weight: float, scale: float) -> None:
        if level < self.level:
            return
        if level > self.level:
            self.b_blocks, self.a_blocks, self.stacked_rank, self.den = [], [], 0, 0.0
            self.level = level
        self.den += weight
        self.b_blocks.append(torch.mul(_flat_b(self.name, b).to(torch.float32), weight * scale))
        self.a_blocks.append(_flat_a(a).to(torch.float32, copy=True))
        self.stacked_rank += a.shape[0]
        if self.stacked_rank > self.limit:
            b_fac, a_fac = self._svd_factors(keep=None)
            self.b_blocks, self.a_blocks, self.stacked_rank = [b_fac], [a_fac], a_fac.shape[0]

    def _svd_factors(self, keep: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U S, V^T)`` of the stacked sum (top ``keep`` triplets, all if None), from QRs of the stacked factors."""
        b_cat = self.b_blocks[0] if len(self.b_blocks) == 1 else torch.cat(self.b_blocks, dim=1)  # (d_out, R)
        a_cat = self.a_blocks[0] if len(self.a_blocks) == 1 else torch.cat(self.a_blocks, dim=0)  # (R, d_in)
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
        left = torch.zeros((self.d_out, k), dtype=torch.float32)
        left[:p] = u[:, :k] * s[:k]
        right = torch.zeros((self.d_in, k), dtype=torch.float32)
        right[:q] = vh[:k].T
        new_b = torch.ormqr(h_b, tau_b, left)  # Q_B U S   (d_out, k)
        new_a = torch.ormqr(h_a, tau_a, right).T.contiguous()  # (Q_A V)^T   (k, d_in)
        return new_b, new_a

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        b_fac, a_fac = self._svd_factors(keep=self.r_max)
        b_fac = b_fac * (1.0 / self.den)
        got = a_fac.shape[0]
        a = torch.zeros((self.r_max, self.d_in), dtype=torch.float32)
        b = torch.zeros((self.d_out, self.r_max), dtype=torch.float32)
        a[:got] = a_fac
        b[:, :got] = b_fac
        return a.reshape(self.r_max, *self.a_shape[1:]), b.reshape(self.d_out, self.r_max, *self.b_shape[2:])


@dataclass
class _ClientRecord:
    client_id: str
    rank: int
    num_examples: int
    norm: float
    clip_scale: float
    level: int
    weight: float
    module_sq_norms: dict[str, float]


@dataclass
class _ModuleSpec:
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]  # at the first client's rank; only [1:] is compared
    b_shape: tuple[int, ...]
    first_rank: int


# ----------------------------------------------------------------------------------------------------------------
# The aggregator
# ----------------------------------------------------------------------------------------------------------------


class StreamingAggregator:
    """Aggregate client updates one at a time, with memory flat in the number of clients.

    Args:
        method: one of ``AGGREGATION_METHODS``.
        r_max: rank of the global adapter (``HetLoRAConfig.r``); every client module must have rank ``<= r_max``.
        scaling: the LoRA scale ``s`` (``lora_alpha / r_max``); it enters the norms ``S_k`` (and so ``clip_norm``)
            but not the weights, which are ratios.
        previous: the previous global adapter (rank ``<= r_max``, zero-padded if lower); ``rankwise`` keeps its
            values for components no client covers. Other methods do not use it.
        clip_norm: if set, each client's update is scaled so that ``||s B A||_F <= clip_norm`` (``A`` and ``B``
            each by ``sqrt(c_k)``, ``c_k = min(1, clip_norm / S_k)``; ``flexlora`` scales ``B_k A_k`` by ``c_k``);
            the sparsity weights then use the clipped norm ``c_k S_k``. Dense extras are not clipped.
        weighting: ``"per_client"`` (default: one ``S_k`` over all modules) or ``"per_module"`` (``S_km`` per module;
            ``hetlora`` and ``rankwise`` only).

    Only running sums at ``r_max`` are kept (``flexlora``: the weighted stacked factors, recompressed exactly when
    they exceed ``2 * min(d_out, d_in)`` components); :meth:`add` validates a whole update before it changes
    anything, so a rejected update leaves the aggregator as it was.

    Example:
        >>> import torch
        >>> agg = StreamingAggregator("hetlora", r_max=4)
        >>> for i, r in enumerate([1, 4]):
        ...     sd = {"m.lora_A.weight": torch.randn(r, 8), "m.lora_B.weight": torch.randn(6, r)}
        ...     agg.add(ClientUpdate(f"c{i}", sd, rank=r, num_examples=10))
        >>> res = agg.result()
        >>> tuple(res.state_dict["m.lora_B.weight"].shape), round(sum(res.weights.values()), 6)
        ((6, 4), 1.0)
    """

    def __init__(
        self,
        method: str,
        r_max: int,
        scaling: float = 1.0,
        previous: Mapping[str, torch.Tensor] | None = None,
        clip_norm: float | None = None,
        *,
        weighting: str = "per_client",
    ) -> None:
        if method not in AGGREGATION_METHODS:
            raise ValueError(f"unknown aggregation method {method!r}; choose one of {list(AGGREGATION_METHODS)}")
        if not _is_int(r_max) or r_max < 1:
            raise ValueError(f"r_max must be an int >= 1 (the global adapter's rank, HetLoRAConfig.r), got {r_max!r}")
        if not _is_real(scaling) or not math.isfinite(scaling) or scaling <= 0:
            raise ValueError(f"scaling must be a finite number > 0 (lora_alpha / r_max), got {scaling!r}")
        if clip_norm is not None and (not _is_real(clip_norm) or not math.isfinite(clip_norm) or clip_norm <= 0):
            raise ValueError(f"clip_norm must be None or a finite number > 0, got {clip_norm!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {list(WEIGHTINGS)}")
        if weighting == "per_module" and method not in _SPARSITY_METHODS:
            raise ValueError(
                f"weighting='per_module' applies to sparsity weights, i.e. methods {list(_SPARSITY_METHODS)}; "
                f"method {method!r} uses data-size weights: drop the weighting argument"
            )
        if previous is not None and not isinstance(previous, Mapping):
            raise TypeError(f"previous must be None or an adapter state dict, got {type(previous).__name__}")
        self.method = method
        self.r_max = int(r_max)
        self.scaling = float(scaling)
        self.previous = previous
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.weighting = weighting
        self._key_order: list[str] | None = None
        self._modules_keys: set[str] = set()
        self._modules: dict[str, _ModuleSpec] = {}
        self._extras: dict[str, tuple[int, ...]] = {}
        self._sums: dict[str, _FactorSum] = {}
        self._stacks: dict[str, _FactorStack] = {}
        self._extra_sums: dict[str, torch.Tensor] = {}
        self._extra_level = _NONE
        self._extra_den = 0.0
        self._clients: list[_ClientRecord] = []
        self._seen_ids: set[str] = set()

    @property
    def num_clients(self) -> int:
        """How many updates have been added."""
        return len(self._clients)

    # -- validation ------------------------------------------------------------------------------------------

    def _check_structure(self, update: ClientUpdate) -> tuple[dict[str, tuple[str, str]], list[str], dict[str, int]]:
        cid = update.client_id
        if cid in self._seen_ids:
            raise ValueError(f"client {cid!r} was already added to this aggregation; each client counts once")
        sd = update.state_dict
        for key, value in sd.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"client {cid!r}: state_dict[{key!r}] is a {type(value).__name__}, not a tensor")
        modules, extras = _split_keys(sd)
        if not modules:
            raise ValueError(
                f"client {cid!r}: the state dict has no LoRA factors (keys ending in .lora_A.weight / "
                ".lora_B.weight); pass the adapter state dict in PEFT's saved key format"
            )
        ranks: dict[str, int] = {}
        for name, (a_key, b_key) in modules.items():
            rank = _module_rank(name, sd[a_key], sd[b_key])
            _flat_b(name, sd[b_key])
            if rank > self.r_max:
                raise ValueError(
                    f"client {cid!r}: module {name!r} has rank {rank} > r_max={self.r_max}; the client must "
                    f"truncate its adapter to rank <= {self.r_max} (or raise r_max for the federation)"
                )
            if rank > update.rank:
                raise ValueError(
                    f"client {cid!r}: module {name!r} has rank {rank} but the update declares rank {update.rank}; "
                    "declare the rank actually uploaded"
                )
            ranks[name] = rank
        if update.rank > self.r_max:
            raise ValueError(
                f"client {cid!r} declares rank {update.rank} > r_max={self.r_max}; the client must truncate its "
                f"adapter to rank <= {self.r_max} (or raise r_max for the federation)"
            )
        for key in extras:
            if not sd[key].is_floating_point():
                raise ValueError(
                    f"client {cid!r}: dense extra {key!r} has dtype {sd[key].dtype}; only floating-point extras can "
                    "be averaged"
                )
        if self._key_order is None:
            return modules, extras, ranks
        first = self._clients[0].client_id
        missing = [k for k in self._key_order if k not in sd]
        unexpected = [k for k in sd if k not in self._modules_keys]
        if missing or unexpected:
            raise ValueError(
                f"client {cid!r} has a different key set than client {first!r}: missing {missing[:3]}"
                f"{' ...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                f"{' ...' if len(unexpected) > 3 else ''}; all clients must train the same target modules"
            )
        for name, (a_key, b_key) in modules.items():
            spec = self._modules[name]
            a, b = sd[a_key], sd[b_key]
            if (
                tuple(a.shape[1:]) != spec.a_shape[1:]
                or b.shape[0] != spec.b_shape[0]
                or (tuple(b.shape[2:]) != spec.b_shape[2:])
            ):
                raise ValueError(
                    f"client {cid!r}: module {name!r} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, but "
                    f"client {first!r} has d_in {spec.a_shape[1:]} / d_out {spec.b_shape[0]}; clients must share "
                    "the base model and target modules"
                )
            if self.method == "fedavg" and ranks[name] != spec.first_rank:
                raise ValueError(
                    f"fedavg needs every client at the same rank: client {cid!r} has rank {ranks[name]} at module "
                    f"{name!r}, client {first!r} has {spec.first_rank}; use method='hetlora', 'zero_pad', "
                    "'flexlora' or 'rankwise' for heterogeneous ranks"
                )
        for key in extras:
            if tuple(sd[key].shape) != self._extras[key]:
                raise ValueError(
                    f"client {cid!r}: dense extra {key!r} has shape {tuple(sd[key].shape)}, client {first!r} has "
                    f"{self._extras[key]}; clients must share the same modules_to_save"
                )
        return modules, extras, ranks

    def _init_structure(self, update: ClientUpdate, modules: dict[str, tuple[str, str]], extras: list[str]) -> None:
        sd = update.state_dict
        self._key_order = list(sd)
        self._modules_keys = set(sd)
        for name, (a_key, b_key) in modules.items():
            a, b = sd[a_key], sd[b_key]
            self._modules[name] = _ModuleSpec(a_key, b_key, tuple(a.shape), tuple(b.shape), int(a.shape[0]))
            if self.method == "flexlora":
                self._stacks[name] = _FactorStack(name, tuple(a.shape), tuple(b.shape), self.r_max)
            else:
                self._sums[name] = _FactorSum(tuple(a.shape), tuple(b.shape), self.r_max)
        for key in extras:
            self._extras[key] = tuple(sd[key].shape)
            self._extra_sums[key] = torch.zeros(self._extras[key], dtype=torch.float32)
        if self.previous is not None and self.method == "rankwise":
            self._check_previous()

    def _check_previous(self) -> None:
        prev = self.previous
        assert prev is not None
        for name, spec in self._modules.items():
            if spec.a_key not in prev or spec.b_key not in prev:
                raise ValueError(
                    f"previous global adapter lacks module {name!r}; pass the global adapter the clients started "
                    "from (or previous=None to fill uncovered components with zeros)"
                )
            a, b = prev[spec.a_key], prev[spec.b_key]
            rank = _module_rank(name, a, b)
            if rank > self.r_max or tuple(a.shape[1:]) != spec.a_shape[1:] or b.shape[0] != spec.b_shape[0]:
                raise ValueError(
                    f"previous global adapter: module {name!r} has lora_A {tuple(a.shape)} / lora_B "
                    f"{tuple(b.shape)}, which does not fit r_max={self.r_max} and the clients' shapes"
                )

    # -- adding ----------------------------------------------------------------------------------------------

    def add(self, update: ClientUpdate) -> None:
        """Validate one client's update and fold it into the running sums.

        Raises:
            ValueError: the update does not fit (rank > r_max, other keys or shapes than the first client,
                non-finite values, fedavg with another rank, duplicate client id); the aggregator is unchanged.
        """
        if not isinstance(update, ClientUpdate):
            raise TypeError(f"add() takes a ClientUpdate, got {type(update).__name__}")
        modules, extras, _ = self._check_structure(update)
        sd = update.state_dict
        cid = update.client_id
        module_sq: dict[str, float] = {}
        for name, (a_key, b_key) in modules.items():
            sq = _module_sq_norm(name, sd[a_key], sd[b_key])
            if not math.isfinite(sq):
                raise ValueError(
                    f"client {cid!r}: module {name!r} has non-finite (or overflowing) values; reject this upload"
                )
            module_sq[name] = max(sq, 0.0) * self.scaling**2
        for key in extras:
            if not bool(torch.isfinite(sd[key]).all()):
                raise ValueError(f"client {cid!r}: dense extra {key!r} has non-finite values; reject this upload")
        norm = math.sqrt(sum(module_sq.values()))
        clip_scale = 1.0
        if self.clip_norm is not None and norm > self.clip_norm:
            clip_scale = self.clip_norm / norm
        sparse = self.method in _SPARSITY_METHODS
        level, weight = _level_and_weight(norm * clip_scale if sparse else None, update.num_examples)

        if self._key_order is None:
            self._init_structure(update, modules, extras)
        factor_scale = math.sqrt(clip_scale)
        for name, (a_key, b_key) in modules.items():
            a = sd[a_key].detach().to("cpu")
            b = sd[b_key].detach().to("cpu")
            if self.method == "flexlora":
                self._stacks[name].add(a, b, level, weight, clip_scale)
                continue
            m_level, m_weight = level, weight
            if self.weighting == "per_module":
                m_level, m_weight = _level_and_weight(math.sqrt(module_sq[name]) * clip_scale, update.num_examples)
            self._sums[name].add(a, b, m_level, m_weight, factor_scale, covered_only=self.method == "rankwise")
        if level >= self._extra_level:
            if level > self._extra_level:
                for tensor in self._extra_sums.values():
                    tensor.zero_()
                self._extra_level, self._extra_den = level, 0.0
            self._extra_den += weight
            for key in extras:
                self._extra_sums[key].add_(sd[key].detach().to("cpu"), alpha=weight)
        self._clients.append(
            _ClientRecord(cid, int(update.rank), int(update.num_examples), norm, clip_scale, level, weight, module_sq)
        )
        self._seen_ids.add(cid)

    # -- result ----------------------------------------------------------------------------------------------

    def _previous_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.previous is None:
            return None
        spec = self._modules[name]
        a = self.previous[spec.a_key].detach().to("cpu", torch.float32)
        b = self.previous[spec.b_key].detach().to("cpu", torch.float32)
        rank = a.shape[0]
        if rank < self.r_max:
            a = torch.cat([a, a.new_zeros((self.r_max - rank, *a.shape[1:]))], dim=0)
            b = torch.cat([b, b.new_zeros((b.shape[0], self.r_max - rank, *b.shape[2:]))], dim=1)
        return a, b

    def _client_weights(self) -> tuple[dict[str, float], int]:
        top = max(rec.level for rec in self._clients)
        total = sum(rec.weight for rec in self._clients if rec.level == top)
        weights = {rec.client_id: (rec.weight / total if rec.level == top else 0.0) for rec in self._clients}
        return weights, top

    def _module_weights(self, name: str) -> dict[str, float]:
        pairs = []
        for rec in self._clients:
            s_km = math.sqrt(rec.module_sq_norms[name]) * rec.clip_scale
            pairs.append((rec.client_id, *_level_and_weight(s_km, rec.num_examples)))
        top = max(level for _, level, _ in pairs)
        total = sum(w for _, level, w in pairs if level == top)
        return {cid: (w / total if level == top else 0.0) for cid, level, w in pairs}

    def result(self) -> AggregationResult:
        """The aggregated global adapter (float32, CPU, rank ``r_max``); the aggregator can keep adding after it.

        Raises:
            ValueError: no update was added.
        """
        if not self._clients:
            raise ValueError("no client updates were added; add at least one ClientUpdate before result()")
        assert self._key_order is not None
        method_top = _SPARSITY if self.method in _SPARSITY_METHODS else _DATA
        weights, client_level = self._client_weights()
        out_factors: dict[str, torch.Tensor] = {}
        fallback_modules: list[str] = []
        worst = client_level
        for name, spec in self._modules.items():
            if self.method == "flexlora":
                a, b = self._stacks[name].result()
                used = self._stacks[name].level
            else:
                prev = self._previous_factors(name) if self.method == "rankwise" else None
                a, b = self._sums[name].result(prev)
                levels = self._sums[name].levels_used()
                covered = levels[levels >= 0]
                used = int(covered.min()) if covered.size else method_top
            if used < method_top:
                fallback_modules.append(name)
            worst = min(worst, used)
            out_factors[spec.a_key], out_factors[spec.b_key] = a, b
        state_dict: dict[str, torch.Tensor] = {}
        for key in self._key_order:
            if key in out_factors:
                state_dict[key] = out_factors[key]
            else:
                state_dict[key] = self._extra_sums[key] * (1.0 / self._extra_den)

        messages: list[str] = []
        fallback = _FALLBACK_NAMES.get(worst) if worst < method_top else None
        if fallback is not None:
            if method_top == _DATA:
                messages.append("every client reports num_examples=0: used uniform weights instead of n_k / N")
            else:
                scope = (
                    "every client update has zero norm (all B still zero, e.g. at round start?)"
                    if client_level < _SPARSITY
                    else f"{len(fallback_modules)} module(s) have zero norm for every client covering them"
                )
                instead = "data-size weights n_k / N" if worst == _DATA else "uniform weights (num_examples all 0)"
                messages.append(f"{scope}: used {instead} instead of sparsity weights there")
        clipped = [rec.client_id for rec in self._clients if rec.clip_scale < 1.0]
        if clipped:
            messages.append(f"clipped {len(clipped)} client update(s) to norm {self.clip_norm}: {clipped[:10]}")
        module_weights = None
        if self.weighting == "per_module":
            module_weights = {name: self._module_weights(name) for name in self._modules}
        return AggregationResult(
            state_dict=state_dict,
            weights=weights,
            norms={rec.client_id: rec.norm for rec in self._clients},
            clip_scales={rec.client_id: rec.clip_scale for rec in self._clients},
            ranks={rec.client_id: rec.rank for rec in self._clients},
            method=self.method,
            weighting=self.weighting,
            fallback=fallback,
            fallback_modules=fallback_modules,
            module_weights=module_weights,
            messages=messages,
        )


def aggregate(
    updates: Iterable[ClientUpdate],
    method: str = "hetlora",
    r_max: int | None = None,
    scaling: float = 1.0,
    previous: Mapping[str, torch.Tensor] | None = None,
    clip_norm: float | None = None,
    *,
    weighting: str = "per_client",
) -> AggregationResult:
    """Aggregate client updates into a new global adapter at rank ``r_max`` (see the module docstring).

    A thin loop over :class:`StreamingAggregator`; ``updates`` may be a generator that loads one client at a time.

    Args:
        updates: the accepted clients' updates.
        method: one of ``AGGREGATION_METHODS`` (default ``"hetlora"``).
        r_max: rank of the global adapter (required).
        scaling, previous, clip_norm, weighting: see :class:`StreamingAggregator`.

    Raises:
        ValueError: no updates, unknown method, or an update that does not fit (see :meth:`StreamingAggregator.add`).

    Example:
        >>> import torch
        >>> def client(cid, r, n):
        ...     sd = {"m.lora_A.weight": torch.randn(r, 16), "m.lora_B.weight": torch.randn(8, r)}
        ...     return ClientUpdate(cid, sd, rank=r, num_examples=n)
        >>> res = aggregate([client("a", 2, 10), client("b", 4, 30)], method="zero_pad", r_max=4)
        >>> res.weights
        {'a': 0.25, 'b': 0.75}
    """
    if r_max is None:
        raise ValueError("aggregate() needs r_max=... (the global adapter's rank, HetLoRAConfig.r)")
    aggregator = StreamingAggregator(method, r_max, scaling, previous, clip_norm, weighting=weighting)
    for update in updates:
        aggregator.add(update)
    if aggregator.num_clients == 0:
        raise ValueError("aggregate() got no client updates; pass at least one ClientUpdate")
    return aggregator.result()
