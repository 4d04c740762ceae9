"""Independent numpy reference of the registered robust methods (``median``, ``trimmed_mean``) per component.

Plain loops over components and coordinates with ``np.median`` / an explicit sort-and-trim; nothing here calls
peft_hetlora. Dense extras are the capped data-size weighted mean (what the aggregator does for every method).
"""

from __future__ import annotations

import math

import numpy as np
from reference import capped_sizes, np_extras, np_modules, pad, to_np


def _stat(values: list[np.ndarray], rule: str, trim: float) -> np.ndarray:
    stack = np.stack(values)
    if rule == "median":
        return np.median(stack, axis=0)
    k = math.floor(trim * len(values))
    ordered = np.sort(stack, axis=0)
    return ordered[k: len(values) - k].mean(axis=0)


def robust_global(updates, r_max: int, rule: str, *, trim: float = 0.2, previous=None, min_clients: int = 1) -> dict:
    """Saved-key state dict of the robust global: component j of A (row) and B (column) over the clients covering j."""
    mods = [np_modules(u.state_dict) for u in updates]
    prev = np_modules(previous) if previous is not None else None
    out = {}
    for name in mods[0]:
        d_in, d_out = mods[0][name][0].shape[1], mods[0][name][1].shape[0]
        ga, gb = np.zeros((r_max, d_in)), np.zeros((d_out, r_max))
        if prev is not None:
            ga[:], gb[:] = pad(*prev[name], r_max)
        for j in range(r_max):
            cover = [m[name] for m in mods if m[name][0].shape[0] > j]
            if len(cover) >= max(1, min_clients):
                ga[j] = _stat([a[j] for a, _ in cover], rule, trim)
                gb[:, j] = _stat([b[:, j] for _, b in cover], rule, trim)
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = ga, gb
    w = capped_sizes([u.num_examples for u in updates], 10.0)
    w = w / w.sum()
    for key in np_extras(updates[0].state_dict):
        out[key] = sum(wk * to_np(u.state_dict[key]) for wk, u in zip(w, updates))
    return out
