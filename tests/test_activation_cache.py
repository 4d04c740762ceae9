"""The frozen-prefix activation cache gives the losses, gradients and perplexities of the full forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from tiny_models import LLAMA_TARGETS, one_torch_thread, randomize_adapter, tiny_gpt2, tiny_llama

from hetlora_bench.activation_cache import (
    ActivationCache,
    CachedCollator,
    TopLayersCausalLM,
    cache_plan,
    cached_perplexity,
)
from hetlora_bench.data import CausalLMCollator
from hetlora_bench.metrics.loss_eval import evaluate_perplexity
from peft_hetlora import HetLoRAConfig

LAYERS = 4
TOP = [2, 3]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


def rows(n: int = 7, seed: int = 3) -> Dataset:
    """Unpadded token rows of different lengths (as tokenize_for_clm(..., pad_to_block_size=False) makes)."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, 96, size=int(rng.integers(3, 20))).tolist() for _ in range(n)]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": ids})


def peft_model(prune_lambda: float = 0.3, layers=TOP):
    base = tiny_llama(num_hidden_layers=LAYERS)
    config = HetLoRAConfig(
        r=6, rank=4, lora_alpha=12, target_modules=LLAMA_TARGETS, layers_to_transform=layers, prune_lambda=prune_lambda
    )
    model = get_peft_model(base, config)
    randomize_adapter(model, seed=1)
    return model


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("num_items", [None, 40])
def test_training_loss_and_gradients_match_the_full_forward(num_items):
    ds = rows()
    model = peft_model()
    cache = ActivationCache.build(model.get_base_model(), 2, {"train": ds}, batch_size=3)
    model.train()
    full_batch = CausalLMCollator(pad_token_id=0)([ds[i] for i in range(5)])
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    full = model(**full_batch, **extra).loss
    full.backward()
    full_grads = _lora_grads(model)
    model.zero_grad()

    wrapper = TopLayersCausalLM(model, 2)
    cached_batch = CachedCollator()([cache["train"][i] for i in range(5)])
    cached = wrapper(**cached_batch, **extra).loss
    cached.backward()
    cached_grads = _lora_grads(model)
    # the regulariser is part of both losses (lambda > 0): the check covers it
    assert model.base_model.regularizer() is not None
    assert cached.item() == pytest.approx(full.item(), abs=1e-5, rel=1e-5)
    assert full_grads.keys() == cached_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_cached_hidden_states_equal_the_decoders_own_hidden_states():
    ds = rows(n=4)
    model = tiny_llama(num_hidden_layers=LAYERS)
    cache = ActivationCache.build(model, 2, {"x": ds}, batch_size=2)
    for i in range(len(ds)):
        ids = torch.tensor([ds[i]["input_ids"]])
        with torch.no_grad():
            reference = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
        torch.testing.assert_close(cache["x"][i]["hidden_states"], reference, atol=1e-5, rtol=1e-5)


def test_perplexity_matches_evaluate_perplexity():
    ds = rows(n=9)
    model = peft_model()
    cache = ActivationCache.build(model.get_base_model(), 2, {"eval": ds})
    reference = evaluate_perplexity(model, ds, batch_size=4, progress=False)
    got = cached_perplexity(TopLayersCausalLM(model, 2), cache["eval"], batch_size=4)
    assert got["num_tokens"] == reference["num_tokens"] == sum(len(x) - 1 for x in ds["input_ids"])
    assert got["loss"] == pytest.approx(reference["loss"], abs=1e-5)


def test_spill_to_disk_past_the_limit(tmp_path):
    ds = rows(n=5)
    model = tiny_llama(num_hidden_layers=LAYERS)
    ram = ActivationCache.build(model, 2, {"x": ds})
    spilled = ActivationCache.build(model, 2, {"x": ds}, max_bytes=0, spill_dir=tmp_path)
    total_tokens = sum(len(x) for x in ds["input_ids"])
    assert ram.path is None and ram.nbytes == total_tokens * 32 * 4
    assert spilled.path is not None and spilled.path.stat().st_size == spilled.nbytes
    for i in range(len(ds)):
        torch.testing.assert_close(spilled["x"][i]["hidden_states"], ram["x"][i]["hidden_states"])
    with pytest.raises(ValueError, match="spill_dir"):
        ActivationCache.build(model, 2, {"x": ds}, max_bytes=0)


def test_plan_falls_back_with_a_reason():
    llama = tiny_llama(num_hidden_layers=LAYERS)
    assert cache_plan(llama, [2, 3]).first_layer == 2
    assert "every layer" in cache_plan(llama, None).reason
    assert "layer 0" in cache_plan(llama, [0, 3]).reason
    assert "not supported" in cache_plan(tiny_gpt2(), [1]).reason


def test_callbacks_find_the_peft_model_through_the_wrapper():
    from trainer_callbacks import hetlora_peft_model

    model = peft_model()
    assert hetlora_peft_model(TopLayersCausalLM(model, 2)) is model


def test_rows_are_computed_once_on_first_use():
    ds = rows(n=6)
    model = tiny_llama(num_hidden_layers=LAYERS)
    lazy = ActivationCache.build(model, 2, {"a": ds, "b": ds})
    assert lazy.computed_rows == 0
    first = lazy["b"].__getitems__([4, 1])
    assert lazy.computed_rows == 2 and lazy.computed_tokens == len(ds[4]["input_ids"]) + len(ds[1]["input_ids"])
    eager = ActivationCache.build(model, 2, {"a": ds, "b": ds}, eager=True)
    assert eager.computed_rows == 12
    torch.testing.assert_close(first[0]["hidden_states"], eager["b"][4]["hidden_states"], atol=1e-5, rtol=1e-5)
    assert lazy["b"].select([1])[0]["labels"] == ds[1]["labels"]
