"""Secure-aggregation-ready HetLoRA: every aggregation method expressed as sums of per-client shares.

A secure-aggregation protocol (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017, IACR ePrint 2017/281; SecAgg+: Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020, IACR ePrint 2020/704, as shipped by Flower) reveals only the *sum* of
the clients' vectors. Each client therefore pre-scales its own components by its own weight and also sends the
weight and its per-component coverage as values to be summed:

``share_k = { "<level>/<A key>": w_k * place(A_k),  "<level>/<B key>": w_k * place(B_k),  "<level>/<extra>": w_k x_k,
"<level>/__weight__": [w_k],  "<level>/__coverage__/<module>": w_k * 1[j in I_km] (length r_max) }``

where ``place`` puts the client's rows / columns at the global component indices it trained (``I_km``, the prefix
``0 .. r_km - 1`` unless given) and zeros elsewhere, so every share has the same keys and shapes whatever the rank.
The weight ``w_k`` is the method's (``hetlora`` / ``rankwise`` / ``component``: the sparsity norm
``S_k = ||s B_k A_k||_F``, computed by the client; ``zero_pad`` / ``fedavg``: ``n_k``) and ``<level>`` is the client's
weighting level (``sparsity`` when ``S_k > 0``, else ``data_size`` when ``n_k > 0``, else ``uniform`` with ``w = 1``),
exactly the aggregator's fallback; the client writes zeros under the other levels so the key set stays public.

:func:`combine` then computes component ``j`` of module ``m`` at the best level with positive coverage::

    A_m[j] = (sum_k w_k place(A_k)[j]) / (sum_k w_k 1[j in I_km])        (rankwise / component rule)
    A_m[j] = (sum_k w_k pad(A_k)[j]) / (sum_k w_k)                       (hetlora / zero_pad / fedavg: coverage 1)

and keeps ``previous`` for components nobody covers. Every output is a ratio of two sums, so the result is the same
for any common positive factor on all shares: a protocol that returns the *mean* share (Flower's SecAgg+ divides by
the summed weight) works as well as one that returns the sum.

Costs: a share is ``(r_max / r_k)`` times the client's upload (zero-padded) times the number of levels (3 by
default; pass ``levels=("sparsity",)`` once no client can have ``S_k = 0``, e.g. after the first round), plus
``r_max`` floats per module for the coverage. What is lost: the server cannot validate or clip an individual upload
it never sees (robust aggregation needs the individual values; DP needs clipping on the client or a verified
protocol), per-client weights are not reported, and the sparsity weights still reveal ``sum_k S_k`` in the clear.

Example:
    >>> import torch
    >>> from peft_hetlora.federated.aggregation import ClientUpdate, aggregate
    >>> ups = [ClientUpdate(f"c{k}", {"m.lora_A.weight": torch.randn(r, 4), "m.lora_B.weight": torch.randn(3, r)},
    ...                     rank=r, num_examples=5) for k, r in enumerate([1, 3])]
    >>> sums = sum_shares(client_share(u, method="rankwise", r_max=3) for u in ups)
    >>> out = combine(sums, method="rankwise", r_max=3)
    >>> ref = aggregate(ups, method="rankwise", r_max=3)
    >>> bool(torch.allclose(out.state_dict["m.lora_A.weight"], ref.state_dict["m.lora_A.weight"], atol=1e-6))
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from ....utils.errors import HetLoRAError, RankError
from ..component_view import (
    Layout,
    ModuleSpec,
    factor_keys,
    float64_a,
    float64_b,
    previous_factors,
    to_state_dict,
    validate_round,
)
from ..streaming import AggregationResult, ClientUpdate, update_norm

__all__ = [
    "LEVELS",
    "SECURE_SUM_METHODS",
    "SecureSumError",
    "client_share",
    "combine",
    "sum_shares",
]

SECURE_SUM_METHODS: tuple[str, ...] = ("hetlora", "rankwise", "component", "zero_pad", "fedavg")
"""Methods expressible as sums; ``component`` is the rankwise rule with explicit component indices
(docs/design.md#component-rule)."""

LEVELS: tuple[str, ...] = ("sparsity", "data_size", "uniform")
"""Weighting levels, best first (the aggregator's fallback order)."""

_RESERVED = "__"
_WEIGHT = "__weight__"
_COVERAGE = "__coverage__/"
_SPARSE = ("hetlora", "rankwise", "component")
_PER_COMPONENT = ("rankwise", "component")


class SecureSumError(HetLoRAError, ValueError):
    """Shares or sums that do not fit the method (unknown method or level, missing keys, bad component indices)."""


def _levels_for(method: str, levels: Sequence[str] | None) -> tuple[str, ...]:
    if method not in SECURE_SUM_METHODS:
        raise SecureSumError(f"unknown method {method!r}; secure sums support {list(SECURE_SUM_METHODS)}")
    default = LEVELS if method in _SPARSE else LEVELS[1:]
    chosen = default if levels is None else tuple(levels)
    bad = [lv for lv in chosen if lv not in default]
    if bad or not chosen:
        raise SecureSumError(f"levels for {method!r} must be a non-empty subset of {list(default)}, got {levels!r}")
    return chosen


def _level_and_weight(sparsity: float | None, num_examples: int) -> tuple[str, float]:
    if sparsity is not None and sparsity > 0.0:
        return "sparsity", float(sparsity)
    if num_examples > 0:
        return "data_size", float(num_examples)
    return "uniform", 1.0


def _indices(name: str, rank: int, r_max: int, components: Mapping[str, Sequence[int]] | None) -> list[int]:
    if components is None or name not in components:
        return list(range(rank))
    idx = [int(i) for i in components[name]]
    if len(idx) != rank or len(set(idx)) != rank or any(not 0 <= i < r_max for i in idx):
        raise RankError(
            f"module {name!r}: components must list {rank} distinct global indices in [0, {r_max}) (one per uploaded "
            f"row of A), got {list(components[name])}"
        )
    return idx


def client_share(
    update: ClientUpdate,
    *,
    method: str = "hetlora",
    r_max: int,
    scaling: float = 1.0,
    components: Mapping[str, Sequence[int]] | None = None,
    weighting: str = "per_client",
    levels: Sequence[str] | None = None,
    weight_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The vectors one client hands to the secure-sum protocol (computed on the client, from its own update only).

    Args:
        update: the client's update at its rank.
        method: one of ``SECURE_SUM_METHODS``.
        r_max: the global adapter's rank (every share has the ``r_max`` shapes).
        scaling: the LoRA scale ``s`` (enters ``S_k``).
        components: ``module -> global component indices`` of the uploaded rows (``component`` method; default the
            prefix ``0 .. r_km - 1``).
        weighting: ``"per_client"`` (one ``S_k``) or ``"per_module"`` (``S_km`` per module; sparsity methods).
        levels: the weighting levels to send (default all the method can use; fewer levels shrink the share, and a
            client whose level is not sent contributes weight 0).
        weight_scale: a public constant every weight is divided by, to keep shares inside a fixed-point protocol's
            range (Flower SecAgg+ clips values to ``[-clipping_range, clipping_range]``): e.g. a public upper bound on
            ``S_k`` or ``n_k``. :func:`combine` is unchanged by it.

    Returns:
        ``dict[str, Tensor]`` (float64, CPU) with the same keys and shapes for every client of the round.

    Example:
        >>> import torch
        >>> u = ClientUpdate("c", {"m.lora_A.weight": torch.ones(1, 2), "m.lora_B.weight": torch.ones(2, 1)}, 1, 3)
        >>> share = client_share(u, method="zero_pad", r_max=2, levels=("data_size",))
        >>> share["data_size/m.lora_A.weight"].tolist(), share["data_size/__weight__"].tolist()
        ([[3.0, 3.0], [0.0, 0.0]], [3.0])
    """
    chosen = _levels_for(method, levels)
    if isinstance(weight_scale, bool) or not isinstance(weight_scale, (int, float)) or not weight_scale > 0:
        raise SecureSumError(f"weight_scale must be a number > 0, got {weight_scale!r}")
    if weighting not in ("per_client", "per_module") or (weighting == "per_module" and method not in _SPARSE):
        raise SecureSumError(
            f"weighting must be 'per_client' or, for {list(_SPARSE)}, 'per_module'; got {weighting!r}"
        )
    if components is not None and method != "component":
        raise SecureSumError("components=... applies to method='component' only")
    items, layout = validate_round([update], r_max)
    sd = items[0].state_dict
    ranks = layout.ranks(items[0])
    sparse = method in _SPARSE
    client_level, client_w = _level_and_weight(update_norm(sd, scaling) if sparse else None, update.num_examples)
    client_w /= float(weight_scale)
    share: dict[str, torch.Tensor] = {}
    for level in chosen:
        share[f"{level}/{_WEIGHT}"] = torch.tensor([client_w if level == client_level else 0.0], dtype=torch.float64)
        for key, shape in layout.extras.items():
            w = client_w if level == client_level else 0.0
            share[f"{level}/{key}"] = w * sd[key].detach().to("cpu", torch.float64).reshape(shape)
    for name, spec in layout.modules.items():
        level, w = client_level, client_w
        if weighting == "per_module":
            module_sd = {spec.a_key: sd[spec.a_key], spec.b_key: sd[spec.b_key]}
            level, w = _level_and_weight(update_norm(module_sd, scaling), update.num_examples)
            w /= float(weight_scale)
        idx = _indices(name, ranks[name], r_max, components) if method in _PER_COMPONENT else list(range(ranks[name]))
        idx_t = torch.tensor(idx, dtype=torch.long)
        for lv in chosen:
            a = torch.zeros((r_max, spec.d_in), dtype=torch.float64)
            b = torch.zeros((spec.d_out, r_max), dtype=torch.float64)
            cov = torch.zeros(r_max, dtype=torch.float64)
            if lv == level:
                a[idx_t] = w * float64_a(sd[spec.a_key])
                b[:, idx_t] = w * float64_b(sd[spec.b_key], name)
                if method in _PER_COMPONENT:
                    cov[idx_t] = w
                else:
                    cov[:] = w
            share[f"{lv}/{spec.a_key}"] = a
            share[f"{lv}/{spec.b_key}"] = b
            share[f"{lv}/{_COVERAGE}{name}"] = cov
    return share


def sum_shares(shares: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Key-wise sum of shares: what a secure-aggregation protocol reveals (for tests and the plain fallback).

    Raises:
        SecureSumError: no shares, or shares with different keys or shapes.
    """
    total: dict[str, torch.Tensor] | None = None
    for share in shares:
        if total is None:
            total = {k: v.detach().to("cpu", torch.float64).clone() for k, v in share.items()}
            continue
        if set(share) != set(total):
            raise SecureSumError("shares have different keys: every client must use the same method, levels and r_max")
        for key, value in share.items():
            if tuple(value.shape) != tuple(total[key].shape):
                raise SecureSumError(
                    f"share {key!r} has shape {tuple(value.shape)}, expected {tuple(total[key].shape)}"
                )
            total[key] += value.detach().to("cpu", torch.float64)
    if total is None:
        raise SecureSumError("no shares to sum")
    return total


def _layout_from_sums(sums: Mapping[str, torch.Tensor], level: str, r_max: int) -> Layout:
    prefix = f"{level}/"
    keys = [k[len(prefix) :] for k in sums if k.startswith(prefix) and not k[len(prefix) :].startswith(_RESERVED)]
    template = {k: sums[prefix + k] for k in keys}
    modules = {}
    for name, (a_key, b_key) in factor_keys(template).items():
        a, b = template[a_key], template[b_key]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r_max or b.shape[1] != r_max:
            raise SecureSumError(
                f"summed factors of {name!r} are not at r_max={r_max}: {tuple(a.shape)}, {tuple(b.shape)}"
            )
        modules[name] = ModuleSpec(a_key, b_key, tuple(a.shape), tuple(b.shape))
    if not modules:
        raise SecureSumError("the sums hold no LoRA factors; pass the summed client_share() dicts")
    factor = {k for spec in modules.values() for k in (spec.a_key, spec.b_key)}
    extras = {k: tuple(template[k].shape) for k in keys if k not in factor}
    return Layout(modules, extras, keys, r_max)


def combine(
    sums: Mapping[str, torch.Tensor],
    *,
    method: str = "hetlora",
    r_max: int,
    previous: Mapping[str, torch.Tensor] | None = None,
    original_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> AggregationResult:
    """The new global from summed shares only (see the module docstring for the formulas).

    Args:
        sums: the key-wise sum (or mean) of every client's :func:`client_share`.
        method: the method the shares were made for.
        r_max: the global adapter's rank.
        previous: the previous global; ``rankwise`` / ``component`` keep its components that no client covers
            (zeros when None).
        original_shapes: ``key -> shape`` to restore factors with extra trailing dims (e.g. 1x1 convolutions);
            default 2-D factors.

    Returns:
        An :class:`AggregationResult`; ``weights`` is empty (individual weights are never revealed) and
        ``fallback`` names the weaker level used anywhere.

    Example:
        >>> import torch
        >>> u = ClientUpdate("c", {"m.lora_A.weight": torch.ones(1, 2), "m.lora_B.weight": torch.ones(2, 1)}, 1, 3)
        >>> combine(client_share(u, method="hetlora", r_max=2), method="hetlora", r_max=2).state_dict[
        ...     "m.lora_A.weight"].tolist()
        [[1.0, 1.0], [0.0, 0.0]]
    """
    levels = [lv for lv in _levels_for(method, None) if f"{lv}/{_WEIGHT}" in sums]
    if not levels:
        raise SecureSumError(f"the sums hold no '<level>/{_WEIGHT}' entry: pass summed client_share() dicts")
    layout = _layout_from_sums(sums, levels[0], r_max)
    if original_shapes:
        for spec in layout.modules.values():
            spec.a_shape = tuple(original_shapes.get(spec.a_key, spec.a_shape))
            spec.b_shape = tuple(original_shapes.get(spec.b_key, spec.b_shape))
    for lv in levels:
        for key in layout.key_order:
            if f"{lv}/{key}" not in sums:
                raise SecureSumError(f"the sums lack {lv}/{key}: every share must have the same keys")
    prev, _ = previous_factors(previous, layout, extras_needed=False)
    keep_previous = method in _PER_COMPONENT
    factors = {}
    used: set[str] = set()
    uncovered = 0
    for name, spec in layout.modules.items():
        a_out, b_out = (t.clone() if keep_previous else torch.zeros_like(t) for t in prev[name])
        done = torch.zeros(r_max, dtype=torch.bool)
        for lv in levels:
            cov = sums[f"{lv}/{_COVERAGE}{name}"].to(torch.float64)
            take = (cov > 0) & ~done
            if bool(take.any()):
                used.add(lv)
                idx = torch.nonzero(take).flatten()
                a_out[idx] = sums[f"{lv}/{spec.a_key}"].to(torch.float64)[idx] / cov[idx].view(-1, 1)
                b_out[:, idx] = sums[f"{lv}/{spec.b_key}"].to(torch.float64)[:, idx] / cov[idx].view(1, -1)
                done |= take
        uncovered += int((~done).sum())
        factors[name] = (a_out, b_out)
    extras: dict[str, torch.Tensor] = {}
    for lv in levels:
        total = float(sums[f"{lv}/{_WEIGHT}"].sum())
        if total > 0:
            extras = {k: sums[f"{lv}/{k}"].to(torch.float64) / total for k in layout.extras}
            used.add(lv)
            break
    else:
        if layout.extras:
            raise SecureSumError("every summed weight is zero: no client contributed at the levels sent")
    worst = max((LEVELS.index(lv) for lv in used), default=0)
    top = 0 if method in _SPARSE else 1
    fallback = LEVELS[worst] if worst > top else None
    messages = ["secure-sum aggregation: only sums were used; per-client weights are not known"]
    if fallback is not None:
        messages.append(f"some components fell back to {fallback} weights (zero sparsity weight for their clients)")
    if uncovered:
        messages.append(f"{uncovered} component(s) covered by no client kept {'previous' if keep_previous else 0}")
    return AggregationResult(
        state_dict=to_state_dict(layout, factors, extras),
        weights={},
        method=method,
        fallback=fallback,
        messages=messages,
    )
