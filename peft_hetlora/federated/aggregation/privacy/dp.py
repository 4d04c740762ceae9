"""Client-level differential privacy for heterogeneous-rank LoRA: clip per component set, Gaussian noise, accounting.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018,
arXiv 1710.06963) adapted to components (docs/design.md#component-rule, #bounded-influence). Per round, with ``theta``
the global the clients were
sent (``previous``) and public weights ``w_k in [0, 1]`` (uniform ``1`` by default):

1. Each client's *contribution* is its change relative to that global, over the components it trained:
   ``method="component"`` (the component rule / ``rankwise`` / RBLA): ``Delta_k = theta_k - theta[I_k]`` on its
   ``r_km`` rows of ``A_m`` and columns of ``B_m`` (plus dense extras); ``method="zero_pad"`` (``zero_pad`` /
   ``fedavg``): ``Delta_k = pad(theta_k) - theta`` over all ``r_max`` components (zero-padding pulls the components
   a client did not train towards zero, and that pull counts against its clip).
2. Clip the whole contribution, factors *and* extras together, to L2 norm ``C``:
   ``Delta_k <- Delta_k * min(1, C / ||Delta_k||_2)``. The clip is on the factors themselves, so unbalanced factors
   (``A x 1e-6``, ``B x 1e6``) are clipped where they are big: nothing bypasses it (docs/design.md#bounded-influence).
3. Sum ``S = sum_k w_k Delta_k`` per component; one client changes ``S`` by at most ``C`` in L2 (add/remove
   adjacency), so central DP adds ``N(0, (sigma C)^2)`` to every coordinate of every component (covered or not:
   coverage is private too) and of every extra.
4. Divide by **fixed, public** denominators: ``D_j = expected_clients * coverage_j`` (component rule; ``coverage_j``
   is the expected fraction of clients that train component ``j``, from the rank policy) or ``D = expected_clients``
   (zero_pad). New global: ``theta + S / D``. A data-dependent denominator (the actual count or HetLoRA's
   ``sum_j S_j``) would leak; that is also why HetLoRA's normalised sparsity weights ``p_k = S_k / sum_j S_j`` are
   not offered under DP. Capped sparsity weights ``w_k = min(1, S_k / S_cap)`` (``weights="sparsity"``) are: they
   depend only on client ``k``'s own upload and are at most 1.

Sensitivity of the released global per component ``j``: ``||theta'_j - theta_j|| <= w_max C / D_j`` (and jointly
over all components ``<= w_max C / min_j D_j``); on the published ``delta W_m = s B_m A_m`` one client moves it by at
most ``s (e ||A_m||_F + e ||B_m||_2 + e^2)`` with ``e = w_max C / min_j D_j`` (docs/privacy.md proves both).

The local model (``DPConfig(model="local")``) moves steps 2-3 to the client (:func:`privatize_update`): the client
clips and adds ``N(0, (sigma C)^2)`` to its own components before upload, so the server need not be trusted; each
upload is then a Gaussian mechanism of sensitivity ``2 C`` (replace-one) and is accounted without sampling
amplification.

The ``(epsilon, delta)`` spent over the rounds comes from Opacus's accountants (``opacus.accountants``, RDP by
default, PRV optional), never a hand-written one; install with ``pip install peft-hetlora[privacy]``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...adapter import module_ranks
from ..component_view import Layout, float64_a, float64_b, previous_factors, to_state_dict, validate_round
from ..streaming import AggregationResult, ClientUpdate, update_norm
from .dp_config import DPConfig, DPConfigError, dp_config_from_dict, privacy_spent  # noqa: F401
from .dp_config import positive_setting as _positive

__all__ = [
    "DP_METHODS",
    "DPAggregationResult",
    "DPConfig",
    "DPConfigError",
    "dp_aggregate",
    "dp_config_from_dict",
    "privacy_spent",
    "privatize_update",
]

DP_METHODS: tuple[str, ...] = ("component", "zero_pad")
"""``component``: the component rule (``rankwise`` with public weights); ``zero_pad``: zero_pad / fedavg."""


@dataclass
class DPAggregationResult(AggregationResult):
    """An :class:`AggregationResult` of a DP round plus its accounting record.

    ``weights`` holds the public weights ``w_k`` (divided by a fixed denominator, so they need not sum to 1);
    ``norms`` and ``clip_scales`` stay empty: they are per-client, data-dependent values a DP round must not publish.
    """

    privacy: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The base summary plus ``"privacy"`` (the accounting record of :func:`privacy_spent`)."""
        out = super().summary()
        out["privacy"] = dict(self.privacy)
        return out


