"""The core-client math (peft_hetlora.federated.adapter.core) against a float64 numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_hetlora.federated.adapter.core import (
    core_bases,
    core_budget,
    core_rank,
    core_seed,
    expand_core,
    held_factors,
)


def _global(r=8, d_in=20, d_out=12, seed=0, zero_b=False):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((r, d_in)).astype(np.float32)
    b = np.zeros((d_out, r), np.float32) if zero_b else rng.standard_normal((d_out, r)).astype(np.float32)
    return torch.from_numpy(a), torch.from_numpy(b)


def _truncated_svd(dense: np.ndarray, k: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(dense)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.mark.parametrize("r_c", [1, 3, 8])
def test_start_point_is_the_global_truncated_to_r_c(r_c):
    a, b = _global()
    s = 1.5
    bases = core_bases(a, b, r_c, seed=core_seed("m", a, b), scaling=s)
    a_k, b_k = expand_core(bases.initial_core(), bases)
    dense = s * b.numpy().astype(np.float64) @ a.numpy().astype(np.float64)
    np.testing.assert_allclose(s * b_k.double().numpy() @ a_k.double().numpy(), _truncated_svd(dense, r_c),
                               atol=1e-4 * np.abs(dense).max())
    # the bases are the dense product's singular vectors (up to sign) and its singular values
    u, sv, vh = np.linalg.svd(dense)
    np.testing.assert_allclose(bases.sigma.numpy(), sv[:r_c], rtol=1e-5)
    np.testing.assert_allclose(np.abs(bases.u.numpy().T @ u[:, :r_c]), np.eye(r_c), atol=1e-5)
    np.testing.assert_allclose(np.abs(bases.v.numpy().T @ vh[:r_c].T), np.eye(r_c), atol=1e-5)


def test_expansion_is_u_c_v_transpose():
    a, b = _global(seed=3)
    bases = core_bases(a, b, 5, seed=1, scaling=1.0)
    core = torch.randn(5, 5, generator=torch.Generator().manual_seed(2))
    a_k, b_k = expand_core(core, bases)
    reference = bases.u.numpy() @ core.double().numpy() @ bases.v.numpy().T
    np.testing.assert_allclose(b_k.double().numpy() @ a_k.double().numpy(), reference, atol=1e-5)
    held_a, held_b = held_factors(core, bases, a)
    np.testing.assert_allclose(held_b.double().numpy() @ held_a.double().numpy(), reference, atol=1e-4)


def test_round_zero_completes_from_the_global_rows_and_a_seed():
    a, b = _global(zero_b=True)
    bases = core_bases(a, b, 4, seed=11, scaling=2.0)
    eye = np.eye(4)
    np.testing.assert_allclose(bases.u.numpy().T @ bases.u.numpy(), eye, atol=1e-12)
    np.testing.assert_allclose(bases.v.numpy().T @ bases.v.numpy(), eye, atol=1e-12)
    assert bases.sigma.abs().max() == 0 and bases.initial_core().abs().max() == 0  # starts at the global: 0
    # V spans the global's first 4 A rows (projector residual ~0)
    rows = a[:4].double().numpy()
    proj = rows @ bases.v.numpy() @ bases.v.numpy().T
    np.testing.assert_allclose(proj, rows, atol=1e-10)
    # held factors keep the global's A exactly; the product is U C V^T
    core = torch.randn(4, 4)
    held_a, held_b = held_factors(core, bases, a)
    assert torch.equal(held_a, a[:4])
    np.testing.assert_allclose(held_b.double().numpy() @ held_a.double().numpy(),
                               bases.u.numpy() @ core.double().numpy() @ bases.v.numpy().T, atol=1e-5)
    # deterministic; another seed draws another U completion
    again = core_bases(a, b, 4, seed=11, scaling=2.0)
    assert torch.equal(again.u, bases.u) and torch.equal(again.v, bases.v)
    assert not torch.allclose(core_bases(a, b, 4, seed=12, scaling=2.0).u, bases.u)


def test_partial_rank_global_mixes_svd_and_completion():
    a, b = _global(r=6, d_in=16, d_out=10, seed=5)
    b[:, 2:] = 0  # product of rank 2
    bases = core_bases(a, b, 5, seed=0, scaling=1.0)
    assert (bases.sigma[:2] > 0).all() and (bases.sigma[2:] == 0).all()
    np.testing.assert_allclose(bases.u.numpy().T @ bases.u.numpy(), np.eye(5), atol=1e-10)
    dense = b.double().numpy() @ a.double().numpy()
    a_k, b_k = expand_core(bases.initial_core(), bases)
    np.testing.assert_allclose(b_k.double().numpy() @ a_k.double().numpy(), dense, atol=1e-5)


def test_gradient_of_the_core_is_s_u_transpose_g_v():
    """dL/dC = s U_c^T G V_c, G = dL/d(delta W), by autograd through the layer's two matmuls and finite differences."""
    torch.manual_seed(0)
    a, b = _global(seed=7)
    s = 0.5
    bases = core_bases(a, b, 4, seed=0, scaling=s)
    x = torch.randn(9, 20, dtype=torch.float64)
    target = torch.randn(9, 12, dtype=torch.float64)
    core = bases.initial_core().double().clone().requires_grad_(True)
    a_k = bases.v.T  # the frozen A of the layer
    b_k = bases.u @ core  # the parametrised B
    out = (x @ a_k.T) @ b_k.T * s  # LoRA's branch: s B (A x)
    loss = ((out - target) ** 2).sum()
    loss.backward()
    # independent: G = dL/dW for y = x W^T, W = delta W: G = 2 (y - t)^T x
    w = (s * bases.u @ core.detach() @ bases.v.T)
    g = 2 * ((x @ w.T - target).T @ x)
    expected = s * bases.u.T @ g @ bases.v
    np.testing.assert_allclose(core.grad.numpy(), expected.numpy(), rtol=1e-9, atol=1e-9)
    assert core.grad.abs().max() > 0
    # finite differences on one entry

    def f(c):
        return ((((x @ a_k.T) @ (bases.u @ c).T * s) - target) ** 2).sum()
    eps = 1e-6
    bump = torch.zeros(4, 4, dtype=torch.float64)
    bump[1, 2] = eps
    fd = (f(core.detach() + bump) - f(core.detach() - bump)) / (2 * eps)
    assert abs(float(fd) - float(core.grad[1, 2])) < 1e-5 * max(1.0, abs(float(fd)))


