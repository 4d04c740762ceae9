"""Bounded influence: clip each client factor's difference from the factors it was sent
(docs/design.md#bounded-influence).

Because ``A`` and ``B`` are averaged separately, a bound on ``||s B_k A_k||`` alone bounds nothing (``A x 1e-6``,
``B x 1e6`` has an honest product). Here each factor is clipped on its own, around ``A0_k = truncate(previous, r_k)``
(``previous`` gathered at the client's component indices for a component-indexed upload; zeros without a previous
global): ``sqrt(s) ||A_k - A0_k||_F <= sqrt(C)`` and ``sqrt(s) ||B_k - B0_k||_F <=
sqrt(C)``, norms over all modules. With ``a = sqrt(s) ||A_prev||_F``, ``b = sqrt(s) ||B_prev||_F``, ``c = sqrt(C)``:
the published global of ``hetlora`` / ``zero_pad`` / ``fedavg`` / ``flexlora`` obeys
``||delta W_new||_F <= (a + c)(b + c)``, and replacing one client's upload at a fixed weight ``p_k`` moves it by at
most ``2 p_k c (a + b + 2c)`` (docs/aggregation.md has the derivation's steps and the ``rankwise`` variant).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = ["clip_to_sent_factors"]


def _sent_factors(previous, a_key: str, b_key: str, a: torch.Tensor, b: torch.Tensor, components=None):
    """The components of the factors the client was sent, slot by slot (zeros beyond the previous rank / without one).

    Slot ``i`` holds component ``i`` for a prefix upload (``components=None``), else component ``components[i]``.
    """
    ref_a = torch.zeros(a.shape, dtype=torch.float32)
    ref_b = torch.zeros(b.shape, dtype=torch.float32)
    if previous is not None:
        prev_a = previous[a_key].detach().to("cpu", torch.float32)
        prev_b = previous[b_key].detach().to("cpu", torch.float32)
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


def clip_to_sent_factors(
    modules: Mapping[str, tuple[str, str]],
    state_dict: Mapping[str, torch.Tensor],
    previous: Mapping[str, torch.Tensor] | None,
    clip_norm: float,
    scaling: float,
    *,
    components: tuple[int, ...] | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """Move a client's factors towards the ones it was sent until each difference is in the ``sqrt(C / s)`` ball.

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
    refs, diffs = {}, {}
    sq_a = sq_b = 0.0
    for name, (a_key, b_key) in modules.items():
        a = state_dict[a_key].detach().to("cpu", torch.float32)
        b = state_dict[b_key].detach().to("cpu", torch.float32)
        ref_a, ref_b = _sent_factors(previous, a_key, b_key, a, b, components)
        d_a, d_b = a - ref_a, b - ref_b
        refs[name], diffs[name] = (ref_a, ref_b), (d_a, d_b)
        sq_a += float(torch.sum(d_a.double() ** 2))
        sq_b += float(torch.sum(d_b.double() ** 2))
    radius = math.sqrt(clip_norm / scaling)
    scale_a = 1.0 if math.sqrt(sq_a) <= radius else radius / math.sqrt(sq_a)
    scale_b = 1.0 if math.sqrt(sq_b) <= radius else radius / math.sqrt(sq_b)
    clipped = {}
    for name, (a_key, b_key) in modules.items():
        if scale_a == 1.0 and scale_b == 1.0:
            clipped[name] = (state_dict[a_key].detach().to("cpu"), state_dict[b_key].detach().to("cpu"))
            continue
        (ref_a, ref_b), (d_a, d_b) = refs[name], diffs[name]
        clipped[name] = (ref_a + scale_a * d_a, ref_b + scale_b * d_b)
    return clipped, min(scale_a, scale_b)
