"""FlexLoRA's streaming form: the exact factored path below the switch, the one-pass two-sided sketch above it.

References are independent of the code: numpy's SVD of the dense ``W = sum_k p_k B_k A_k`` (held: plus the previous
global's components each client did not upload) built here from the clients' factors and hand-computed weights.
The error bound is Tropp, Yurtsever, Udell and Cevher 2017 (arXiv 1609.00048), Theorem 4.3, as stated in
docs/aggregation.md: ``E ||W - W_hat||_F^2 <= 4 tau_{r+1}^2(W)`` for ``l = 2r + 1``, ``m = 2l + 1``, and
``||W - [W_hat]_r||_F <= tau_{r+1}(W) + 2 ||W - W_hat||_F`` for every draw.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_hetlora.federated.aggregation import ClientUpdate, aggregate
from peft_hetlora.federated.aggregation.methods import register_aggregation, unregister_aggregation
from peft_hetlora.federated.aggregation.methods.flexlora import FactorStack, FlexLoRA, FlexLoRAHeld
from peft_hetlora.federated.aggregation.methods.sketch import TwoSidedSketch, sketch_sizes

A_KEY, B_KEY = "m.lora_A.weight", "m.lora_B.weight"


def _clients(rng: np.random.Generator, d_out: int, d_in: int, ranks: list[int], basis: tuple | None = None,
             decay: float = 0.0) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """``(B_k, A_k, n_k)`` float32-representable; with ``basis = (U0, V0)`` every product lies in ``U0 . V0``."""
    out = []
    for k, r in enumerate(ranks):
        if basis is None:
            b = rng.standard_normal((d_out, r)) * np.exp(-decay * k)
            a = rng.standard_normal((r, d_in))
        else:
            u0, v0 = basis
            b = u0 @ rng.standard_normal((u0.shape[1], r))
            a = rng.standard_normal((r, v0.shape[0])) @ v0
        out.append((b.astype(np.float32), a.astype(np.float32), int(rng.integers(20, 40))))
    return out


def _updates(clients) -> list[ClientUpdate]:
    return [ClientUpdate(f"c{k:03d}", {A_KEY: torch.from_numpy(a), B_KEY: torch.from_numpy(b)}, rank=a.shape[0],
                         num_examples=n) for k, (b, a, n) in enumerate(clients)]


def _dense(clients, previous: tuple[np.ndarray, np.ndarray] | None = None, r_max: int = 0) -> np.ndarray:
    """``W = sum_k p_k (B_k A_k + held rest)``, ``p_k = n_k / sum n`` (every n_k within the 10 x median cap)."""
    total = float(sum(n for _, _, n in clients))
    w = 0.0
    for b, a, n in clients:
        prod = b.astype(np.float64) @ a.astype(np.float64)
        if previous is not None:
            pb, pa = previous
            r = a.shape[0]
            prod = prod + pb[:, r:r_max].astype(np.float64) @ pa[r:r_max].astype(np.float64)
        w = w + n / total * prod
    return w


def _best(w: np.ndarray, r: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def _product(res) -> np.ndarray:
    return res.state_dict[B_KEY].double().numpy() @ res.state_dict[A_KEY].double().numpy()


def _with_method(method: FlexLoRA, updates, **kwargs):
    register_aggregation("flex_sketch_test", method)
    try:
        return aggregate(updates, method="flex_sketch_test", **kwargs)
    finally:
        unregister_aggregation("flex_sketch_test")


# ---------------------------------------------------------------------------------------------- below the switch
@pytest.mark.parametrize("held", [False, True])
def test_below_the_switch_is_the_exact_path_bit_for_bit(held):
    """sum r_k <= fold_at (77 here): auto is the exact factored path (identical bits) and numpy's best rank-r_max."""
    rng = np.random.default_rng(0)
    d_out, d_in, r_max = 160, 140, 8
    clients = _clients(rng, d_out, d_in, ([2, 5, 8, 3, 8, 6, 1, 8] * 2)[:-1])  # sum 74 <= fold_at = 77
    prev = (rng.standard_normal((d_out, r_max)).astype(np.float32),
            rng.standard_normal((r_max, d_in)).astype(np.float32))
    previous = {A_KEY: torch.from_numpy(prev[1]), B_KEY: torch.from_numpy(prev[0])} if held else None
    name = "flexlora_held" if held else "flexlora"
    res = aggregate(_updates(clients), method=name, r_max=r_max, previous=previous)
    cls = FlexLoRAHeld if held else FlexLoRA
    exact = _with_method(cls(svd="exact"), _updates(clients), r_max=r_max, previous=previous)
    for key in (A_KEY, B_KEY):
        assert torch.equal(res.state_dict[key], exact.state_dict[key])
    assert res.summary()["factorization"]["m"] == {"path": "exact", "components": 74}
    w = _dense(clients, prev if held else None, r_max)
    best = _best(w, r_max)
    assert np.linalg.norm(_product(res) - best) <= 1e-5 * np.linalg.norm(best)