def test_gradient_is_nonzero_at_round_zero():
    a, b = _global(zero_b=True)
    bases = core_bases(a, b, 3, seed=0, scaling=1.0)
    core = bases.initial_core().double().requires_grad_(True)
    x = torch.randn(5, 20, dtype=torch.float64)
    out = (x @ bases.v) @ (bases.u @ core).T
    assert out.abs().max() == 0  # starts at B = 0 ...
    grad = torch.autograd.grad((((x @ bases.v) @ (bases.u @ core).T) - 1.0).pow(2).sum(), core)[0]
    assert grad.abs().max() > 0  # ... and the core still moves


def _reference_core_rank(k, r_max, dims, tokens=0):
    """Brute force over the four costs named separately: frozen bases + trainable core, gradient, Adam's 2 moments,
    activations per token, against LoRA(k)'s A and B, their gradients and moments, and k activations per token."""
    if k >= r_max:
        return r_max
    ok = []
    for r in range(1, r_max + 1):
        fits = True
        for di, do in dims:
            core = (r * do + r * di + r * r) + r * r + 2 * r * r + r * tokens
            lora = (k * di + k * do) + (k * di + k * do) + 2 * (k * di + k * do) + k * tokens
            fits &= core <= lora and r * r <= k * di + k * do and r <= min(di, do)
        if fits:
            ok.append(r)
    return max(ok) if ok else 1


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 16), r_max=st.integers(1, 32),
       dims=st.lists(st.tuples(st.integers(1, 600), st.integers(1, 600)), min_size=1, max_size=4),
       tokens=st.sampled_from([0, 1, 64, 2048]))
def test_core_rank_matches_the_budget_formula(k, r_max, dims, tokens):
    k = min(k, r_max)
    r_c = core_rank(k, r_max, dims, tokens=tokens)
    assert r_c == _reference_core_rank(k, r_max, dims, tokens)
    if tokens:
        return
    if k < r_max:
        for di, do in dims:
            counts = core_budget(r_c, di, do)
            lora_memory = 2 * k * (di + do) + k * (di + do) + k * (di + do)  # params + grad + 2 Adam moments... fp32
            if r_c > 1:
                assert counts["memory"] <= 4 * k * (di + do) == lora_memory
                assert counts["upload"] <= k * (di + do)


def test_smollm_budget_examples():
    smol = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    # by hand: w = 1152 (q/o), r = 7: 7 * 1152 + 4 * 49 = 8260 <= 4 * 2 * 1152 = 9216; r = 8: 9472 > 9216
    # w = 768 (k/v): r = 7: 5376 + 196 = 5572 <= 6144; r = 8: 6144 + 256 > 6144
    assert core_rank(2, 16, smol) == 7
    assert core_rank(2, 16, [(576, 576)]) == 7
    # w = 1152, k = 4: r = 15: 17280 + 900 = 18180 <= 18432; r = 16: 18432 + 1024 > 18432
    assert core_rank(4, 16, [(576, 576)]) == 15


def test_bad_inputs_are_refused():
    a, b = _global()
    with pytest.raises(ValueError, match="r_c"):
        core_bases(a, b, 0, seed=0, scaling=1.0)
    with pytest.raises(ValueError, match="not"):
        core_bases(a, b.T, 2, seed=0, scaling=1.0)
    bases = core_bases(a, b, 2, seed=0, scaling=1.0)
    with pytest.raises(ValueError, match="core must be"):
        expand_core(torch.zeros(3, 3), bases)


def test_the_budget_table_in_the_docs_is_right():
    """docs/methods.md#core-clients: every row recomputed by hand formulas (not core_budget)."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    shapes = {"SmolLM2-135M": [(576, 576), (576, 192), (576, 1536), (1536, 576)],
              "Llama-3.2-1B": [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)]}
    rows = [line for line in page.splitlines() if re.match(r"\| (SmolLM2-135M|Llama-3\.2-1B) \|", line)]
    assert len(rows) == 16
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        model, module = cells[0], cells[1]
        d_in, d_out = map(int, re.search(r"\((\d+) -> (\d+)\)", module).groups())
        k, r_c, mem_lora, mem_core, act_lora, act_core, up_lora, up_core = (int(c.replace(",", "")) for c in cells[2:])
        assert r_c == _reference_core_rank(k, 16, shapes[model])
        w = d_in + d_out
        assert mem_lora == k * w + k * w + 2 * k * w  # A and B, their gradients, Adam's 2 moments
        assert mem_core == r_c * w + r_c**2 * 4
        assert (act_lora, act_core) == (k, r_c)
        assert (up_lora, up_core) == (k * w, r_c * r_c)
        assert mem_core <= mem_lora and up_core <= up_lora
