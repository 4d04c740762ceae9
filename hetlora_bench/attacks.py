"""Poisoned clients for `hetlora simulate`: an attacker transforms its own upload before sending it.

Simulation only (issue 14's poisoned arm): each round a seeded fraction of the sampled clients are
attackers; after their honest local round they replace the factors they upload by

- ``"scale"``: ``B <- s * B`` (their delta W scaled by ``s``),
- ``"sign_flip"``: ``B <- -s * B`` (their delta W reversed and scaled),
- ``"unbalanced"``: ``B <- s * B``, ``A <- A / s`` (their delta W unchanged, so a clip on ``||B A||``
  passes it, but averaging A and B separately moves the global by the huge B; docs/design.md#bounded-influence).

Example:
    ```py
    >>> import torch
    >>> up = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 2)}
    >>> poison_upload(up, "sign_flip", 3.0)["m.lora_B.weight"][0, 0].item()
    -3.0
    ```
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import torch

from .arms import ATTACKS


def poison_upload(state: Mapping[str, torch.Tensor], attack: str, scale: float) -> dict[str, torch.Tensor]:
    """The upload an attacker sends instead of its honest `state` (PEFT keys ``...lora_A/B.weight``)."""
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}.")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"attack scale must be a positive number, got {scale!r}.")
    b_factor = -scale if attack == "sign_flip" else scale
    a_factor = 1.0 / scale if attack == "unbalanced" else 1.0
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_B." in key:
            out[key] = value * b_factor
        elif ".lora_A." in key:
            out[key] = value * a_factor
        else:
            out[key] = value.clone()
    return out


def choose_attackers(participants: Sequence[str], fraction: float, *, seed: int, round_idx: int) -> list[str]:
    """A seeded choice of ``round(fraction * len(participants))`` attackers among a round's participants.

    Example:
        ```py
        >>> len(choose_attackers(["a", "b", "c", "d", "e"], 0.4, seed=0, round_idx=0))
        2
        ```
    """
    count = min(len(participants), int(math.floor(fraction * len(participants) + 0.5)))
    rng = random.Random(f"attackers-{seed}-{round_idx}")
    return sorted(rng.sample(sorted(participants), count))
