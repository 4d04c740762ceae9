"""PEFT's own generic tuner tests, run on HetLoRA.

The test bodies come from peft 0.21.2's `tests/testing_common.py` and `tests/test_custom_models.py`
(vendored, trimmed, under `tests/peft_upstream/`, see its README). This module only supplies the
HetLoRA cases, parametrised the way `test_custom_models.py` parametrises its LoRA cases, plus a small
decoder tester on local tiny Llama / GPT-2 models (no Hub) for the generate / mixed-batch /
gradient-checkpointing checks that need a transformers model.

Checks that do not apply to HetLoRA are skipped with a reason (see `NOT_APPLICABLE`).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from peft_hetlora import HetLoRAConfig

try:  # pytest puts tests/ on sys.path when tests/ is not a package ...
    from peft_upstream.custom_models import MixedAdapterBatchesTests, MultipleActiveAdaptersTests, PeftCustomModelTests
    from peft_upstream.testing_common import PeftCommonTester
    from peft_upstream.testing_utils import set_init_weights_false
    from tiny_models import LLAMA_TARGETS, one_thread_per_module, tiny_gpt2, tiny_llama  # noqa: F401  (autouse fixture)
except ImportError:  # ... and the repository root when it is
    from tests.peft_upstream.custom_models import (
        MixedAdapterBatchesTests,
        MultipleActiveAdaptersTests,
        PeftCustomModelTests,
    )
    from tests.peft_upstream.testing_common import PeftCommonTester
    from tests.peft_upstream.testing_utils import set_init_weights_false
    from tests.tiny_models import LLAMA_TARGETS, one_thread_per_module, tiny_gpt2, tiny_llama  # noqa: F401  (autouse fixture)


# ----------------------------------------------------------------------------- cases
# (test_name, model_id, config_cls, config_kwargs), as in test_custom_models.TEST_CASES; "rank" < "r" is the
# truncated-rank case (a client allocated at rank k inside a federation of r_max = r).
HETLORA_TEST_CASES = [
    ("Vanilla MLP 1 HetLoRA full rank", "MLP", HetLoRAConfig, {"target_modules": ["lin0"], "r": 8}),
    ("Vanilla MLP 2 HetLoRA", "MLP", HetLoRAConfig, {"target_modules": ["lin0"], "r": 8, "rank": 4}),
    ("Vanilla MLP 3 HetLoRA", "MLP", HetLoRAConfig, {"target_modules": "lin1", "r": 16, "rank": 2, "r_min": 2}),
    (
        "Vanilla MLP 4 HetLoRA rslora",
        "MLP",
        HetLoRAConfig,
        {"target_modules": ["lin0", "lin1"], "r": 16, "rank": 3, "lora_alpha": 8, "rank_scaling": "rslora"},
    ),
    (
        "Vanilla MLP 5 HetLoRA dropout",
        "MLP",
        HetLoRAConfig,
        {"target_modules": ["lin0"], "r": 8, "rank": 4, "lora_dropout": 0.1},
    ),
    (
        "Vanilla MLP 6 HetLoRA modules_to_save",
        "MLP",
        HetLoRAConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 8, "rank": 4},
    ),
    ("MLP LayerNorm HetLoRA", "MLP_LayerNorm", HetLoRAConfig, {"target_modules": ["lin0", "lin1"], "r": 8, "rank": 5}),
    (
        "Embedding + transformers Conv1D HetLoRA",
        "EmbConv1D",
        HetLoRAConfig,
        {"target_modules": ["conv1d", "lin0"], "r": 8, "rank": 4},
    ),
]

# (test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2)
HETLORA_MULTIPLE_ACTIVE_ADAPTERS_CASES = [
    (
        "HetLoRA Same",
        "hetlora",
        HetLoRAConfig,
        {"target_modules": ["lin0"], "init_lora_weights": False, "r": 8, "rank": 4},
        {"target_modules": ["lin0"], "init_lora_weights": False, "r": 16, "rank": 2},
    ),
    (
        "HetLoRA Different",
        "hetlora",
        HetLoRAConfig,
        {"target_modules": ["lin0"], "init_lora_weights": False, "r": 8, "rank": 8},
        {"target_modules": ["lin1"], "init_lora_weights": False, "r": 8, "rank": 3},
    ),
]


def _mixed_cases():
    def cfg(**kwargs):
        return HetLoRAConfig(init_lora_weights=False, **kwargs)

    return [
        ("HetLoRA mixed adapter", cfg(target_modules=["lin0"], r=8, rank=4), cfg(target_modules=["lin0"], r=16)),
        (
            "HetLoRA mixed adapter with different target layers",
            cfg(target_modules=["lin0"], r=8, rank=2),
            cfg(target_modules=["lin1"], r=8, rank=5),
        ),
        (
            "HetLoRA mixed adapter with modules to save",
            cfg(target_modules=["lin0"], modules_to_save=["lin1"], r=8, rank=3),
            cfg(target_modules=["lin0"], modules_to_save=["lin1"], r=8, rank=6),
        ),
    ]


# (model_id, config_cls, config_kwargs) for the local decoder models
DECODER_CASES = [
    ("TinyLlama", HetLoRAConfig, {"target_modules": ["q_proj", "v_proj"], "r": 8, "task_type": "CAUSAL_LM"}),
    (
        "TinyLlama",
        HetLoRAConfig,
        {"target_modules": LLAMA_TARGETS, "r": 16, "rank": 4, "r_min": 2, "task_type": "CAUSAL_LM"},
    ),
    ("TinyGPT2", HetLoRAConfig, {"target_modules": ["c_attn", "c_fc"], "r": 8, "rank": 3, "task_type": "CAUSAL_LM"}),
]

# Upstream checks that do not apply to HetLoRA: test name -> reason. Keep the list short and explicit.
NOT_APPLICABLE = {
    "test_weighted_combination_of_adapters": "HetLoRA refuses add_weighted_adapter with NotImplementedError (LoRA's "
    "version assumes rank == r and scale alpha / r); checked in test_peft_integration.py",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise the vendored (undecorated) upstream test methods with the HetLoRA cases."""
    names = set(metafunc.fixturenames)
    if {"test_name", "model_id", "config_cls", "config_kwargs"} <= names:
        metafunc.parametrize(
            "test_name, model_id, config_cls, config_kwargs",
            HETLORA_TEST_CASES,
            ids=[c[0] for c in HETLORA_TEST_CASES],
        )
    elif {"test_name", "tuner_method", "config_kwargs_1", "config_kwargs_2"} <= names:
        metafunc.parametrize(
            "test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2",
            HETLORA_MULTIPLE_ACTIVE_ADAPTERS_CASES,
            ids=[c[0] for c in HETLORA_MULTIPLE_ACTIVE_ADAPTERS_CASES],
        )
    elif {"test_name", "config0", "config1"} <= names:
        cases = _mixed_cases()
        metafunc.parametrize("test_name, config0, config1", cases, ids=[c[0] for c in cases])
    elif {"model_id", "config_cls", "config_kwargs"} <= names:
        ids = [f"{m}-{i}" for i, (m, _, _) in enumerate(DECODER_CASES)]
        metafunc.parametrize("model_id, config_cls, config_kwargs", DECODER_CASES, ids=ids)