def _denominators(config: DPConfig, method: str, r_max: int) -> torch.Tensor:
    if config.expected_clients is None:
        raise DPConfigError(
            "DP aggregation needs a public denominator: DPConfig(expected_clients=q*N) or population=N"
        )
    cov = torch.ones(r_max, dtype=torch.float64)
    if method == "component" and config.expected_coverage is not None:
        if len(config.expected_coverage) != r_max:
            raise DPConfigError(
                f"DPConfig.expected_coverage has {len(config.expected_coverage)} entries, r_max is {r_max}: give one "
                "fraction per component of the global adapter"
            )
        cov = torch.tensor(config.expected_coverage, dtype=torch.float64)
    return cov * float(config.expected_clients)


def _contribution(
    update: ClientUpdate,
    layout: Layout,
    prev: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    prev_extras: Mapping[str, torch.Tensor],
    method: str,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """``Delta_k`` relative to the global: per module ``(dA, dB)`` over ``r_k`` (component) or ``r_max`` (zero_pad)."""
    ranks = layout.ranks(update)
    sd = update.state_dict
    factors = {}
    for name, spec in layout.modules.items():
        a, b = float64_a(sd[spec.a_key]), float64_b(sd[spec.b_key], name)
        pa, pb = prev[name]
        r = ranks[name]
        if method == "component":
            factors[name] = (a - pa[:r], b - pb[:, :r])
        else:
            da, db = -pa.clone(), -pb.clone()
            da[:r] += a
            db[:, :r] += b
            factors[name] = (da, db)
    extras = {key: sd[key].detach().to("cpu", torch.float64) - prev_extras[key] for key in layout.extras}
    return factors, extras


def _l2(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], extras: Mapping[str, torch.Tensor]) -> float:
    sq = sum(float((a * a).sum() + (b * b).sum()) for a, b in factors.values())
    sq += sum(float((e * e).sum()) for e in extras.values())
    return math.sqrt(sq)


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    gen = torch.Generator()
    gen.manual_seed(secrets.randbits(63))
    return gen


def _noise(shape: Sequence[int], std: float, generator: torch.Generator) -> torch.Tensor:
    if std == 0.0:
        return torch.zeros(tuple(shape), dtype=torch.float64)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * std


