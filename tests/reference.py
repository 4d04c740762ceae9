"""Independent numpy reference of the aggregation methods, written from docs/design.md#the-algorithm.

Dense ``B @ A`` products, float64 and plain loops: nothing here calls peft_hetlora. Shared by the aggregation and
Flower tests. Every function takes objects with ``client_id``, ``state_dict`` (tensors or arrays), ``rank`` and
``num_examples`` attributes (``ClientUpdate``) and returns module name -> (A, B) numpy arrays at ``r_max``.
"""

from __future__ import annotations

import math

import numpy as np

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def to_np(value) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().double().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def np_modules(sd) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module name -> (A, B) as float64 arrays, in key order."""
    names = [key[: -len(A_SUFFIX)] for key in sd if key.endswith(A_SUFFIX)]
    return {name: (to_np(sd[name + A_SUFFIX]), to_np(sd[name + B_SUFFIX])) for name in names}


def np_extras(sd) -> dict[str, np.ndarray]:
    return {key: to_np(v) for key, v in sd.items() if not key.endswith((A_SUFFIX, B_SUFFIX))}


def module_norms(mods, s: float) -> dict[str, float]:
    return {name: float(np.linalg.norm(s * (b @ a))) for name, (a, b) in mods.items()}


def norm(mods, s: float) -> float:
    """S_k = ||s B A||_F over all modules, from dense products."""
    return math.sqrt(sum(v**2 for v in module_norms(mods, s).values()))


def pad(a: np.ndarray, b: np.ndarray, r_max: int) -> tuple[np.ndarray, np.ndarray]:
    r = a.shape[0]
    pa = np.zeros((r_max, a.shape[1]))
    pb = np.zeros((b.shape[0], r_max))
    pa[:r], pb[:, :r] = a, b
    return pa, pb


def indices_of(u) -> list[int]:
    """The global component of each uploaded slot: ``u.components``, or range(rank) without it."""
    comps = getattr(u, "components", None)
    return list(range(u.rank)) if comps is None else [int(j) for j in comps]


def clip(updates, s: float, clip_norm: float | None, previous=None):
    """Per client: (clipped module factors, S of the clipped factors, min factor scale).

    Each factor is moved towards the components of ``previous`` the client was sent (its indices; zeros without
    ``previous``) until
    sqrt(s) ||A - A0||_F <= sqrt(C) and sqrt(s) ||B - B0||_F <= sqrt(C), norms over all modules.
    """
    prev = np_modules(previous) if previous is not None else None
    out = []
    for u in updates:
        mods = np_modules(u.state_dict)
        if clip_norm is None:
            out.append((mods, norm(mods, s), 1.0))
            continue
        refs = {}
        for name, (a, b) in mods.items():
            ra, rb = np.zeros_like(a), np.zeros_like(b)
            if prev is not None:
                for slot, j in enumerate(indices_of(u)[: a.shape[0]]):  # the components this client was sent
                    if j < prev[name][0].shape[0]:
                        ra[slot], rb[:, slot] = prev[name][0][j], prev[name][1][:, j]
            refs[name] = (ra, rb)
        da = math.sqrt(sum(np.sum((a - refs[n][0]) ** 2) for n, (a, _) in mods.items()))
        db = math.sqrt(sum(np.sum((b - refs[n][1]) ** 2) for n, (_, b) in mods.items()))
        radius = math.sqrt(clip_norm / s)
        ca = min(1.0, radius / da) if da > 0 else 1.0
        cb = min(1.0, radius / db) if db > 0 else 1.0
        clipped = {
            n: (refs[n][0] + ca * (a - refs[n][0]), refs[n][1] + cb * (b - refs[n][1])) for n, (a, b) in mods.items()
        }
        out.append((clipped, norm(clipped, s), min(ca, cb)))
    return out


def capped_sizes(sizes, ratio: float | None) -> np.ndarray:
    """n_k' = min(n_k, ratio x median of the positive n_k)."""
    n = np.asarray(sizes, dtype=np.float64)
    positive = n[n > 0]
    if ratio is None or positive.size < 2:
        return n
    return np.minimum(n, ratio * float(np.median(positive)))


