"""HetLoRA as a PEFT method end to end: saving, loading at other ranks, Auto classes, adapters, dtypes,
gradient checkpointing, `export_lora` (checked in a process that never imports peft_hetlora) and
Trainer checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_hetlora import HetLoRAConfig, export_lora

try:  # pytest puts tests/ on sys.path when tests/ is not a package ...
    from tiny_models import LLAMA_TARGETS, one_thread_per_module, randomize_adapter, tiny_llama, token_batch  # noqa: F401  (autouse fixture)
except ImportError:  # ... and the repository root when it is
    from tests.tiny_models import LLAMA_TARGETS, one_thread_per_module, randomize_adapter, tiny_llama, token_batch  # noqa: F401  (autouse fixture)


IDS = token_batch(batch=2, length=10)


def hetlora(r: int = 16, rank: int | None = None, **kwargs) -> HetLoRAConfig:
    kwargs.setdefault("target_modules", LLAMA_TARGETS)
    kwargs.setdefault("lora_alpha", 32)
    return HetLoRAConfig(r=r, rank=rank, **kwargs)


def adapted(r: int = 16, rank: int | None = None, seed: int = 0, **kwargs) -> PeftModel:
    model = get_peft_model(tiny_llama(), hetlora(r, rank, **kwargs))
    randomize_adapter(model, seed=seed, std=0.1)
    return model.eval()


@torch.no_grad()
def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(folder / "adapter_model.safetensors").items()}


# ----------------------------------------------------------------------------- saving
@pytest.mark.parametrize("allocated", [16, 4])
def test_save_writes_only_active_components(tmp_path, allocated):
    model = adapted(16, allocated)
    model.set_rank(4)
    model.save_pretrained(tmp_path / "het")
    shapes = saved_shapes(tmp_path / "het")
    assert shapes and not any("rank_mask" in key for key in shapes)
    for key, shape in shapes.items():
        assert shape[0 if ".lora_A." in key else 1] == 4, key
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=32, target_modules=LLAMA_TARGETS))
    lora.save_pretrained(tmp_path / "lora")
    assert shapes == saved_shapes(tmp_path / "lora")  # same keys, same shapes as a rank-4 LoRA
    het_size = (tmp_path / "het" / "adapter_model.safetensors").stat().st_size
    lora_size = (tmp_path / "lora" / "adapter_model.safetensors").stat().st_size
    assert abs(het_size - lora_size) <= 0.02 * lora_size
    assert json.loads((tmp_path / "het" / "adapter_config.json").read_text())["rank"] == 4


@pytest.mark.parametrize("ranks", [4, "mixed"])
def test_from_pretrained_round_trip(tmp_path, ranks):
    model = adapted(16, 16)
    if ranks == "mixed":
        names = [name for name, _ in model.base_model.hetlora_layers()]
        model.set_rank({name: 1 + i % 7 for i, name in enumerate(names)})
    else:
        model.set_rank(ranks)
    expected_rank = model.get_rank()
    expected = logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.get_rank() == expected_rank
    torch.testing.assert_close(logits(loaded), expected)


# ----------------------------------------------------------------------------- loading at another rank
def test_load_into_smaller_rank_truncates(tmp_path):
    model = adapted(16, 8)
    model.save_pretrained(tmp_path)
    model.set_rank(3)
    expected = logits(model)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, config=hetlora(16, 3))
    assert loaded.get_rank() == 3
    assert loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 3
    torch.testing.assert_close(logits(loaded), expected)


def test_load_into_larger_rank_pads_and_keeps_active_rank(tmp_path):
    model = adapted(16, 4)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, config=hetlora(16, 12))
    layer = loaded.base_model.model.model.layers[1].mlp.down_proj
    assert layer.lora_A["default"].weight.shape[0] == 12
    assert loaded.get_rank() == 4
    assert torch.count_nonzero(layer.lora_B["default"].weight[:, 4:]) == 0
    torch.testing.assert_close(logits(loaded), expected)
    # load_adapter as a second adapter follows the same rule
    loaded.load_adapter(tmp_path, adapter_name="again")
    assert loaded.get_rank("again") == 4


def test_load_rank_above_r_max_raises(tmp_path):
    adapted(16, 16).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"r_max=8.*HetLoRAConfig\(r>=16\)"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, config=hetlora(8, 8))


def test_low_cpu_mem_usage_load_keeps_per_module_ranks(tmp_path):
    model = adapted(16, 8)
    names = [name for name, _ in model.base_model.hetlora_layers()]
    ranks = {name: 2 + i % 6 for i, name in enumerate(names)}
    model.set_rank(ranks)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    assert {b.device.type for b in loaded.buffers()} == {"cpu"}
    assert loaded.get_rank() == ranks
    torch.testing.assert_close(logits(loaded), expected)
    loaded.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    assert loaded.get_rank("other") == ranks


# ----------------------------------------------------------------------------- auto classes, adapters
def test_auto_peft_model_from_local_folder(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, hetlora(16, 6, task_type="CAUSAL_LM"))
    randomize_adapter(model, seed=3, std=0.1)
    model.eval()
    model.set_rank(5)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "base")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded.peft_config["default"], HetLoRAConfig)
    assert loaded.get_rank() == 5
    torch.testing.assert_close(logits(loaded), expected)


def test_disable_adapter_context():
    model = adapted(16, 4)
    base = logits(tiny_llama())
    with_adapter = logits(model)
    assert not torch.allclose(with_adapter, base)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base)
    torch.testing.assert_close(logits(model), with_adapter)


def test_several_adapters_with_different_ranks(tmp_path):
    model = adapted(16, 8)
    model.add_adapter("small", hetlora(16, 2, r_min=2))
    randomize_adapter(model, seed=7, std=0.1)  # randomises both adapters
    model.set_rank(5, adapter_name="default")
    assert model.get_rank("default") == 5 and model.get_rank("small") == 2
    out_default = logits(model)
    model.set_adapter("small")
    assert model.get_rank() == 2
    out_small = logits(model)
    assert not torch.allclose(out_default, out_small)
    # each adapter alone gives the same result from its saved folder
    model.save_pretrained(tmp_path)
    assert (tmp_path / "small" / "adapter_model.safetensors").is_file()
    shapes_small = saved_shapes(tmp_path / "small")
    assert all(s[0 if ".lora_A." in k else 1] == 2 for k, s in shapes_small.items())
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    reloaded.load_adapter(tmp_path / "small", adapter_name="small")
    assert reloaded.get_rank("default") == 5 and reloaded.get_rank("small") == 2
    torch.testing.assert_close(logits(reloaded), out_default)
    reloaded.set_adapter("small")
    torch.testing.assert_close(logits(reloaded), out_small)
    # an adapter that is not active is left alone by set_rank on the active one
    reloaded.set_rank(1)
    assert reloaded.get_rank("default") == 5
    with pytest.raises(ValueError, match="No adapter named"):
        reloaded.get_rank("missing")


def test_add_weighted_adapter_is_refused_clearly():
    model = adapted(8, 4)
    model.add_adapter("other", hetlora(8, 2))
    with pytest.raises(NotImplementedError, match="export_lora"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "combined", combination_type="cat")
    assert "combined" not in model.peft_config


@pytest.mark.parametrize("trainable", [False, True])
def test_is_trainable_on_load(tmp_path, trainable):
    adapted(16, 4).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=trainable)
    lora = {n: p.requires_grad for n, p in loaded.named_parameters() if ".lora_" in n}
    assert lora and set(lora.values()) == {trainable}
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if ".lora_" not in n)
    assert loaded.peft_config["default"].inference_mode is (not trainable)


# ----------------------------------------------------------------------------- training details
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_training_step(use_reentrant):
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = adapted(8, 8, prune_lambda=0.1)
        model.set_rank(3)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)
        active = checkpointed[name][:3] if ".lora_A." in name else checkpointed[name][:, :3]
        inactive = checkpointed[name][3:] if ".lora_A." in name else checkpointed[name][:, 3:]
        assert torch.count_nonzero(active) > 0 and torch.count_nonzero(inactive) == 0


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_forward_close_to_fp32(dtype, tol):
    model = adapted(16, 6)
    model.set_rank(4)
    reference = logits(model)
    half = get_peft_model(tiny_llama(dtype=dtype), hetlora(16, 6))
    half.load_state_dict(model.state_dict())
    half.eval()
    assert half.get_rank() == 4
    out = logits(half)
    assert torch.isfinite(out).all()
    assert (out - reference).abs().max().item() < tol * max(1.0, reference.abs().max().item())
    # the adapter contribution itself survives the cast (not just the base model's output)
    delta_ref = reference - logits(tiny_llama())
    delta_half = out - logits(tiny_llama(dtype=dtype))
    cos = torch.nn.functional.cosine_similarity(delta_ref.flatten(), delta_half.flatten(), dim=0)
    assert cos.item() > 0.98


# ----------------------------------------------------------------------------- export_lora
_PLAIN_PEFT_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "peft_hetlora" or name.startswith("peft_hetlora."):
                raise ImportError("peft_hetlora must not be imported here")
    sys.meta_path.insert(0, Block())
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM
    base_dir, ids_file, out_file, *adapters = sys.argv[1:]
    ids = torch.load(ids_file)
    result = {}
    for folder in adapters:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder).eval()
        auto = AutoPeftModelForCausalLM.from_pretrained(folder).eval()  # finds the base model on its own
        with torch.no_grad():
            result[folder] = model(input_ids=ids).logits
            result[folder + ":auto"] = auto(input_ids=ids).logits
        result[folder + ":type"] = type(model.peft_config["default"]).__name__
        result[folder + ":auto_type"] = type(auto.peft_config["default"]).__name__
    assert not any(m.startswith("peft_hetlora") for m in sys.modules), "peft_hetlora was imported"
    torch.save(result, out_file)
    """
)