@pytest.fixture(autouse=True)
def _offline_and_applicable(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Hub: PEFT's save path looks up `config.json` of `base_model_name_or_path` on the Hub unless offline."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    reason = NOT_APPLICABLE.get(request.function.__name__)
    if reason:
        pytest.skip(reason)


# ----------------------------------------------------------------------------- custom toy models
class TestHetLoRACustomModel(PeftCustomModelTests):
    """Every TEST_CASES-parametrised test of upstream `TestPeftCustomModel`, on the HetLoRA cases."""


class TestHetLoRAMultipleActiveAdapters(MultipleActiveAdaptersTests):
    """Upstream `TestMultipleActiveAdapters` (forward, merge / unmerge, sequential merges) with HetLoRA adapters."""

    def resolve_model_cls(self, tuner_method):
        return super().resolve_model_cls("lora")


class TestHetLoRAMixedAdapterBatches(MixedAdapterBatchesTests):
    """Upstream `TestMixedAdapterBatches` (`adapter_names=[...]` in one batch) with HetLoRA adapters."""


# ----------------------------------------------------------------------------- local decoder models
class LocalDecoderModels:
    """Stands in for `AutoModelForCausalLM` in PEFT's tester: tiny local models, never the Hub."""

    @classmethod
    def from_pretrained(cls, model_id: str, dtype: torch.dtype | None = None, **kwargs):
        if model_id == "TinyLlama":
            model = tiny_llama(seed=0)
        elif model_id == "TinyGPT2":
            model = tiny_gpt2(seed=0)
        elif os.path.isdir(model_id):  # a model the test saved itself
            return AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
        else:
            raise ValueError(f"unknown local model id {model_id!r}")
        model.config.name_or_path = model_id
        model.name_or_path = model_id  # what get_peft_model reads for base_model_name_or_path
        model.config.use_cache = True
        model.generation_config.pad_token_id = 0
        return model.to(dtype) if dtype is not None else model


class TestHetLoRADecoderModels(PeftCommonTester):
    """The decoder-model checks of upstream `test_decoder_models.py` that need `generate` or a real LM."""

    transformers_class = LocalDecoderModels

    def prepare_inputs_for_testing(self):
        input_ids = torch.tensor([[1, 1, 1], [1, 2, 1]]).to(self.torch_device)
        attention_mask = torch.tensor([[1, 1, 1], [1, 0, 1]]).to(self.torch_device)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def test_attributes(self, model_id, config_cls, config_kwargs):
        self._test_model_attr(model_id, config_cls, config_kwargs.copy())

    def test_prepare_for_training(self, model_id, config_cls, config_kwargs):
        self._test_prepare_for_training(model_id, config_cls, config_kwargs.copy())

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_add_adapter_no_autocast_adapter_dtype(self, model_id, config_cls, config_kwargs, dtype):
        self._test_add_adapter_no_autocast_adapter_dtype(model_id, config_cls, config_kwargs.copy(), dtype=dtype)

    def test_save_pretrained(self, model_id, config_cls, config_kwargs):
        self._test_save_pretrained(model_id, config_cls, set_init_weights_false(config_cls, config_kwargs))

    def test_save_pretrained_selected_adapters(self, model_id, config_cls, config_kwargs):
        kwargs = set_init_weights_false(config_cls, config_kwargs)
        self._test_save_pretrained_selected_adapters(model_id, config_cls, kwargs)

    def test_merge_layers(self, model_id, config_cls, config_kwargs):
        self._test_merge_layers(model_id, config_cls, set_init_weights_false(config_cls, config_kwargs))

    def test_merge_layers_multi(self, model_id, config_cls, config_kwargs):
        self._test_merge_layers_multi(model_id, config_cls, set_init_weights_false(config_cls, config_kwargs))

    def test_merge_layers_nan(self, model_id, config_cls, config_kwargs):
        self._test_merge_layers_nan(model_id, config_cls, set_init_weights_false(config_cls, config_kwargs))

    def test_mixed_adapter_batches(self, model_id, config_cls, config_kwargs):
        self._test_mixed_adapter_batches(model_id, config_cls, set_init_weights_false(config_cls, config_kwargs))

    def test_generate_with_mixed_adapter_batches(self, model_id, config_cls, config_kwargs):
        kwargs = set_init_weights_false(config_cls, config_kwargs)
        self._test_generate_with_mixed_adapter_batches_and_beam_search(model_id, config_cls, kwargs)

    def test_generate(self, model_id, config_cls, config_kwargs):
        self._test_generate(model_id, config_cls, config_kwargs.copy())

    def test_generate_pos_args(self, model_id, config_cls, config_kwargs):
        self._test_generate_pos_args(model_id, config_cls, config_kwargs.copy(), raises_err=False)

    def test_generate_half_prec(self, model_id, config_cls, config_kwargs):
        self._test_generate_half_prec(model_id, config_cls, config_kwargs.copy())

    def test_training(self, model_id, config_cls, config_kwargs):
        self._test_training(model_id, config_cls, config_kwargs.copy())

    def test_training_layer_indexing(self, model_id, config_cls, config_kwargs):
        self._test_training_layer_indexing(model_id, config_cls, config_kwargs.copy())

    @pytest.mark.parametrize("use_reentrant", [True, False])
    def test_training_gradient_checkpointing(self, model_id, config_cls, config_kwargs, use_reentrant):
        self._test_training_gradient_checkpointing(
            model_id, config_cls, config_kwargs.copy(), use_reentrant=use_reentrant
        )

    def test_inference_safetensors(self, model_id, config_cls, config_kwargs):
        self._test_inference_safetensors(model_id, config_cls, config_kwargs.copy())

    def test_delete_adapter(self, model_id, config_cls, config_kwargs):
        self._test_delete_adapter(model_id, config_cls, config_kwargs.copy())

    def test_unload_adapter(self, model_id, config_cls, config_kwargs):
        self._test_unload_adapter(model_id, config_cls, set_init_weights_false(config_cls, config_kwargs))

    def test_weighted_combination_of_adapters(self, model_id, config_cls, config_kwargs):
        self._test_weighted_combination_of_adapters(model_id, config_cls, config_kwargs.copy())

    def test_disable_adapter(self, model_id, config_cls, config_kwargs):
        self._test_disable_adapter(model_id, config_cls, set_init_weights_false(config_cls, config_kwargs))

    def test_passing_input_embeds_works(self, model_id, config_cls, config_kwargs):
        self._test_passing_input_embeds_works("", model_id, config_cls, config_kwargs.copy())

    def test_get_base_model_state_dict(self, model_id, config_cls, config_kwargs):
        self._test_get_base_model_state_dict(model_id, config_cls, config_kwargs.copy())
