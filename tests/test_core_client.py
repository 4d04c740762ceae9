"""Core clients through the Trainer callback: start point, only the core trains, upload, resume, save / load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

import peft_hetlora
from peft_hetlora.federated.adapter.core import CORE_SUFFIX, core_bases, core_seed, expand_core
from peft_hetlora.federated.adapter.core_model import core_state_dict, in_core_mode, start_core, stop_core
from peft_hetlora.federated.stores import LocalStore
from tests.test_callbacks import TARGETS, make_args, make_dataset, make_model
from trainer_callbacks import FederatedClientCallback

SCALE = 16 / 8  # lora_alpha / r_max of make_model


def _global(seed=21, zero_b=False):
    gen = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(make_model(rank=8)).items()}
    state = {k: torch.randn(shape, generator=gen) * 0.1 for k, shape in shapes.items()}
    if zero_b:
        state = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in state.items()}
    return state


def _publish(tmp_path, state, cores, ranks, round_idx=0):
    store = LocalStore(tmp_path / "fed", create=True)
    folder = tmp_path / f"global{round_idx}"
    folder.mkdir()
    peft_hetlora.HetLoRAConfig(r=8, lora_alpha=16, target_modules=TARGETS).save_pretrained(str(folder))
    save_file(state, str(folder / "adapter_model.safetensors"))
    info = {"round": round_idx, "participants": list(ranks), "ranks": ranks, "cores": cores,
            "client_training": "core"}
    (folder / "round.json").write_text(json.dumps(info))
    store.publish_global(round_idx, folder)
    return store


def _modules(state):
    return sorted(k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight"))


def _delta(model, module):
    """s B A of one layer of the model, float64 (the layer's own delta weight)."""
    name = module.removeprefix("base_model.model.")
    layer = model.base_model.model.get_submodule(name)
    return layer.get_delta_weight("default").detach().double()


@pytest.mark.parametrize("zero_b", [False, True])
def test_core_mode_starts_at_the_global_truncated_to_r_c(zero_b):
    state = _global(zero_b=zero_b)
    model = make_model(rank=2)
    start_core(model, state, 4)
    assert in_core_mode(model)
    for module in _modules(state):
        b_g, a_g = state[f"{module}.lora_B.weight"].double().numpy(), state[f"{module}.lora_A.weight"].double().numpy()
        dense = SCALE * b_g @ a_g
        u, s, vh = np.linalg.svd(dense)
        reference = (u[:, :4] * s[:4]) @ vh[:4]
        np.testing.assert_allclose(_delta(model, module).numpy(), reference, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("parametrizations.weight.original" in n for n in trainable)
    assert all(p.shape == (4, 4) for n, p in model.named_parameters() if p.requires_grad)
    # save / load in core mode: a plain rank-4 adapter of held factors, and loading it back restores the core
    saved = get_peft_model_state_dict(model)
    assert all(v.shape[0 if ".lora_A." in k else 1] == 4 for k, v in saved.items())
    cores = core_state_dict(model)
    for p in model.parameters():
        if p.requires_grad:
            p.data.add_(0.5)
    set_peft_model_state_dict(model, saved)
    for key, value in core_state_dict(model).items():
        torch.testing.assert_close(value, cores[key], atol=1e-6, rtol=1e-5)
    stop_core(model)
    assert not in_core_mode(model)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def _train(store, tmp_path, model, cid="alice", steps=3, extra=(), **args):
    callback = FederatedClientCallback(store, cid)
    values = dict(max_steps=steps, learning_rate=5e-2)
    values.update(args)
    trainer = Trainer(model=model, args=make_args(tmp_path / cid, **values), train_dataset=make_dataset(),
                      callbacks=[callback, *extra])
    return trainer, callback


def test_core_client_trains_only_the_core_and_uploads_it(tmp_path):
    state = _global()
    store = _publish(tmp_path, state, {"alice": 4}, {"alice": 2, "bob": 8})
    model = make_model(rank=2, seed=3)  # allocated at rank 2: the core round grows the frozen bases to 4
    trainer, callback = _train(store, tmp_path, model)
    trainer.train()
    folder = store.download_client(0, "alice")
    upload = load_file(str(folder / "adapter_model.safetensors"))
    info = json.loads((folder / "client.json").read_text())
    modules = _modules(state)
    assert set(upload) == {m + CORE_SUFFIX for m in modules}
    assert all(v.shape == (4, 4) for v in upload.values())
    assert info["core_rank"] == 4 and info["rank_in"] == info["rank_out"] == 2 and info["max_rank"] == 2
    moved = 0
    for module in modules:
        a_g, b_g = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        bases = core_bases(a_g, b_g, 4, seed=core_seed(module, a_g, b_g), scaling=SCALE)  # the server's rebuild
        core = upload[module + CORE_SUFFIX]
        moved += not torch.allclose(core, bases.initial_core(), atol=1e-7)
        a_k, b_k = expand_core(core, bases)
        # the client's held model is exactly the server's expansion of the uploaded core
        np.testing.assert_allclose(_delta(model, module).numpy(), SCALE * (b_k.double() @ a_k.double()).numpy(),
                                   atol=1e-5)
        # the frozen A did not move: it is V_c^T
        name = module.removeprefix("base_model.model.")
        a_model = model.base_model.model.get_submodule(name).lora_A["default"].weight[:4]
        np.testing.assert_allclose(a_model.double().detach().numpy(), bases.v.T.numpy(), atol=1e-6)
    assert moved == len(modules)
    assert not in_core_mode(model) and callback.core_rank == 4
    assert callback.budget == 2


def test_core_client_below_its_assigned_rank_trains_its_own_smaller_core(tmp_path):
    state = _global()
    store = _publish(tmp_path, state, {"alice": 8}, {"alice": 4})
    callback = FederatedClientCallback(store, "alice", max_rank=1)
    trainer = Trainer(model=make_model(rank=4), args=make_args(tmp_path / "a", max_steps=1),
                      train_dataset=make_dataset(), callbacks=[callback])
    trainer.train()
    info = json.loads((store.download_client(0, "alice") / "client.json").read_text())
    # the tiny model's modules are (32, 32), (32, 16), (48, 32), ...: rank 1 affords r_c = 3 on the 32 -> 16 ones
    widths = [layer.in_features + layer.out_features
              for _, layer in trainer.model.base_model.hetlora_layers("default")]
    expected = max(r for r in range(1, 9) if all(r * w + 4 * r * r <= 4 * w and r * r <= w for w in widths))
    assert info["core_rank"] == expected < 8 and info["rank_in"] == 1


class Killed(Exception):
    pass


class KillAfterSave(TrainerCallback):
    def __init__(self, at):
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise Killed(self.at)


def test_core_round_resumes_from_a_checkpoint_to_the_same_upload(tmp_path):
    state = _global()
    args = dict(max_steps=4, save_strategy="steps", save_steps=1, per_device_train_batch_size=2)
    straight = _publish(tmp_path / "s", state, {"alice": 4}, {"alice": 2})
    _train(straight, tmp_path / "s", make_model(rank=8, seed=5), **{**args, "save_strategy": "no"})[0].train()
    expected = load_file(str(straight.download_client(0, "alice") / "adapter_model.safetensors"))
    store = _publish(tmp_path / "k", state, {"alice": 4}, {"alice": 2})
    trainer, _ = _train(store, tmp_path / "k", make_model(rank=8, seed=5), extra=[KillAfterSave(2)], **args)
    with pytest.raises(Killed):
        trainer.train()
    assert store.list_client_uploads(0) == []
    trainer, callback = _train(store, tmp_path / "k", make_model(rank=8, seed=5), **args)
    trainer.train(resume_from_checkpoint=True)
    got = load_file(str(store.download_client(0, "alice") / "adapter_model.safetensors"))
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
    assert callback.core_rank == 4


def test_a_core_round_of_a_small_device_resumes_after_its_layers_grew(tmp_path):
    """A rank-2 device (allocated 2) trains a 4 x 4 core: its checkpoint holds rank-4 held factors, which the
    Trainer loads truncated into a fresh rank-2 model; the callback reads them from the checkpoint instead."""
    state = _global()
    args = dict(max_steps=4, save_strategy="steps", save_steps=1, per_device_train_batch_size=2)
    straight = _publish(tmp_path / "s", state, {"alice": 4}, {"alice": 2})
    _train(straight, tmp_path / "s", make_model(rank=2, seed=5), **{**args, "save_strategy": "no"})[0].train()
    expected = load_file(str(straight.download_client(0, "alice") / "adapter_model.safetensors"))
    store = _publish(tmp_path / "k", state, {"alice": 4}, {"alice": 2})
    trainer, _ = _train(store, tmp_path / "k", make_model(rank=2, seed=5), extra=[KillAfterSave(2)], **args)
    with pytest.raises(Killed):
        trainer.train()
    trainer, callback = _train(store, tmp_path / "k", make_model(rank=2, seed=5), **args)
    trainer.train(resume_from_checkpoint=True)
    got = load_file(str(store.download_client(0, "alice") / "adapter_model.safetensors"))
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
    assert callback.budget == 2


def test_core_mode_sees_through_wrappers():
    """The simulator's activation-cache wrapper (and DDP) hold the PEFT model as `.module`."""
    wrapper = torch.nn.Module()
    wrapper.module = make_model(rank=2)
    start_core(wrapper, _global(), 3)
    assert in_core_mode(wrapper) and all(v.shape == (3, 3) for v in core_state_dict(wrapper).values())
    stop_core(wrapper)
    assert not in_core_mode(wrapper.module)
