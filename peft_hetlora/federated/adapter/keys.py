"""The adapter key format: LoRA module names, factor pairs, truncate, pad and norms.

Everything in the federated core works on plain ``dict[str, torch.Tensor]`` adapter state dicts in PEFT's *saved*
key format (adapter name removed)::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (r_k, d_in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   (d_out, r_k)

A *module* is the key prefix before ``.lora_A.weight`` / ``.lora_B.weight`` (PEFT's embedding keys
``.lora_embedding_A`` / ``.lora_embedding_B`` and convolution factors with a ``1 x 1`` B work too). The rank of a
module is ``A.shape[0] == B.shape[1]``; it may differ per module. All other keys are *dense extras*
(``modules_to_save``, LoRA biases, DoRA magnitudes).

Example:
    >>> import torch
    >>> sd = {"m.lora_A.weight": torch.ones(4, 3), "m.lora_B.weight": torch.ones(2, 4), "head.weight": torch.ones(1)}
    >>> split_lora_keys(sd)
    ({'m': ('m.lora_A.weight', 'm.lora_B.weight')}, ['head.weight'])
    >>> module_ranks(truncate(sd, 2))
    {'m': 2}
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from ...utils.errors import AggregationError, AggregationRankError, RankError
from ...utils.ranks import MAX_RANK, check_rank
from .components import unique_indices

__all__ = [
    "FACTOR_SUFFIXES",
    "gather_components",
    "lora_module_names",
    "module_rank",
    "module_ranks",
    "module_sq_norm",
    "pad",
    "split_lora_keys",
    "truncate",
    "update_norm",
]

FACTOR_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_embedding_A", ".lora_embedding_B"),
)
"""(A suffix, B suffix) pairs that mark the two LoRA factors of one module in PEFT's saved format."""


def is_real(value: Any) -> bool:
    """True for real numbers, False for bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def split_lora_keys(state_dict: Mapping[str, Any]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Module name -> (A key, B key) in order of first appearance, and the dense-extra keys.

    Raises:
        AggregationError: a module has only one of its two factors.

    Example:
        >>> split_lora_keys({"m.lora_B.weight": 0, "m.lora_A.weight": 0, "x.bias": 0})
        ({'m': ('m.lora_A.weight', 'm.lora_B.weight')}, ['x.bias'])
    """
    found: dict[str, list[str | None]] = {}
    extras: list[str] = []
    for key in state_dict:
        for a_suffix, b_suffix in FACTOR_SUFFIXES:
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
            raise AggregationError(
                f"module {name!r} has a {have} factor but no {lack} factor; pass the complete adapter state dict "
                "(both factors of every LoRA module)"
            )
        modules[name] = (a_key, b_key)
    return modules, extras