# ---------------------------------------------------------------------------------------------- above the switch
@pytest.mark.parametrize("held", [False, True])
def test_above_the_switch_exact_when_rank_at_most_l(held):
    """auto above min(d): the sketch; rank(W) <= l = 2 r_max + 1 makes it reproduce numpy's best rank-r_max."""
    rng = np.random.default_rng(1)
    d_out, d_in, r_max, rank_w = 300, 200, 8, 14  # l = 17 >= 14
    u0 = np.linalg.qr(rng.standard_normal((d_out, rank_w)))[0]
    v0 = np.linalg.qr(rng.standard_normal((d_in, rank_w)))[0].T
    clients = _clients(rng, d_out, d_in, [4, 8, 2, 8] * 15, basis=(u0, v0))  # sum 330 > 200: switches
    prev = ((u0 @ rng.standard_normal((rank_w, r_max))).astype(np.float32),
            (rng.standard_normal((r_max, rank_w)) @ v0).astype(np.float32))
    previous = {A_KEY: torch.from_numpy(prev[1]), B_KEY: torch.from_numpy(prev[0])} if held else None
    res = aggregate(_updates(clients), method="flexlora_held" if held else "flexlora", r_max=r_max,
                    previous=previous)
    info = json.loads(json.dumps(res.summary()))["factorization"]["m"]  # what summary.json records
    assert info == {"path": "sketch", "components": 330, "range_size": 17, "corange_size": 35}
    w = _dense(clients, prev if held else None, r_max)
    assert np.linalg.matrix_rank(w) <= 17
    best = _best(w, r_max)
    assert np.linalg.norm(_product(res) - best) <= 1e-5 * np.linalg.norm(best)  # float32 output: ~1e-7


def test_sketch_error_within_the_bound_on_full_rank_data():
    """Random full-rank W, six sketch seeds: the deterministic truncation inequality per draw, and the theorem.

    Margins: ``||W - [W_hat]_r|| <= tau + 2 ||W - W_hat||`` holds for every draw (float slack 1e-6 relative). The
    theorem bounds an expectation: per draw we allow ``||W - W_hat||^2 <= 30 x 4 tau^2`` (Markov: a random seed
    fails with probability <= 1/30, six seeds <= 1/5 by the union bound; these fixed seeds are deterministic), and
    the six draws' mean of ``||W - W_hat||^2`` must be below the expectation bound ``4 tau^2`` itself (Gaussian sketch
    errors concentrate below it: observed 0.41-0.55 of it, mean 0.48).
    """
    rng = np.random.default_rng(2)
    d_out, d_in, r_max = 120, 100, 4
    clients = _clients(rng, d_out, d_in, [4, 2, 3, 4] * 10, decay=0.08)  # 130 components: W full rank (100)
    w = _dense(clients)
    sig = np.linalg.svd(w, compute_uv=False)
    assert sig[-1] > 1e-6 * sig[0]
    tau = float(np.sqrt(np.sum(sig[r_max:] ** 2)))
    total = float(sum(n for _, _, n in clients))
    ratios = []
    for seed in range(6):
        sk = TwoSidedSketch(d_out, d_in, r_max, seed)
        for b, a, n in clients:
            sk.add(torch.from_numpy(b), torch.from_numpy(a), n / total)
        hat_b, hat_a = sk.factors(sk.range_size)  # W_hat itself (rank <= l)
        err_hat = float(np.linalg.norm(w - hat_b.numpy() @ hat_a.numpy()))
        ratios.append(err_hat**2 / (4 * tau**2))
        assert err_hat**2 <= 30 * 4 * tau**2
        res = _with_method(FlexLoRA(svd="sketch", seed=seed), _updates(clients), r_max=r_max)
        err = float(np.linalg.norm(w - _product(res)))
        assert err <= (tau + 2 * err_hat) * (1 + 1e-6)
        assert err >= tau * (1 - 1e-6)  # nothing beats Eckart-Young: a check of the reference itself
    assert np.mean(ratios) <= 1.0