def dp_aggregate(
    updates: Iterable[ClientUpdate],
    *,
    config: DPConfig,
    r_max: int,
    previous: Mapping[str, torch.Tensor],
    generator: torch.Generator | None = None,
    method: str = "component",
    weights: Mapping[str, float] | str | None = None,
    rounds_so_far: int = 1,
    sparsity_cap: float | None = None,
    scaling: float = 1.0,
) -> DPAggregationResult:
    """One DP round: clip each client's change per component set, sum with public weights, add Gaussian noise
    (central model), divide by public denominators (see the module docstring for the formulas).

    Args:
        updates: the round's client updates (absolute factors at the client's rank, as uploaded).
        config: the :class:`DPConfig`.
        r_max: the global adapter's rank.
        previous: the global adapter these clients were sent (contributions are measured against it).
        generator: the noise source (a seeded ``torch.Generator`` for reproducible tests; default seeded from
            ``secrets``). Torch's generator is not a CSPRNG: a deployment facing a strong adversary should draw the
            noise from a cryptographic source.
        method: ``"component"`` (component rule / rankwise with public weights) or ``"zero_pad"`` (zero_pad / fedavg);
            ``"hetlora"``'s sparsity weights are data-dependent and refused.
        weights: public per-client weights in ``[0, 1]`` fixed before the round (default 1 for everyone), or
            ``"sparsity"``: HetLoRA-like *capped* sparsity weights ``w_k = min(1, S_k / sparsity_cap)`` with
            ``S_k = ||s B_k A_k||_F`` of the client's own upload. They depend on the client's data, but only on its
            own and are at most 1, so the contribution ``w_k clip(Delta_k)`` still has norm ``<= C`` and the
            sensitivity is unchanged; the denominators stay public (no ``sum_j S_j``), so choose ``expected_clients``
            as the expected weight sum. These weights are not reported in the result.
        sparsity_cap: the public cap ``S_cap`` for ``weights="sparsity"``.
        scaling: the LoRA scale ``s`` (enters ``S_k`` only).
        rounds_so_far: DP rounds spent including this one, for the accounting record.

    Returns:
        A :class:`DPAggregationResult`; ``privacy`` is :func:`privacy_spent` after ``rounds_so_far`` rounds.

    Example:
        >>> import torch
        >>> prev = {"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.zeros(4, 2)}
        >>> ups = [ClientUpdate(f"c{k}", {"m.lora_A.weight": torch.ones(r, 3), "m.lora_B.weight": torch.ones(4, r)},
        ...                     r, 1) for k, r in enumerate([1, 2])]
        >>> cfg = DPConfig(clip=100.0, noise_multiplier=0.0, delta=1e-5, expected_clients=2,
        ...                expected_coverage=(1.0, 0.5))
        >>> dp_aggregate(ups, config=cfg, r_max=2, previous=prev).state_dict["m.lora_A.weight"][:, 0].tolist()
        [1.0, 1.0]
    """
    if method not in DP_METHODS:
        hint = (
            " HetLoRA's sparsity weights S_k = ||delta W_k|| depend on the client's data and would leak; use "
            "'zero_pad' (same padding, public weights) or 'component'."
            if method == "hetlora"
            else ""
        )
        raise DPConfigError(f"unknown DP method {method!r}; choose one of {list(DP_METHODS)}.{hint}")
    if not isinstance(config, DPConfig):
        raise TypeError(f"config must be a DPConfig, got {type(config).__name__}")
    if config.model == "local" and method != "component":
        raise DPConfigError("local DP noises only the components a client uploads: use method='component'")
    if previous is None:
        raise DPConfigError(
            "dp_aggregate clips each client's change relative to the global it was sent: pass previous=that global"
        )
    items, layout = validate_round(updates, r_max)
    prev, prev_extras = previous_factors(previous, layout)
    den = _denominators(config, method, r_max)
    sparse_weights = weights == "sparsity"
    if sparse_weights:
        if sparsity_cap is None or not _positive("sparsity_cap", sparsity_cap):
            raise DPConfigError(
                "weights='sparsity' needs a public sparsity_cap > 0 (a bound on S_k = ||s B_k A_k||_F)"
            )
        public = {u.client_id: min(1.0, update_norm(u.state_dict, scaling) / float(sparsity_cap)) for u in items}
    elif isinstance(weights, str):
        raise DPConfigError(f"weights must be a mapping of public weights, None or 'sparsity', got {weights!r}")
    else:
        public = {u.client_id: 1.0 for u in items} if weights is None else dict(weights)
    for u in items:
        w = public.get(u.client_id)
        if w is None or isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
            raise DPConfigError(
                f"client {u.client_id!r} has public weight {w!r}; weights must be fixed numbers in [0, 1] for every "
                "client (the sensitivity is C times the largest weight)"
            )
    gen = _default_generator(generator)
    sum_a = {n: torch.zeros_like(p[0]) for n, p in prev.items()}
    sum_b = {n: torch.zeros_like(p[1]) for n, p in prev.items()}
    sum_x = {k: torch.zeros_like(v) for k, v in prev_extras.items()}
    central = config.model == "central"
    for u in items:
        factors, extras = _contribution(u, layout, prev, prev_extras, method)
        scale = float(public[u.client_id])
        if central:
            norm = _l2(factors, extras)
            if norm > config.clip:
                scale *= config.clip / norm
        for name, (da, db) in factors.items():
            r = da.shape[0]
            sum_a[name][:r] += scale * da
            sum_b[name][:, :r] += scale * db
        for key, dx in extras.items():
            sum_x[key] += scale * dx
    std = float(config.noise_multiplier) * config.clip if central else 0.0  # type: ignore[arg-type]
    dead = den <= 0
    safe = torch.where(dead, torch.ones_like(den), den)
    out_factors = {}
    for name, (pa, pb) in prev.items():
        na = (sum_a[name] + _noise(pa.shape, std, gen)) / safe.view(-1, 1)
        nb = (sum_b[name] + _noise(pb.shape, std, gen)) / safe.view(1, -1)
        na[dead], nb[:, dead] = 0.0, 0.0
        out_factors[name] = (pa + na, pb + nb)
    denom_x = float(config.expected_clients)  # type: ignore[arg-type]
    out_extras = {k: prev_extras[k] + (sum_x[k] + _noise(v.shape, std, gen)) / denom_x for k, v in sum_x.items()}
    record = privacy_spent(config, rounds_so_far)
    eps = record["epsilon"]
    messages = [
        f"DP-{config.model} {method}: clip {config.clip}, noise multiplier {config.noise_multiplier}, "
        f"epsilon {eps if eps is None else round(eps, 4)} at delta {config.delta:.3g} after {rounds_so_far} round(s)"
    ]
    if config.rounds is not None and rounds_so_far > config.rounds:
        messages.append(
            f"round {rounds_so_far} is past the planned {config.rounds} DP rounds: epsilon now exceeds the target"
        )
    return DPAggregationResult(
        state_dict=to_state_dict(layout, out_factors, out_extras),
        weights={} if sparse_weights else {u.client_id: float(public[u.client_id]) for u in items},
        ranks={u.client_id: int(u.rank) for u in items},
        method=f"dp_{method}",
        messages=messages,
        privacy=record,
    )


