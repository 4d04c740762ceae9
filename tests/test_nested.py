"""Nested training (PreLort arXiv 2606.15963, Matryoshka arXiv 2205.13147): one random truncation per optimizer step.

Expected values come from numpy on the raw factors (the model truncated by hand) or from a second
model whose rank is set to the draw, never from the truncation code itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import get_peft_model, get_peft_model_state_dict
from transformers import Trainer, TrainerCallback, TrainingArguments

import peft_hetlora
from peft_hetlora import HetLoRAConfig
from trainer_callbacks import HetLoRACallback

try:  # pytest puts tests/ on sys.path when tests/ is not a package ...
    from tiny_models import VOCAB_SIZE, TwoLinear, one_thread_per_module, randomize_adapter, tiny_llama  # noqa: F401  (autouse fixture)
except ImportError:  # ... and the repository root when it is
    from tests.tiny_models import VOCAB_SIZE, TwoLinear, one_thread_per_module, randomize_adapter, tiny_llama  # noqa: F401  (autouse fixture)


X = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
MODULES = ("lin0", "lin1")


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def linear_model(rank=6, r=8, alpha=8, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(TwoLinear(), HetLoRAConfig(r=r, rank=rank, lora_alpha=alpha,
                                                      target_modules=list(MODULES), **config))
    randomize_adapter(model, seed=4)
    return model


def hand(model, factors, scale) -> np.ndarray:
    h = np64(X)
    for i, name in enumerate(MODULES):
        layer = getattr(model.base_model.model, name)
        a, b = factors[name]
        h = h @ np64(layer.base_layer.weight).T + np64(layer.base_layer.bias) + scale * (h @ a.T) @ b.T
        if i == 0:
            h = np.tanh(h)
    return h


@pytest.mark.parametrize("draw", [1, 3, 5, 6])
def test_truncation_is_the_prefix_model_and_only_it_gets_gradient(draw):
    model = linear_model(rank=6)
    layers = {name: getattr(model.base_model.model, name) for name in MODULES}
    factors = {n: (np64(m.lora_A["default"].weight)[:draw], np64(m.lora_B["default"].weight)[:, :draw])
               for n, m in layers.items()}
    model.set_truncation(draw)
    out = model(X)
    np.testing.assert_allclose(np64(out), hand(model, factors, 8 / 8), rtol=1e-5, atol=1e-5)
    out.pow(2).sum().backward()
    for layer in layers.values():
        grad_a, grad_b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
        assert torch.count_nonzero(grad_a[draw:]) == 0 and torch.count_nonzero(grad_b[:, draw:]) == 0
        assert torch.count_nonzero(grad_a[:draw]) > 0 and torch.count_nonzero(grad_b[:, :draw]) > 0
    model.set_truncation(None)
    full = {n: (np64(m.lora_A["default"].weight), np64(m.lora_B["default"].weight)) for n, m in layers.items()}
    np.testing.assert_allclose(np64(model(X)), hand(model, full, 1.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("draw", "cut"), [(1, 4), (2, 6), (3, 8)])
def test_truncating_a_window_truncates_the_frozen_global_at_the_same_index(draw, cut):
    glob = linear_model(rank=8)
    state = {k: v.clone() for k, v in get_peft_model_state_dict(glob).items()}
    model = linear_model(rank=3)
    model.set_components([1, 4, 6], state)  # frozen: 0, 2, 3, 5, 7
    model.set_truncation(draw)  # drops window slots >= draw: the global truncated at `cut`
    factors = {
        name: (np64(state[f"base_model.model.{name}.lora_A.weight"])[:cut],
               np64(state[f"base_model.model.{name}.lora_B.weight"])[:, :cut])
        for name in MODULES
    }
    np.testing.assert_allclose(np64(model(X)), hand(model, factors, 1.0), rtol=1e-5, atol=1e-5)


def test_truncation_refused_with_merged_frozen_components():
    glob = linear_model(rank=8)
    model = linear_model(rank=2)
    model.set_components([0, 1], get_peft_model_state_dict(glob), frozen="merged")
    with pytest.raises(ValueError, match="frozen='factors'"):
        model.set_truncation(1)
    with pytest.raises(ValueError, match="positive integer"):
        model.set_truncation(0)


# ----------------------------------------------------------------------------- through the Trainer
class _Recorder(TrainerCallback):
    """Per micro-batch: the truncation in force; per optimizer step: the gradients before the step."""

    def __init__(self, layer) -> None:
        self.micro: list[int | None] = []
        self.grads: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.steps_micro: list[list[int | None]] = []
        layer.register_forward_pre_hook(lambda module, args: self.micro.append(module._truncation["default"]))
        self.layer = layer

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps_micro.append([])

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps_micro[-1] = list(self.micro)
        self.micro.clear()
        a, b = self.layer.lora_A["default"].weight, self.layer.lora_B["default"].weight
        self.grads.append((a.grad.clone(), b.grad.clone()))


def _nested_model(rank=6, r_min=2):
    torch.manual_seed(0)
    config = peft_hetlora.HetLoRAConfig(r=8, rank=rank, r_min=r_min, lora_alpha=16,
                                        target_modules=["q_proj", "v_proj"], nested=True, nested_seed=3)
    model = get_peft_model(tiny_llama(seed=0), config)
    randomize_adapter(model, seed=5, std=0.5)
    return model


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  max_steps=8, learning_rate=0.0, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                  report_to=[], disable_tqdm=True, seed=0, use_cpu=True, dataloader_num_workers=0)
    values.update(overrides)
    return TrainingArguments(**values)


def test_one_draw_per_optimizer_step_under_accumulation_with_the_truncated_loss_and_zero_gradients(tmp_path):
    model = _nested_model()
    row = torch.randint(0, VOCAB_SIZE, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    dataset = Dataset.from_dict({"input_ids": [row] * 32, "labels": [row] * 32})  # every batch the same
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    recorder = _Recorder(layer)
    callback = HetLoRACallback(prune=False)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=dataset, callbacks=[callback, recorder])
    trainer.train()
    draws = callback.nested_draws
    assert len(draws) == 8 and all(2 <= d <= 6 for d in draws) and len(set(draws)) > 1
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # the hand check: with lr 0 the weights never move, so a fresh copy cut to rank k' gives each step's loss
    ids = torch.tensor([row])
    for step, draw in enumerate(draws):
        # both micro-batches of the step ran under the step's draw (None = the full rank)
        assert recorder.steps_micro[step] == [draw if draw < 6 else None] * 2
        reference = _nested_model()
        reference.set_rank(draw)  # shrinking only: the first k' components, nothing re-initialised
        with torch.no_grad():
            expected = float(reference(input_ids=ids, labels=ids).loss)
        assert losses[step] == pytest.approx(expected, abs=2e-4)
        grad_a, grad_b = recorder.grads[step]
        assert torch.count_nonzero(grad_a[draw:]) == 0 and torch.count_nonzero(grad_b[:, draw:]) == 0
        assert torch.count_nonzero(grad_a[:draw]) > 0
    # the draws matter: different truncations gave measurably different losses
    by_draw = {d: losses[i] for i, d in enumerate(draws)}
    assert max(by_draw.values()) - min(by_draw.values()) > 1e-2
    # after the round the model is whole again
    assert layer._truncation["default"] is None


def test_draws_are_seeded_and_off_by_default(tmp_path):
    runs = []
    for _ in range(2):
        model = _nested_model()
        callback = HetLoRACallback(prune=False)
        row = list(range(12))
        dataset = Dataset.from_dict({"input_ids": [row] * 16, "labels": [row] * 16})
        Trainer(model=model, args=_args(tmp_path, max_steps=4, gradient_accumulation_steps=1),
                train_dataset=dataset, callbacks=[callback]).train()
        runs.append(callback.nested_draws)
    assert runs[0] == runs[1]
    model = _nested_model()
    callback = HetLoRACallback(prune=False, nested=False)
    Trainer(model=model, args=_args(tmp_path, max_steps=2, gradient_accumulation_steps=1),
            train_dataset=dataset, callbacks=[callback]).train()
    assert callback.nested_draws == []
    with pytest.raises(ValueError, match="nested must be"):
        HetLoRACallback(nested="yes")
    with pytest.raises(ValueError, match="`nested` must be"):
        HetLoRAConfig(r=4, nested=1)
