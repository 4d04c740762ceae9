"""HetLoRA layer math against hand computations written here (numpy / the formulas of docs/design.md#the-algorithm).

Every expected value is computed from the raw weights of the model, never with peft_hetlora helpers,
so a wrong scale, a wrong slice, a wrong tail start or a wrong pruning rule makes these tests fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from peft_hetlora import HetLoRAConfig

try:  # pytest puts tests/ on sys.path when tests/ is not a package ...
    from tiny_models import TwoLinear, one_thread_per_module, randomize_adapter, tiny_gpt2, tiny_llama, token_batch  # noqa: F401  (autouse fixture)
except ImportError:  # ... and the repository root when it is
    from tests.tiny_models import (  # noqa: F401  (autouse fixture)
        TwoLinear,
        one_thread_per_module,
        randomize_adapter,
        tiny_gpt2,
        tiny_llama,
        token_batch,
    )


TARGETS = ["lin0", "lin1"]


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def linear_model(seed: int = 0, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    config.setdefault("target_modules", TARGETS)
    model = get_peft_model(TwoLinear(), HetLoRAConfig(**config))
    randomize_adapter(model, seed=seed + 100)
    return model


def hand_tail(a: np.ndarray, b: np.ndarray, k: int, gamma: float) -> float:
    t = min(math.floor(gamma * k), k - 1)
    return float(np.linalg.norm(b[:, t:k]) * np.linalg.norm(a[t:k, :]))


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize(
    ("r", "rank", "active", "alpha", "rank_scaling", "expected_scale"),
    [
        (16, 16, 16, 24, "fixed", 24 / 16),
        (16, 16, 5, 24, "fixed", 24 / 16),  # allocated at r_max, active 5 (mask case)
        (16, 4, 4, 24, "fixed", 24 / 16),  # allocated at the client rank: scale still alpha / r_max
        (16, 4, 2, 24, "fixed", 24 / 16),
        (16, 6, 3, 24, "rslora", 24 / 4),  # alpha / sqrt(r_max)
        (9, 1, 1, 3, "rslora", 3 / 3),
    ],
)
def test_linear_forward_equals_hand_formula(r, rank, active, alpha, rank_scaling, expected_scale):
    model = linear_model(r=r, rank=rank, lora_alpha=alpha, rank_scaling=rank_scaling)
    if active != rank:
        model.set_rank(active)
    layer = model.base_model.model.lin0
    assert layer.lora_A["default"].weight.shape[0] == rank  # allocation follows the client rank
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    w, bias = np64(layer.base_layer.weight), np64(layer.base_layer.bias)
    a, b = np64(layer.lora_A["default"].weight), np64(layer.lora_B["default"].weight)
    xs = np64(x)
    expected = xs @ w.T + bias + expected_scale * (xs @ a[:active].T) @ b[:, :active].T
    np.testing.assert_allclose(np64(layer(x)), expected, rtol=1e-5, atol=1e-5)
    # whole model: lin1(tanh(lin0(x))) with lin1 by the same formula
    w1, b1 = np64(model.base_model.model.lin1.base_layer.weight), np64(model.base_model.model.lin1.base_layer.bias)
    a1 = np64(model.base_model.model.lin1.lora_A["default"].weight)
    bb1 = np64(model.base_model.model.lin1.lora_B["default"].weight)
    h = np.tanh(expected)
    out = h @ w1.T + b1 + expected_scale * (h @ a1[:active].T) @ bb1[:, :active].T
    np.testing.assert_allclose(np64(model(x)), out, rtol=1e-5, atol=1e-5)


def test_inactive_components_do_not_matter():
    model = linear_model(r=8, rank=8)
    model.set_rank(3)
    x = torch.randn(4, 12)
    before = model(x)
    with torch.no_grad():
        for layer in (model.base_model.model.lin0, model.base_model.model.lin1):
            layer.lora_A["default"].weight[3:] = 1e3
            layer.lora_B["default"].weight[:, 3:] = -1e3
    torch.testing.assert_close(model(x), before)


def test_conv1d_forward_equals_hand_formula():
    torch.manual_seed(0)
    model = get_peft_model(tiny_gpt2(), HetLoRAConfig(r=8, rank=8, lora_alpha=12, target_modules=["c_attn", "c_fc"]))
    randomize_adapter(model, seed=5, std=0.1)
    model.set_rank(3)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out
    x = torch.randn(2, 7, 32)
    w, bias = np64(layer.base_layer.weight), np64(layer.base_layer.bias)  # Conv1D: (in, out)
    a, b = np64(layer.lora_A["default"].weight), np64(layer.lora_B["default"].weight)
    xs = np64(x)
    expected = xs @ w + bias + (12 / 8) * (xs @ a[:3].T) @ b[:, :3].T
    np.testing.assert_allclose(np64(layer(x)), expected, rtol=1e-5, atol=1e-5)
    # merged weight (Conv1D layout) holds exactly s * (B[:, :3] A[:3])^T
    delta = np64(layer.get_delta_weight("default"))
    np.testing.assert_allclose(delta, (12 / 8) * (b[:, :3] @ a[:3]).T, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- backward
@pytest.mark.parametrize(("rank", "active"), [(8, 8), (8, 3), (3, 3)])
def test_backward_matches_autograd_of_hand_formula(rank, active):
    model = linear_model(r=8, rank=rank, lora_alpha=16)
    model.set_rank(active)
    layer = model.base_model.model.lin0
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(1))
    g = torch.randn(6, 10, generator=torch.Generator().manual_seed(2))
    (layer(x) * g).sum().backward()
    grad_a, grad_b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
    # the base layer is frozen
    assert layer.base_layer.weight.grad is None
    # inactive components get no gradient
    if active < rank:
        assert grad_a is not None and torch.count_nonzero(grad_a[active:]) == 0
        assert torch.count_nonzero(grad_b[:, active:]) == 0
    # active gradients equal autograd of x W^T + b + s (x A_k^T) B_k^T in float64
    a_k = layer.lora_A["default"].weight[:active].detach().double().clone().requires_grad_(True)
    b_k = layer.lora_B["default"].weight[:, :active].detach().double().clone().requires_grad_(True)
    w, bias = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    xd = x.double()
    y = xd @ w.T + bias + 2.0 * (xd @ a_k.T) @ b_k.T
    (y * g.double()).sum().backward()
    torch.testing.assert_close(grad_a[:active].double(), a_k.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_b[:, :active].double(), b_k.grad, rtol=1e-5, atol=1e-6)


def test_conv1d_backward_inactive_components_have_zero_grad():
    model = get_peft_model(tiny_gpt2(), HetLoRAConfig(r=8, rank=8, target_modules=["c_attn"]))
    randomize_adapter(model, seed=1, std=0.1)
    model.set_rank(2)
    model.train()
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            assert torch.count_nonzero(param.grad[2:]) == 0 and torch.count_nonzero(param.grad[:2]) > 0
        if ".lora_B." in name:
            assert torch.count_nonzero(param.grad[:, 2:]) == 0 and torch.count_nonzero(param.grad[:, :2]) > 0


# ----------------------------------------------------------------------------- tail norm
@pytest.mark.parametrize(
    ("gamma", "ranks"),
    [
        (0.7, {"lin0": 5, "lin1": 1}),
        (0.99, {"lin0": 8, "lin1": 6}),
        (0.3, {"lin0": 3, "lin1": 8}),
        (0.5, {"lin0": 4, "lin1": 2}),
    ],
)
def test_tail_norm_equals_hand_computation(gamma, ranks):
    model = linear_model(r=8, rank=8, prune_gamma=gamma)
    model.set_rank(ranks)
    expected = 0.0
    for name, k in ranks.items():
        layer = getattr(model.base_model.model, name)
        expected += hand_tail(np64(layer.lora_A["default"].weight), np64(layer.lora_B["default"].weight), k, gamma)
    value = model.tail_norm()
    assert value.dtype == torch.float32 and value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_tail_norm_gradient_flows_to_the_tails_only():
    gamma, k = 0.7, 6  # t = min(floor(4.2), 5) = 4: tail is components 4 and 5
    model = linear_model(r=8, rank=8, prune_gamma=gamma)
    model.set_rank(k)
    model.tail_norm().backward()
    for name in TARGETS:
        layer = getattr(model.base_model.model, name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.count_nonzero(a.grad[4:6]) > 0 and torch.count_nonzero(b.grad[:, 4:6]) > 0
        assert torch.count_nonzero(a.grad[:4]) == 0 and torch.count_nonzero(a.grad[6:]) == 0
        assert torch.count_nonzero(b.grad[:, :4]) == 0 and torch.count_nonzero(b.grad[:, 6:]) == 0
        # d(||B_t|| ||A_t||)/dA_t = ||B_t|| A_t / ||A_t||, and symmetrically for B
        a_t, b_t = a[4:6].detach().double(), b[:, 4:6].detach().double()
        torch.testing.assert_close(a.grad[4:6].double(), b_t.norm() * a_t / a_t.norm(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.grad[:, 4:6].double(), a_t.norm() * b_t / b_t.norm(), rtol=1e-4, atol=1e-6)


def test_tail_norm_in_bfloat16_is_float32_and_differentiable():
    model = linear_model(r=8, rank=4, prune_gamma=0.5).to(torch.bfloat16)
    value = model.tail_norm()
    assert value.dtype == torch.float32 and value.requires_grad
    value.backward()
    assert torch.count_nonzero(model.base_model.model.lin0.lora_A["default"].weight.grad[2:4]) > 0


def test_regulariser_is_added_to_the_training_loss():
    torch.manual_seed(0)
    lam = 0.5
    model = get_peft_model(
        tiny_llama(), HetLoRAConfig(r=8, rank=4, target_modules=["q_proj", "v_proj"], prune_lambda=lam)
    )
    randomize_adapter(model, seed=1, std=0.05)
    ids = token_batch()
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    model.eval()
    plain = model(input_ids=ids, labels=ids).loss  # no dropout in the tiny model: same task loss
    tail = model.tail_norm().item()
    assert loss.item() == pytest.approx(plain.item() + lam * tail, rel=1e-5)
    # with num_items_in_batch the term is divided by the accumulation steps (counted once per optimizer step)
    model.train()
    model.base_model.gradient_accumulation_steps = 4
    loss = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(ids.numel() - ids.shape[0])).loss
    model.eval()
    plain = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(ids.numel() - ids.shape[0])).loss
    assert loss.item() == pytest.approx(plain.item() + lam * tail / 4, rel=1e-5)


# ----------------------------------------------------------------------------- pruning rule
def hand_prune(k: int, gamma: float, r_min: int) -> int:
    return max(r_min, min(math.floor(gamma * k), k - 1))


@pytest.mark.parametrize(
    ("rank", "r_min", "gamma", "expected"),
    [
        (2, 2, 0.5, 2),  # k = r_min stays
        (1, 1, 0.99, 1),  # k = 1: t = 0, max(r_min, 0) = 1
        (3, 1, 0.3, 1),  # gamma * k < 1: t = 0 -> r_min
        (3, 2, 0.3, 2),
        (16, 2, 0.9, 14),  # t = floor(14.4) = 14
        (4, 3, 0.5, 3),  # r_min above t
        (4, 1, 0.75, 3),  # gamma * k integral: t = 3 = k - 1
        (8, 1, 0.99, 7),  # t = min(floor(7.92), 7) = 7
        (100, 1, 0.99, 99),
    ],
)
def test_prune_below_reference_follows_the_rule(rank, r_min, gamma, expected):
    assert hand_prune(rank, gamma, r_min) == expected
    model = linear_model(r=max(rank, 16), rank=rank, r_min=r_min, prune_gamma=gamma)
    current = model.tail_norm().item()
    assert model.prune(torch.tensor(current * 2 + 1.0)) == expected
    assert model.get_rank() == expected
    assert model.peft_config["default"].rank == expected


def test_prune_needs_a_strictly_smaller_tail():
    model = linear_model(r=8, rank=8, prune_gamma=0.5)
    current = model.tail_norm().item()
    assert model.prune(current) == 8  # equal: no prune (strict <)
    assert model.prune(current * 0.5) == 8  # the tail grew: no prune
    assert model.prune(float(np.nextafter(np.float32(current), np.float32(np.inf)))) == 4  # just below


def test_prune_per_module_ranks_and_repeated_rounds():
    model = linear_model(r=16, rank=16, r_min=2, prune_gamma=0.8)
    model.set_rank({"lin0": 10, "lin1": 4})
    assert model.prune(1e9) == 8  # lin0: min(8, 9) = 8; lin1: max(2, min(3, 3)) = 3
    assert model.get_rank() == {"lin0": 8, "lin1": 3}
    ranks = [model.prune(1e9) for _ in range(6)]
    lin0 = 8
    expected = []
    for _ in range(6):
        lin0 = hand_prune(lin0, 0.8, 2)
        expected.append(lin0)
    assert ranks == expected
    assert model.get_rank() == 2  # equal ranks collapse to an int


def test_prune_does_not_touch_values_or_storage():
    model = linear_model(r=8, rank=8, prune_gamma=0.5)
    layer = model.base_model.model.lin0
    a_before = layer.lora_A["default"].weight.detach().clone()
    ptr = layer.lora_A["default"].weight.data_ptr()
    model.prune(1e9)
    assert layer.lora_A["default"].weight.data_ptr() == ptr
    torch.testing.assert_close(layer.lora_A["default"].weight.detach(), a_before)


# ----------------------------------------------------------------------------- set_rank
def test_set_rank_shrink_keeps_parameters_and_optimizer_state():
    model = linear_model(r=8, rank=8)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    x = torch.randn(8, 12)
    model(x).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    ids = {name: id(p) for name, p in model.named_parameters() if p.requires_grad}
    ptrs = {name: p.data_ptr() for name, p in model.named_parameters() if p.requires_grad}
    state_ptrs = {id(p): {k: v.data_ptr() for k, v in optimizer.state[p].items()} for p in params}
    model.set_rank(3)
    assert model.get_rank() == 3
    now = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert {name: id(p) for name, p in now.items()} == ids
    assert {name: p.data_ptr() for name, p in now.items()} == ptrs
    assert now["base_model.model.lin0.lora_A.default.weight"].shape == (8, 12)  # allocation kept
    assert {id(p): {k: v.data_ptr() for k, v in optimizer.state[p].items()} for p in params} == state_ptrs
    model(x).sum().backward()  # the same optimizer keeps working
    optimizer.step()
    assert torch.count_nonzero(now["base_model.model.lin0.lora_A.default.weight"].grad[3:]) == 0


@pytest.mark.parametrize(("rank", "shrink_to", "grow_to"), [(8, 3, 6), (8, 3, 8), (4, 4, 10), (4, 2, 16)])
def test_set_rank_grow_keeps_output(rank, shrink_to, grow_to):
    model = linear_model(r=16, rank=rank)
    model.set_rank(shrink_to)
    x = torch.randn(5, 12)
    before = model(x).detach()
    model.set_rank(grow_to)
    assert model.get_rank() == grow_to
    layer = model.base_model.model.lin0
    assert layer.lora_A["default"].weight.shape[0] == max(rank, grow_to)
    assert layer.lora_A["default"].weight.requires_grad and layer.lora_B["default"].weight.requires_grad
    torch.testing.assert_close(model(x), before)
    # the new components are trainable: B's new columns get gradient (A's need B != 0 first)
    model(x).sum().backward()
    assert torch.count_nonzero(layer.lora_B["default"].weight.grad[:, shrink_to:grow_to]) > 0


@pytest.mark.parametrize("bad", [0, 17, 2.0, True, "3"])
def test_set_rank_rejects_invalid_ranks(bad):
    model = linear_model(r=16, rank=4)
    with pytest.raises(ValueError, match=r"\[1, r=16\]"):
        model.set_rank(bad)
    with pytest.raises(ValueError, match="Unknown HetLoRA modules"):
        model.set_rank({"nope": 2})


# ----------------------------------------------------------------------------- truncate / pad
def test_truncate_then_pad_identity():
    try:
        from peft_hetlora.federated.adapter import pad, truncate
    except ImportError:
        pytest.skip("peft_hetlora.federated.aggregation.streaming (truncate / pad) is not available yet")
    model = linear_model(r=8, rank=8)
    full = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    small = truncate(full, 3)
    for key, value in small.items():
        assert value.shape[0 if ".lora_A." in key else 1] == 3
    padded = pad(small, 8)
    for key, value in padded.items():
        if ".lora_A." in key:
            torch.testing.assert_close(value[:3], full[key][:3])
            assert torch.count_nonzero(value[3:]) == 0
        else:
            torch.testing.assert_close(value[:, :3], full[key][:, :3])
            assert torch.count_nonzero(value[:, 3:]) == 0
    again = truncate(padded, 3)
    assert again.keys() == small.keys()
    for key in small:
        torch.testing.assert_close(again[key], small[key], rtol=0, atol=0)
    # the zero-padded adapter at full rank computes what the original computes at rank 3
    x = torch.randn(4, 12)
    model.set_rank(3)
    expected = model(x).detach()
    model.set_rank(8)
    set_peft_model_state_dict(model, padded)
    torch.testing.assert_close(model(x), expected)


# ----------------------------------------------------------------------------- merge
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_and_unload_equals_unmerged_forward(kind):
    if kind == "linear":
        model = linear_model(r=8, rank=8, lora_alpha=16)
        x = {"x": torch.randn(5, 12)}
    else:
        torch.manual_seed(0)
        model = get_peft_model(tiny_gpt2(), HetLoRAConfig(r=8, rank=6, target_modules=["c_attn", "c_proj", "c_fc"]))
        randomize_adapter(model, seed=2, std=0.05)
        x = {"input_ids": token_batch()}
    model.set_rank(3)

    def run(m):
        out = m(**x)
        return (out if isinstance(out, torch.Tensor) else out.logits).detach()

    expected = run(model)
    merged = model.merge_and_unload()
    assert not any(".lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(run(merged), expected, rtol=1e-4, atol=1e-5)


def test_merge_uses_the_active_slice_and_unmerge_restores_base():
    model = linear_model(r=8, rank=8, lora_alpha=8)
    model.set_rank(2)
    layer = model.base_model.model.lin0
    w0 = layer.base_layer.weight.detach().clone()
    a, b = np64(layer.lora_A["default"].weight), np64(layer.lora_B["default"].weight)
    x = torch.randn(3, 12)
    unmerged = model(x).detach()
    model.merge_adapter()
    np.testing.assert_allclose(np64(layer.base_layer.weight), np64(w0) + 1.0 * b[:, :2] @ a[:2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight.detach(), w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)


def test_rank_change_while_merged_is_refused():
    model = linear_model(r=8, rank=8, prune_gamma=0.5)
    w0 = model.base_model.model.lin0.base_layer.weight.detach().clone()
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.set_rank(3)
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.prune(1e9)
    model.set_rank(8)  # no change: allowed
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.lin0.base_layer.weight.detach(), w0, rtol=0, atol=1e-6)
    assert model.prune(1e9) == 4  # once unmerged, pruning works
