"""Bounded influence: clip each client factor's difference from the factors it was sent
(docs/design.md#bounded-influence).

Because ``A`` and ``B`` are averaged separately, a bound on ``||s B_k A_k||`` alone bounds nothing (``A x 1e-6``,
``B x 1e6`` has an honest product). Here each factor is clipped on its own, around ``A0_k = truncate(previous, r_k)``
(``previous`` gathered at the client's component indices for a component-indexed upload; zeros without a previous
global): ``||A_k - A0_k||_F <= rho_A`` and ``||B_k - B0_k||_F <= rho_B``, norms over all modules.

* **adaptive** (:data:`DEFAULT_INFLUENCE_BOUND`, every engine's default): ``rho_A = c x median_k ||A_k - A0_k||_F``
  and ``rho_B`` alike over the round's uploads, ``c =`` :data:`DEFAULT_BOUND_MULTIPLIER`: a norm bound whose
  threshold follows the updates, as adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, arXiv 1905.03871)
  follows a quantile of the update norms;
* **fixed** ``clip_norm = C``: ``rho_A = rho_B = sqrt(C / s)``;
* **off**: only when the operator says so.

With ``a = ||A_prev||_F``, ``b = ||B_prev||_F``: the published global of ``hetlora`` / ``zero_pad`` / ``fedavg`` /
``flexlora`` obeys ``||delta W_new||_F <= s (a + rho_A)(b + rho_B)``, and replacing one client's upload at a fixed
weight ``p_k`` moves it by at most ``2 p_k s (rho_A (b + rho_B) + rho_B (a + rho_A))`` (docs/aggregation.md has the
derivation's steps and the ``rankwise`` variant).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..adapter import module_sq_norm

__all__ = [
    "ADAPTIVE",
    "DEFAULT_BOUND_MULTIPLIER",
    "DEFAULT_INFLUENCE_BOUND",
    "INFLUENCE_BOUNDS",
    "OFF",
    "adaptive_radii",
    "clip_factor_steps",
    "clip_to_sent_factors",
    "factor_steps",
    "parse_influence_bound",
]

ADAPTIVE = "adaptive"
OFF = "off"
INFLUENCE_BOUNDS: tuple[str, ...] = (ADAPTIVE, OFF)
"""The named influence bounds: ``"adaptive"`` (radii from the round's own uploads) and ``"off"``."""

#: The influence bound every engine (coordinator, Flower strategy, simulator) uses when the operator names none.
DEFAULT_INFLUENCE_BOUND = ADAPTIVE

#: ``c`` of the adaptive bound ``rho_A = c x median_k ||A_k - A0_k||_F`` (and ``rho_B`` alike). Honest step norms
#: of one round spread over a factor of about ``sqrt(r_max / r_min)`` from the ranks alone (2.8 for ranks 2..16) and
#: a little more from unequal data, so 4 leaves every honest client of an ordinary round untouched while one client
#: moves each factor of the global by at most 4 median steps times its weight (docs/aggregation.md).
DEFAULT_BOUND_MULTIPLIER = 4.0


def parse_influence_bound(value: Any) -> float | str:
    """The canonical influence-bound setting: a finite number ``C > 0`` (a fixed ``clip_norm``), ``"adaptive"`` or
    ``"off"``; ``None`` means ``"off"`` (the library's explicit "no bound").

    Raises:
        ValueError: anything else, with what to pass.

    Example:
        >>> parse_influence_bound(None), parse_influence_bound("adaptive"), parse_influence_bound(2)
        ('off', 'adaptive', 2.0)
    """
    if value is None:
        return OFF
    if isinstance(value, str):
        name = value.strip().lower()
        if name in INFLUENCE_BOUNDS:
            return name
        try:
            value = float(name)
        except ValueError:
            raise ValueError(
                f"clip_norm must be a number > 0, {ADAPTIVE!r} or {OFF!r}, got {value!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"clip_norm must be a finite number > 0, {ADAPTIVE!r} or {OFF!r}, got {value!r}")
    return float(value)


def _sent_factors(previous, a_key: str, b_key: str, a: torch.Tensor, b: torch.Tensor, components=None):
    """The components of the factors the client was sent, slot by slot (zeros beyond the previous rank / without one).

    Slot ``i`` holds component ``i`` for a prefix upload (``components=None``), else component ``components[i]``.
    """
    if previous is not None and components is None and previous[a_key].shape[0] >= a.shape[0]:
        # the common case (a prefix of a previous at least as wide): views, no zeros and no copy
        rank = a.shape[0]
        return (previous[a_key].detach().to("cpu", a.dtype)[:rank],
                previous[b_key].detach().to("cpu", b.dtype)[:, :rank])
    ref_a = torch.zeros(a.shape, dtype=a.dtype)
    ref_b = torch.zeros(b.shape, dtype=b.dtype)
    if previous is not None:
        prev_a = previous[a_key].detach().to("cpu", a.dtype)
        prev_b = previous[b_key].detach().to("cpu", b.dtype)
        if components is None:
            k = min(a.shape[0], prev_a.shape[0])
            ref_a[:k] = prev_a[:k]
            ref_b[:, :k] = prev_b[:, :k]
        else:
            held = [(slot, j) for slot, j in enumerate(components[: a.shape[0]]) if j < prev_a.shape[0]]
            if held:
                slots = torch.tensor([slot for slot, _ in held], dtype=torch.long)
                idx = torch.tensor([j for _, j in held], dtype=torch.long)
                ref_a[slots] = prev_a[idx]
                ref_b[:, slots] = prev_b[:, idx]
    return ref_a, ref_b


def factor_steps(
    modules: Mapping[str, tuple[str, str]],
    state_dict: Mapping[str, torch.Tensor],
    previous: Mapping[str, torch.Tensor] | None,
    *,
    components: tuple[int, ...] | None = None,
    sq_norms: dict[str, float] | None = None,
) -> tuple[float, float]:
    """``(||A_k - A0_k||_F, ||B_k - B0_k||_F)`` over all modules, in float64: how far a client moved each factor
    from the factors it was sent (``A0_k = truncate(previous, r_k)`` or gathered at ``components``; zeros without
    ``previous``). Cost ``O(r_k (d_in + d_out))`` per module; no product is formed. ``sq_norms``, if given,
    receives each module's ``||B A||_F^2`` (``module_sq_norm``) from the same float64 copies, so a pass that needs
    both converts each factor once.

    Example:
        >>> sd = {"m.lora_A.weight": torch.full((1, 4), 0.5), "m.lora_B.weight": torch.zeros(3, 1)}
        >>> factor_steps({"m": ("m.lora_A.weight", "m.lora_B.weight")}, sd, None)
        (1.0, 0.0)
    """
    sq_a = sq_b = 0.0
    for name, (a_key, b_key) in modules.items():
        a = state_dict[a_key].detach().to("cpu", torch.float64)
        b = state_dict[b_key].detach().to("cpu", torch.float64)
        if sq_norms is not None:
            sq_norms[name] = module_sq_norm(name, a, b)
        ref_a, ref_b = _sent_factors(previous, a_key, b_key, a, b, components)
        sq_a += float(torch.sum((a - ref_a) ** 2))
        sq_b += float(torch.sum((b - ref_b) ** 2))
    return math.sqrt(sq_a), math.sqrt(sq_b)


def adaptive_radii(steps: Sequence[tuple[float, float]], multiplier: float = DEFAULT_BOUND_MULTIPLIER
                   ) -> tuple[float, float, float, float]:
    """The adaptive bound of a round: ``rho_A = c x median_k ||A_k - A0_k||``, ``rho_B = c x median_k ||B_k - B0_k||``.

    Returns ``(rho_A, rho_B, median_A, median_B)``. The median is what fewer than half of the clients cannot move
    (norm-bounding defences; adaptive clipping of Andrew et al., "Differentially Private Learning with Adaptive
    Clipping", arXiv 1905.03871, tracks a quantile of the update norms the same way).

    Example:
        >>> adaptive_radii([(1.0, 0.1), (2.0, 0.2), (1e9, 1e9)], multiplier=4.0)
        (8.0, 0.8, 2.0, 0.2)
    """
    if not steps:
        raise ValueError("adaptive_radii needs the step norms of at least one client")
    med_a = statistics.median(a for a, _ in steps)
    med_b = statistics.median(b for _, b in steps)
    return multiplier * med_a, multiplier * med_b, med_a, med_b


def clip_factor_steps(
    modules: Mapping[str, tuple[str, str]],
    state_dict: Mapping[str, torch.Tensor],
    previous: Mapping[str, torch.Tensor] | None,
    radius_a: float,
    radius_b: float,
    *,
    components: tuple[int, ...] | None = None,
    sq_norms: dict[str, float] | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, float]:
    """Move a client's factors towards the ones it was sent until ``||A_k - A0_k||_F <= radius_a`` and
    ``||B_k - B0_k||_F <= radius_b`` (norms over all modules; computed in float64, so no finite upload overflows).

    Returns ``module -> (A, B)`` (the client's own tensors when nothing is clipped, else float32 copies) and the
    scales applied to the ``A`` and ``B`` differences (``1.0`` = unclipped). ``sq_norms``: as for
    :func:`factor_steps` (of the uploaded factors).

    Example:
        >>> sd = {"m.lora_A.weight": torch.full((1, 2), 3.0), "m.lora_B.weight": torch.full((2, 1), 1.0)}
        >>> _, sa, sb = clip_factor_steps({"m": ("m.lora_A.weight", "m.lora_B.weight")}, sd, None, 1.0, 10.0)
        >>> round(sa, 6), sb
        (0.235702, 1.0)
    """
    step_a, step_b = factor_steps(modules, state_dict, previous, components=components, sq_norms=sq_norms)
    scale_a = 1.0 if step_a <= radius_a else radius_a / step_a
    scale_b = 1.0 if step_b <= radius_b else radius_b / step_b
    clipped = {}
    for name, (a_key, b_key) in modules.items():
        if scale_a == 1.0 and scale_b == 1.0:
            clipped[name] = (state_dict[a_key].detach().to("cpu"), state_dict[b_key].detach().to("cpu"))
            continue
        a = state_dict[a_key].detach().to("cpu", torch.float64)
        b = state_dict[b_key].detach().to("cpu", torch.float64)
        ref_a, ref_b = _sent_factors(previous, a_key, b_key, a, b, components)
        # an unclipped factor is kept as uploaded (ref + 1.0 * (a - ref) would cancel digits of a tiny factor)
        new_a = a if scale_a == 1.0 else ref_a + scale_a * (a - ref_a)
        new_b = b if scale_b == 1.0 else ref_b + scale_b * (b - ref_b)
        clipped[name] = (new_a.to(torch.float32), new_b.to(torch.float32))
    return clipped, scale_a, scale_b


def clip_to_sent_factors(
    modules: Mapping[str, tuple[str, str]],
    state_dict: Mapping[str, torch.Tensor],
    previous: Mapping[str, torch.Tensor] | None,
    clip_norm: float,
    scaling: float,
    *,
    components: tuple[int, ...] | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """The fixed influence bound ``C``: :func:`clip_factor_steps` with both radii ``sqrt(C / s)``, i.e.
    ``sqrt(s) ||A_k - A0_k||_F <= sqrt(C)`` and ``sqrt(s) ||B_k - B0_k||_F <= sqrt(C)``.

    Args:
        modules: ``module -> (A key, B key)`` of ``state_dict`` (see ``keys.split_lora_keys``).
        state_dict: the client's adapter at its rank.
        previous: the global adapter the client was sent (``None``: clip around zero factors).
        clip_norm: ``C``; scaling: ``s``.
        components: the global component of each uploaded slot (``ClientUpdate.components``); the client was sent
            ``previous`` gathered at these indices. ``None``: the prefix ``range(r_k)``.

    Returns:
        ``module -> (A, B)`` (the client's own tensors when nothing is clipped, else float32 copies) and the smaller
        of the two factor scales (``1.0`` = unclipped).

    Example:
        >>> sd = {"m.lora_A.weight": torch.full((1, 2), 1e-6), "m.lora_B.weight": torch.full((2, 1), 1e6)}
        >>> factors, scale = clip_to_sent_factors({"m": ("m.lora_A.weight", "m.lora_B.weight")}, sd, None, 1.0, 1.0)
        >>> round(float(factors["m"][1].norm()), 6), scale < 1e-6
        (1.0, True)
    """
    radius = math.sqrt(clip_norm / scaling)
    clipped, scale_a, scale_b = clip_factor_steps(modules, state_dict, previous, radius, radius,
                                                  components=components)
    return clipped, min(scale_a, scale_b)