# ---------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("svd,held", [("auto", False), ("auto", True), ("sketch", False)])
def test_state_does_not_grow_with_the_number_of_clients(svd, held):
    """Bytes of the accumulator's tensors after 16 and after 256 clients: the sketch plus at most a flush's buffer
    (``flush_at + r_max`` float32 components), equal to the sketch alone once the buffer is flushed."""
    rng = np.random.default_rng(3)
    d_out, d_in, r_max = 64, 40, 4
    stack = FactorStack("m", (r_max, d_in), (d_out, r_max), r_max, svd=svd, oversample=4, held=held)
    sizes = {}
    for k in range(256):
        r = int(rng.integers(3, r_max + 1))  # 16 clients: >= 48 > min(d) = 40 components, past the switch
        stack.add(f"c{k}", torch.randn(r, d_in), torch.randn(d_out, r), 1, 1.0)
        if k + 1 in (16, 256):
            sizes[k + 1] = stack.state_bytes()
    assert stack.describe()["path"] == "sketch"
    l_size, m_size = sketch_sizes(r_max, d_out, d_in)
    # Y, X float64; Omega, Psi float32 (+ missing); the buffer: 4 bytes a factor entry, 8 a column weight
    sketch = 8 * (d_out * l_size + m_size * d_in) + 4 * (d_in * l_size + m_size * d_out) + 8 * r_max
    buffer = (stack.flush_at + r_max) * (4 * (d_out + d_in) + 8)
    assert sizes[16] <= sketch + buffer and sizes[256] <= sketch + buffer
    stack.result(None)  # flushes the buffer
    assert stack.state_bytes() == sketch
    exact = FactorStack("m", (r_max, d_in), (d_out, r_max), r_max, svd="exact")
    for k in range(16):
        exact.add(f"c{k}", torch.randn(4, d_in), torch.randn(d_out, 4), 1, 1.0)
    assert exact.state_bytes() > 16 * 4 * (d_out + d_in) * 4 - 1  # the stack (64 < 2 min(d) = 80: kept whole)


# ---------------------------------------------------------------------------------------------- resume, order
def test_resumed_round_is_bit_identical_and_order_changes_only_rounding():
    """A re-run of the same uploads in the same order regenerates Omega / Psi from the seed: identical bits. Another
    order changes only the float64 summation order of Y and X (and where the stack folds): equal within 1e-5
    relative (float32 output), compared on the product B A (singular vectors' signs may differ)."""
    rng = np.random.default_rng(4)
    clients = _clients(rng, 150, 100, [3, 4, 1, 4] * 12, decay=0.03)  # 144 > 100: switches
    first = aggregate(_updates(clients), method="flexlora", r_max=4)
    again = aggregate(_updates(clients), method="flexlora", r_max=4)
    assert first.summary()["factorization"]["m"]["path"] == "sketch"
    for key in (A_KEY, B_KEY):
        assert torch.equal(first.state_dict[key], again.state_dict[key])
    order = rng.permutation(len(clients))
    shuffled = [ClientUpdate(u.client_id, u.state_dict, u.rank, u.num_examples)
                for u in (_updates(clients)[i] for i in order)]
    other = aggregate(shuffled, method="flexlora", r_max=4)
    assert np.linalg.norm(_product(other) - _product(first)) <= 1e-5 * np.linalg.norm(_product(first))


def test_clone_is_independent_after_the_switch():
    stack = FactorStack("m", (4, 48), (64, 4), 4, svd="sketch", oversample=4)
    for k in range(5):
        stack.add(f"c{k}", torch.randn(4, 48), torch.randn(64, 4), 1, 1.0)
    copy = stack.clone()
    before = stack.result(None)
    copy.add("x", torch.randn(4, 48) * 100, torch.randn(64, 4), 1, 1.0)
    after = stack.result(None)
    assert all(torch.equal(x, y) for x, y in zip(before, after))


# ---------------------------------------------------------------------------------------------- hostile scales
@settings(max_examples=25, deadline=None)
@given(scales=st.lists(st.floats(min_value=-30, max_value=30), min_size=3, max_size=8),
       ranks=st.lists(st.integers(min_value=1, max_value=4), min_size=8, max_size=8))
def test_sketch_result_is_finite_and_within_the_sum_of_norms(scales, ranks):
    """Whatever the factor magnitudes (10^-30 .. 10^30, unbalanced A / B), the sketch's global is finite and its norm
    at most sum_k w_k ||B_k A_k||_F (a ball that holds W, so the exact path's norm bound carries over)."""
    gen = torch.Generator().manual_seed(len(scales))
    stack = FactorStack("m", (4, 40), (50, 4), 4, svd="sketch", oversample=4)
    bound = 0.0
    for k, e in enumerate(scales):
        r = ranks[k]
        b = (torch.randn(50, r, generator=gen) * 10.0**e).to(torch.float32)
        a = (torch.randn(r, 40, generator=gen) * 10.0 ** (-e / 2)).to(torch.float32)
        stack.add(f"c{k}", a, b, 1, 1.0)
        bound += float(torch.linalg.norm(b.double() @ a.double()))
    a_out, b_out = stack.result(None)
    assert torch.isfinite(a_out).all() and torch.isfinite(b_out).all()
    got = float(torch.linalg.norm(b_out.double() @ a_out.double()))
    assert got <= bound / len(scales) * (1 + 1e-5)