def privatize_update(
    state_dict: Mapping[str, torch.Tensor],
    global_state_dict: Mapping[str, torch.Tensor],
    *,
    config: DPConfig,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Local DP on the client: clip its change over its own components to ``C`` and add ``N(0, (sigma C)^2)``.

    Args:
        state_dict: the client's trained adapter at its rank ``r_k`` (what it would upload).
        global_state_dict: the global adapter it was sent (rank ``>= r_k``; only its first ``r_k`` components count).
        config: a ``DPConfig(model="local", ...)``.
        generator: the noise source (see :func:`dp_aggregate`).

    Returns:
        A new float32 state dict at rank ``r_k``: ``global[:r_k] + clip(Delta) + noise``; upload it instead.
        Keep self-pruning off under local DP: the uploaded rank is visible and pruning depends on the data.

    Example:
        >>> import torch
        >>> g = {"m.lora_A.weight": torch.zeros(4, 3), "m.lora_B.weight": torch.zeros(2, 4)}
        >>> mine = {"m.lora_A.weight": torch.full((2, 3), 10.0), "m.lora_B.weight": torch.zeros(2, 2)}
        >>> cfg = DPConfig(clip=1.0, noise_multiplier=0.0, delta=1e-5, model="local")
        >>> out = privatize_update(mine, g, config=cfg)
        >>> round(float(out["m.lora_A.weight"].norm()), 6), tuple(out["m.lora_A.weight"].shape)
        (1.0, (2, 3))
    """
    if not isinstance(config, DPConfig) or config.model != "local":
        raise DPConfigError("privatize_update is the local-DP client step: pass DPConfig(model='local', ...)")
    rank = max(module_ranks(state_dict).values())
    update = ClientUpdate("local", state_dict, rank=rank, num_examples=0)
    r_global = max(module_ranks(global_state_dict).values())
    items, layout = validate_round([update], max(rank, r_global))
    prev, prev_extras = previous_factors(global_state_dict, layout)
    factors, extras = _contribution(items[0], layout, prev, prev_extras, "component")
    norm = _l2(factors, extras)
    scale = min(1.0, config.clip / norm) if norm > 0 else 1.0
    std = float(config.noise_multiplier) * config.clip  # type: ignore[arg-type]
    gen = _default_generator(generator)
    out: dict[str, torch.Tensor] = {}
    for name, spec in layout.modules.items():
        da, db = factors[name]
        r = da.shape[0]
        pa, pb = prev[name]
        a = pa[:r] + scale * da + _noise(da.shape, std, gen)
        b = pb[:, :r] + scale * db + _noise(db.shape, std, gen)
        out[spec.a_key] = a.to(torch.float32).reshape(r, *spec.a_shape[1:])
        out[spec.b_key] = b.to(torch.float32).reshape(spec.d_out, r, *spec.b_shape[2:])
    for key, dx in extras.items():
        out[key] = (prev_extras[key] + scale * dx + _noise(dx.shape, std, gen)).to(torch.float32)
    return {key: out[key] for key in state_dict}