def module_rank(name: str, a: torch.Tensor, b: torch.Tensor) -> int:
    """The rank of one module, ``A.shape[0] == B.shape[1]``.

    Raises:
        AggregationError: a factor has fewer than 2 dimensions, or the two factors disagree on the rank.

    Example:
        >>> module_rank("m", torch.zeros(3, 5), torch.zeros(4, 3))
        3
    """
    if a.ndim < 2 or b.ndim < 2:
        raise AggregationError(
            f"module {name!r}: lora_A and lora_B must have at least 2 dimensions, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] != b.shape[1]:
        raise AggregationError(
            f"module {name!r}: lora_A has rank {a.shape[0]} (shape {tuple(a.shape)}) but lora_B has rank "
            f"{b.shape[1]} (shape {tuple(b.shape)}); both factors must have the same rank"
        )
    return int(a.shape[0])


def module_ranks(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``module name -> rank`` for every LoRA module of an adapter state dict.

    Example:
        >>> module_ranks({"m.lora_A.weight": torch.zeros(2, 5), "m.lora_B.weight": torch.zeros(4, 2)})
        {'m': 2}
    """
    modules, _ = split_lora_keys(state_dict)
    return {name: module_rank(name, state_dict[a], state_dict[b]) for name, (a, b) in modules.items()}


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
    return list(split_lora_keys(state_dict)[0])


def _rank_for(name: str, rank: int | Mapping[str, int]) -> int | None:
    if isinstance(rank, Mapping):
        value = rank.get(name)
        if value is None:
            return None
    else:
        value = rank
    return check_rank(value, 1, MAX_RANK, what=f"rank for module {name!r}", error=AggregationRankError)


def truncate(state_dict: Mapping[str, torch.Tensor], rank: int | Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Keep the first ``rank`` components of every LoRA module: ``A[:k]`` and ``B[:, :k]``.

    Args:
        state_dict: an adapter state dict (any dtype / device; both are kept).
        rank: one rank for all modules, or ``module name -> rank`` (modules not in the mapping are kept whole).

    Returns:
        A new dict; the LoRA factors are new contiguous tensors, dense extras are passed through unchanged.

    Raises:
        AggregationError: a requested rank exceeds a module's current rank (use :func:`pad` to grow), or names an
            unknown module.

    Example:
        >>> import torch
        >>> sd = {"m.lora_A.weight": torch.randn(8, 16), "m.lora_B.weight": torch.randn(32, 8)}
        >>> {k: tuple(v.shape) for k, v in truncate(sd, 2).items()}
        {'m.lora_A.weight': (2, 16), 'm.lora_B.weight': (32, 2)}
    """
    modules, _ = split_lora_keys(state_dict)
    if isinstance(rank, Mapping):
        unknown = sorted(set(rank) - set(modules))
        if unknown:
            raise AggregationError(
                f"truncate: rank mapping names modules that are not in the state dict: {unknown[:5]}"
            )
    out: dict[str, torch.Tensor] = {}
    factor_of = {a_key: (name, "A") for name, (a_key, _) in modules.items()}
    factor_of.update({b_key: (name, "B") for name, (_, b_key) in modules.items()})
    for key, tensor in state_dict.items():
        if key not in factor_of:
            out[key] = tensor
            continue
        name, which = factor_of[key]
        a_key, b_key = modules[name]
        current = module_rank(name, state_dict[a_key], state_dict[b_key])
        k = _rank_for(name, rank)
        if k is None:
            k = current
        if k > current:
            raise AggregationError(
                f"truncate: module {name!r} has rank {current}, cannot truncate it to rank {k}; use pad() to grow "
                "an adapter"
            )
        piece = tensor[:k] if which == "A" else tensor[:, :k]
        out[key] = piece.clone(memory_format=torch.contiguous_format)
    return out


def gather_components(state_dict: Mapping[str, torch.Tensor], components: Any) -> dict[str, torch.Tensor]:
    """The given components of every LoRA module, in slot order: ``A[components]``, ``B[:, components]``.

    What a client with component set ``I_k`` starts its window from (the general form of :func:`truncate`, which is
    ``gather_components(sd, range(k))``); the server's reference for the influence clip of a windowed upload.

    Args:
        state_dict: an adapter state dict (usually the global at ``r_max``).
        components: unique ints, each below every module's rank (slot ``i`` gets component ``components[i]``).

    Returns:
        A new dict; factors are new contiguous tensors, dense extras are passed through unchanged.

    Raises:
        AggregationError: empty, non-int, negative or duplicate indices, or an index at or beyond a module's rank.

    Example:
        >>> import torch
        >>> sd = {"m.lora_A.weight": torch.arange(8.0).reshape(4, 2), "m.lora_B.weight": torch.ones(3, 4)}
        >>> gather_components(sd, [3, 0])["m.lora_A.weight"].tolist()
        [[6.0, 7.0], [0.0, 1.0]]
    """
    try:
        indices = unique_indices(components, budget=max(1, len(components)))
    except (RankError, TypeError) as err:
        raise AggregationError(f"gather_components: {err}") from None
    modules, _ = split_lora_keys(state_dict)
    out: dict[str, torch.Tensor] = dict(state_dict)
    for name, (a_key, b_key) in modules.items():
        a, b = state_dict[a_key], state_dict[b_key]
        rank = module_rank(name, a, b)
        beyond = [j for j in indices if j >= rank]
        if beyond:
            raise AggregationError(
                f"gather_components: module {name!r} has rank {rank}; components {beyond[:8]} do not exist there"
            )
        idx = torch.tensor(indices, dtype=torch.long, device=a.device)
        out[a_key] = a.index_select(0, idx).contiguous()
        out[b_key] = b.index_select(1, idx).contiguous()
    return out


def pad_factors(a: torch.Tensor, b: torch.Tensor, r_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad one module's factors to rank ``r_max`` (new tensors, same dtype and device)."""
    rank = a.shape[0]
    new_a = a.new_zeros((r_max, *a.shape[1:]))
    new_a[:rank] = a
    new_b = b.new_zeros((b.shape[0], r_max, *b.shape[2:]))
    new_b[:, :rank] = b
    return new_a, new_b


def pad(state_dict: Mapping[str, torch.Tensor], r_max: int) -> dict[str, torch.Tensor]:
    """Zero-pad every LoRA module to rank ``r_max`` (rows of ``A``, columns of ``B``); ``B A`` is unchanged.

    Returns:
        A new dict; the LoRA factors are new tensors with the input's dtype and device, dense extras are passed
        through unchanged.

    Raises:
        AggregationError: a module's rank exceeds ``r_max`` (use :func:`truncate` to shrink).

    Example:
        >>> import torch
        >>> sd = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 2)}
        >>> padded = pad(sd, 4)
        >>> tuple(padded["m.lora_A.weight"].shape), float(padded["m.lora_A.weight"][2:].abs().sum())
        ((4, 3), 0.0)
    """
    check_rank(r_max, 1, MAX_RANK, what="pad: r_max", error=AggregationRankError)
    modules, _ = split_lora_keys(state_dict)
    out: dict[str, torch.Tensor] = dict(state_dict)
    for name, (a_key, b_key) in modules.items():
        a, b = state_dict[a_key], state_dict[b_key]
        rank = module_rank(name, a, b)
        check_rank(rank, 1, r_max, what=f"pad: module {name!r}: rank", hi_name="r_max",
                   hint="truncate() it first or raise r_max", error=AggregationRankError)
        out[a_key], out[b_key] = pad_factors(a, b, r_max)
    return out


def flat_a(a: torch.Tensor) -> torch.Tensor:
    """``A`` as an ``r x d_in`` matrix (convolution kernels flattened)."""
    return a.reshape(a.shape[0], -1)


def flat_b(name: str, b: torch.Tensor) -> torch.Tensor:
    """``B`` as a ``d_out x r`` matrix.

    Raises:
        AggregationError: ``B`` has trailing dimensions other than 1 (only linear, embedding and 1x1-convolution B).
    """
    if b.ndim > 2 and math.prod(b.shape[2:]) != 1:
        raise AggregationError(
            f"module {name!r}: lora_B has shape {tuple(b.shape)}; only factors whose trailing dimensions are 1 "
            "(linear, embedding, 1x1-convolution B) can be aggregated"
        )
    return b.reshape(b.shape[0], b.shape[1])


def module_sq_norm(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    """``||B A||_F^2 = trace((B^T B)(A A^T))`` from the two r x r Gram matrices, in float64.

    Example:
        >>> module_sq_norm("m", torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0], [2.0]]))
        36.0
    """
    a2 = flat_a(a).double()
    b2 = flat_b(name, b).double()
    gram_a = a2 @ a2.T
    gram_b = b2.T @ b2
    # Both Grams are symmetric, so trace(G_B G_A) is the sum of their elementwise product.
    return float(torch.sum(gram_a * gram_b))


def update_norm(state_dict: Mapping[str, torch.Tensor], scaling: float = 1.0) -> float:
    """``||s B A||_F`` over all LoRA modules: ``sqrt(sum_m s^2 trace((B_m^T B_m)(A_m A_m^T)))``.

    No ``d_out x d_in`` matrix is formed: the cost is two ``r x r`` Gram matrices per module.

    Example:
        >>> import torch
        >>> sd = {"m.lora_A.weight": torch.tensor([[3.0, 0.0]]), "m.lora_B.weight": torch.tensor([[0.0], [2.0]])}
        >>> update_norm(sd, scaling=0.5)
        3.0
    """
    modules, _ = split_lora_keys(state_dict)
    total = 0.0
    for name, (a_key, b_key) in modules.items():
        a, b = state_dict[a_key], state_dict[b_key]
        module_rank(name, a, b)
        total += module_sq_norm(name, a, b)
    return float(abs(scaling)) * math.sqrt(max(total, 0.0))