def weighted(updates, weights, r_max: int, mods_list=None):
    """sum_k w_k pad(A_k), sum_k w_k pad(B_k), extras sum_k w_k x_k, with w normalised."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mods_list = mods_list or [np_modules(u.state_dict) for u in updates]
    out = {}
    for name in mods_list[0]:
        acc_a = sum(wk * pad(*mods[name], r_max)[0] for wk, mods in zip(w, mods_list))
        acc_b = sum(wk * pad(*mods[name], r_max)[1] for wk, mods in zip(w, mods_list))
        out[name] = (acc_a, acc_b)
    extras = {}
    for key in np_extras(updates[0].state_dict):
        extras[key] = sum(wk * to_np(u.state_dict[key]) for wk, u in zip(w, updates))
    return out, extras, w


def hetlora(updates, r_max: int, s: float, clip_norm=None, per_module=False, previous=None):
    """HetLoRA (arXiv 2401.06432): zero padding, sparsity weights S_k (of the clipped factors)."""
    clipped = clip(updates, s, clip_norm, previous)
    client_w = np.array([sk for _, sk, _ in clipped])
    out = {}
    for name in clipped[0][0]:
        if per_module:
            w = np.array([np.linalg.norm(s * (mods[name][1] @ mods[name][0])) for mods, _, _ in clipped])
        else:
            w = client_w
        w = w / w.sum()
        out[name] = (
            sum(wk * pad(*mods[name], r_max)[0] for wk, (mods, _, _) in zip(w, clipped)),
            sum(wk * pad(*mods[name], r_max)[1] for wk, (mods, _, _) in zip(w, clipped)),
        )
    p = client_w / client_w.sum()
    extras = {key: sum(pk * to_np(u.state_dict[key]) for pk, u in zip(p, updates))
              for key in np_extras(updates[0].state_dict)}
    return out, extras, p


def zero_pad(updates, r_max: int, s: float = 1.0, clip_norm=None, previous=None, cap_ratio: float | None = 10.0):
    """zero_pad / fedavg: zero padding, data-size weights (capped at cap_ratio x the median)."""
    clipped = clip(updates, s, clip_norm, previous)
    sizes = capped_sizes([u.num_examples for u in updates], cap_ratio)
    return weighted(updates, sizes, r_max, [mods for mods, _, _ in clipped])


def starts_at_previous(clipped, previous, r_max: int):
    """Per module of `clipped`: (name, d_in, d_out, A, B), the r_max global factors before any client counts
    (`previous` zero-padded to r_max, else zeros)."""
    prev = np_modules(previous) if previous is not None else None
    for name, (a0, b0) in clipped[0][0].items():
        d_in, d_out = a0.shape[1], b0.shape[0]
        ga, gb = np.zeros((r_max, d_in)), np.zeros((d_out, r_max))
        if prev is not None:
            ga[:], gb[:] = pad(*prev[name], r_max)
        yield name, d_in, d_out, ga, gb


def rankwise(updates, r_max: int, s: float, previous=None, per_module=False, data_weights=False):
    """RBLA (arXiv 2408.08699): component j averaged over the clients covering it; uncovered keep previous."""
    clipped = clip(updates, s, None)
    out = {}
    for name, _, _, ga, gb in starts_at_previous(clipped, previous, r_max):
        for j in range(r_max):
            num_a, num_b, den = 0.0, 0.0, 0.0
            for u, (mods, sk, _) in zip(updates, clipped):
                a, b = mods[name]
                if a.shape[0] > j:  # this client covers component j
                    w = np.linalg.norm(s * (b @ a)) if per_module else sk
                    w = u.num_examples if data_weights else w
                    num_a, num_b, den = num_a + w * a[j], num_b + w * b[:, j], den + w
            if den > 0:
                ga[j], gb[:, j] = num_a / den, num_b / den
        out[name] = (ga, gb)
    return out


def flexlora_dense(updates, cap_ratio: float | None = 10.0) -> dict[str, np.ndarray]:
    """FlexLoRA (arXiv 2402.11505): the data-weighted sum of dense B_k A_k (before the SVD)."""
    n = capped_sizes([u.num_examples for u in updates], cap_ratio)
    w = n / n.sum()
    mods_list = [np_modules(u.state_dict) for u in updates]
    return {name: sum(wk * (mods[name][1] @ mods[name][0]) for wk, mods in zip(w, mods_list)) for name in mods_list[0]}


def best_rank_k(dense: np.ndarray, k: int) -> np.ndarray:
    u, sv, vt = np.linalg.svd(dense, full_matrices=False)
    k = min(k, len(sv))
    return (u[:, :k] * sv[:k]) @ vt[:k]


def delta_w(factors: dict[str, tuple[np.ndarray, np.ndarray]], s: float) -> dict[str, np.ndarray]:
    """module -> s B A (dense) of module name -> (A, B)."""
    return {name: s * (b @ a) for name, (a, b) in factors.items()}


def frob(dense: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(v**2)) for v in dense.values()))


def component_rule(updates, r_max: int, s: float, previous=None, data_weights=False, clip_norm=None,
                   cap_ratio: float | None = 10.0, per_module=False):
    """The general component rule (docs/design.md#component-rule), one component at a time with explicit loops.

    Client k's slot i is global component indices_of(u)[i]; component j of the new global is
    sum_{k: j in I_k} w_k x_k[slot_k(j)] / sum_{k: j in I_k} w_k, w_k = S_k (dense ||s B A||_F of the clipped
    factors; with per_module the module's own ||s B_m A_m||_F) or the capped n_k; components nobody trained keep
    previous (zeros without one).
    """
    clipped = clip(updates, s, clip_norm, previous)
    sizes = capped_sizes([u.num_examples for u in updates], cap_ratio)
    out = {}
    for name, d_in, d_out, ga, gb in starts_at_previous(clipped, previous, r_max):
        for j in range(r_max):
            num_a, num_b, den = np.zeros(d_in), np.zeros(d_out), 0.0
            for k, (u, (mods, sk, _)) in enumerate(zip(updates, clipped)):
                a, b = mods[name]
                slots = indices_of(u)[: a.shape[0]]
                if j not in slots:
                    continue
                slot = slots.index(j)
                w = sizes[k] if data_weights else sk
                if per_module:
                    w = np.linalg.norm(s * (b @ a))
                num_a, num_b, den = num_a + w * a[slot], num_b + w * b[:, slot], den + w
            if den > 0:
                ga[j], gb[:, j] = num_a / den, num_b / den
        out[name] = (ga, gb)
    return out


def scatter_pad(updates, r_max: int, s: float, data_weights=False, cap_ratio: float | None = 10.0):
    """hetlora / zero_pad on component-indexed uploads: each client scattered to its indices in zero r_max
    factors, then sum_k p_k scatter(A_k) with p_k ~ S_k (or capped n_k) over all clients."""
    mods_list = [np_modules(u.state_dict) for u in updates]
    if data_weights:
        w = capped_sizes([u.num_examples for u in updates], cap_ratio)
    else:
        w = np.array([norm(mods, s) for mods in mods_list])
    w = w / w.sum()
    out = {}
    for name, (a0, b0) in mods_list[0].items():
        ga, gb = np.zeros((r_max, a0.shape[1])), np.zeros((b0.shape[0], r_max))
        for wk, u, mods in zip(w, updates, mods_list):
            a, b = mods[name]
            for slot, j in enumerate(indices_of(u)[: a.shape[0]]):
                ga[j] += wk * a[slot]
                gb[:, j] += wk * b[:, slot]
        out[name] = (ga, gb)
    return out


def component_fedavg(updates, r_max: int, s: float, previous=None, cap_ratio: float | None = 10.0):
    """``component_fedavg``: component j of the new global is sum_k n_k x_k(j) / sum_k n_k over every client, where
    x_k(j) is the client's slot holding j when it trained j and the previous global's component j when it did not
    (zeros without a previous global); n_k capped at cap_ratio x the median."""
    sizes = capped_sizes([u.num_examples for u in updates], cap_ratio)
    mods_list = [np_modules(u.state_dict) for u in updates]
    prev = np_modules(previous) if previous is not None else None
    out = {}
    for name, (a0, b0) in mods_list[0].items():
        d_in, d_out = a0.shape[1], b0.shape[0]
        ga, gb = np.zeros((r_max, d_in)), np.zeros((d_out, r_max))
        for j in range(r_max):
            for n_k, u, mods in zip(sizes, updates, mods_list):
                a, b = mods[name]
                slots = list(indices_of(u)[: a.shape[0]])
                if j in slots:
                    xa, xb = a[slots.index(j)], b[:, slots.index(j)]
                elif prev is not None:
                    xa, xb = prev[name][0][j], prev[name][1][:, j]
                else:
                    xa, xb = np.zeros(d_in), np.zeros(d_out)
                ga[j] += n_k * xa / sum(sizes)
                gb[:, j] += n_k * xb / sum(sizes)
        out[name] = (ga, gb)
    return out


def flexlora_held_dense(updates, r_max: int, previous=None, cap_ratio: float | None = 10.0) -> dict[str, np.ndarray]:
    """``flexlora_held`` before its SVD: sum_k p_k W_k, where W_k is the adapter client k held, built column by
    column: its uploaded slots, plus the previous global's component j (rank-one B_prev[:, j] A_prev[j]) for every
    j < r_max it did not upload (nothing without a previous global); p_k = capped n_k / sum."""
    sizes = capped_sizes([u.num_examples for u in updates], cap_ratio)
    p = sizes / sizes.sum()
    mods_list = [np_modules(u.state_dict) for u in updates]
    prev = np_modules(previous) if previous is not None else None
    out = {}
    for name, (a0, b0) in mods_list[0].items():
        dense = np.zeros((b0.shape[0], a0.shape[1]))
        for p_k, u, mods in zip(p, updates, mods_list):
            a, b = mods[name]
            held = np.zeros_like(dense)
            for slot in range(a.shape[0]):
                held += np.outer(b[:, slot], a[slot])
            uploaded = indices_of(u)[: a.shape[0]]
            for j in range(r_max):
                if prev is not None and j not in uploaded:
                    held += np.outer(prev[name][1][:, j], prev[name][0][j])
            dense += p_k * held
        out[name] = dense
    return out


def factor_steps(u, previous=None) -> tuple[float, float]:
    """(||A - A0||_F, ||B - B0||_F) over all modules of one update, A0/B0 the components of ``previous`` it was sent
    (zeros without one), by explicit loops over its slots."""
    prev = np_modules(previous) if previous is not None else None
    sq_a = sq_b = 0.0
    for name, (a, b) in np_modules(u.state_dict).items():
        ra, rb = np.zeros_like(a), np.zeros_like(b)
        if prev is not None:
            for slot, j in enumerate(indices_of(u)[: a.shape[0]]):
                if j < prev[name][0].shape[0]:
                    ra[slot], rb[:, slot] = prev[name][0][j], prev[name][1][:, j]
        sq_a += float(np.sum((a - ra) ** 2))
        sq_b += float(np.sum((b - rb) ** 2))
    return math.sqrt(sq_a), math.sqrt(sq_b)


def adaptive_radii(updates, previous=None, multiplier: float = 4.0) -> tuple[float, float]:
    """The adaptive bound: (c x median_k ||A_k - A0_k||, c x median_k ||B_k - B0_k||) over ``updates``."""
    steps = np.array([factor_steps(u, previous) for u in updates])
    return multiplier * float(np.median(steps[:, 0])), multiplier * float(np.median(steps[:, 1]))


def clip_radii(updates, radius_a: float, radius_b: float, previous=None) -> list:
    """Each update with its factors moved towards the ones it was sent until ||A - A0|| <= radius_a and
    ||B - B0|| <= radius_b (over all modules), as float64 ``ClientUpdate``-like objects the references above read."""
    prev = np_modules(previous) if previous is not None else None
    out = []
    for u in updates:
        da, db = factor_steps(u, previous)
        ca = min(1.0, radius_a / da) if da > 0 else 1.0
        cb = min(1.0, radius_b / db) if db > 0 else 1.0
        sd = {}
        for name, (a, b) in np_modules(u.state_dict).items():
            ra, rb = np.zeros_like(a), np.zeros_like(b)
            if prev is not None:
                for slot, j in enumerate(indices_of(u)[: a.shape[0]]):
                    if j < prev[name][0].shape[0]:
                        ra[slot], rb[:, slot] = prev[name][0][j], prev[name][1][:, j]
            sd[f"{name}.lora_A.weight"] = a if ca == 1.0 else ra + ca * (a - ra)
            sd[f"{name}.lora_B.weight"] = b if cb == 1.0 else rb + cb * (b - rb)
        out.append(_Clipped(u.client_id, sd, u.rank, u.num_examples, u.components))
    return out


class _Clipped:
    """A plain record with the fields of a ClientUpdate the references read (numpy factors)."""

    def __init__(self, client_id, state_dict, rank, num_examples, components):
        self.client_id, self.state_dict, self.rank = client_id, state_dict, rank
        self.num_examples, self.components = num_examples, components