def test_export_lora_loads_with_plain_peft(tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    cases = {}
    # uniform: allocated at r_max, active 4, rslora scale
    model = adapted(16, 16, seed=1, rank_scaling="rslora")
    model.set_rank(4)
    # AutoPeftModelForCausalLM needs the base model's location: given here, carried over below
    cases["uniform"] = (logits(model), export_lora(model, tmp_path / "uniform", base_model_name_or_path=str(base_dir)))
    # a task_type instead of PEFT's auto_mapping (what `hetlora init` adapters carry)
    cases["task-type"] = (
        logits(model),
        export_lora(model, tmp_path / "task-type", base_model_name_or_path=str(base_dir), task_type="CAUSAL_LM"),
    )
    # mixed per-module ranks, exported from a saved folder
    model = adapted(16, 8, seed=2, lora_alpha=24)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)  # as if loaded from base_dir
    names = [name for name, _ in model.base_model.hetlora_layers()]
    model.set_rank({name: 1 + (3 * i) % 8 for i, name in enumerate(names)})
    model.save_pretrained(tmp_path / "mixed-het")
    cases["mixed"] = (logits(model), export_lora(tmp_path / "mixed-het", tmp_path / "mixed"))
    # mixed, exported straight from the model
    cases["mixed-model"] = (logits(model), export_lora(model, tmp_path / "mixed-model"))

    mixed_config = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    assert mixed_config["peft_type"] == "LORA"
    assert mixed_config["rank_pattern"] and mixed_config["alpha_pattern"]
    for key, value in mixed_config["rank_pattern"].items():
        assert mixed_config["alpha_pattern"][key] == pytest.approx(24 / 16 * value)
    torch.save(IDS, tmp_path / "ids.pt")
    script = tmp_path / "plain_peft.py"
    script.write_text(_PLAIN_PEFT_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    folders = [str(folder) for _, folder in cases.values()]
    proc = subprocess.run(
        [sys.executable, str(script), str(base_dir), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"), *folders],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt")
    for name, (expected, folder) in cases.items():
        assert result[str(folder) + ":type"] == result[str(folder) + ":auto_type"] == "LoraConfig"
        torch.testing.assert_close(result[str(folder)].float(), expected, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(result[str(folder) + ":auto"].float(), expected, rtol=1e-4, atol=1e-5, msg=name)
    saved = json.loads((tmp_path / "task-type" / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM" and saved["base_model_name_or_path"] == str(base_dir)


# ----------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_keeps_rank_mask():
    model = adapted(8, 8)
    names = [name for name, _ in model.base_model.hetlora_layers()]
    ranks = {name: 1 + i % 8 for i, name in enumerate(names)}
    model.set_rank(ranks)
    expected = logits(model)
    state = model.state_dict()
    assert any("lora_rank_mask" in key for key in state)
    fresh = get_peft_model(tiny_llama(), hetlora(8, 8))
    assert fresh.get_rank() == 8
    fresh.load_state_dict(state)
    assert fresh.get_rank() == ranks
    torch.testing.assert_close(logits(fresh.eval()), expected)


def test_trainer_checkpoint_resume_keeps_rank(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = token_batch(batch=1, length=12, seed=i)[0]
            return {"input_ids": ids, "labels": ids}

    def args(max_steps: int) -> TrainingArguments:
        return TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=max_steps,
            per_device_train_batch_size=2,
            save_steps=2,
            save_strategy="steps",
            learning_rate=1e-3,
            report_to=[],
            use_cpu=True,
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )

    model = adapted(8, 8, task_type="CAUSAL_LM")
    model.set_rank(3)
    Trainer(model=model, args=args(2), train_dataset=Tokens()).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    shapes = saved_shapes(checkpoint)
    assert all(s[0 if ".lora_A." in k else 1] == 3 for k, s in shapes.items())
    expected = logits(model.eval())

    fresh = get_peft_model(tiny_llama(), hetlora(8, 8, task_type="CAUSAL_LM"))
    assert fresh.get_rank() == 8
    trainer = Trainer(model=fresh, args=args(2), train_dataset=Tokens())
    trainer.train(resume_from_checkpoint=str(checkpoint))  # loads weights and optimizer state, no more steps
    assert fresh.get_rank() == 3
    torch.testing.assert_close(logits(fresh.eval()), expected)
    # training can go on from the checkpoint with the allocation the optimizer state was saved with
    trainer = Trainer(model=fresh, args=args(3), train_dataset=Tokens())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert fresh.get_rank() == 3
