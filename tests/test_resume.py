"""Checkpoint resume of a federated client: kill at step k, resume in a fresh Trainer, the upload is bit-identical
to the uninterrupted round's; a checkpoint of another round is refused; a round that trained no step uploads
nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainerState

from peft_hetlora.federated.stores import LocalStore
from tests.test_callbacks import _publish, make_args, make_dataset, make_model
from trainer_callbacks import FederatedClientCallback, HetLoRACallback, run_client_rounds
from trainer_callbacks.federated_client import CheckpointMismatchError
from trainer_callbacks.hetlora_callback import checkpoint_round_start

MAX_STEPS = 5


class Killed(Exception):
    """The process dies right after checkpoint `at` was written."""


class KillAfterSave(TrainerCallback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise Killed(self.at)


def global_state():
    """Global 0 at r_max=8: a trained-looking adapter (non-zero B), from an independent model."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(make_model(rank=8, seed=4)).items()}


def fresh_store(path, state, round_idx=0):
    store = LocalStore(path, create=True)
    _publish(store, round_idx, state, ["alice"], {"alice": 3})
    return store


def client_trainer(tmp_path, store, out, extra=(), **args):
    """A fresh client process: a new model object (budget 4 > the assigned rank 3), callback and Trainer."""
    model = make_model(rank=4, lam=5.0, gamma=0.75, seed=11)
    callback = FederatedClientCallback(store, "alice")
    values = dict(max_steps=MAX_STEPS, save_strategy="steps", save_steps=1, per_device_train_batch_size=2)
    values.update(args)
    trainer = Trainer(model=model, args=make_args(out, **values), train_dataset=make_dataset(n=24),
                      callbacks=[callback, *extra])
    return trainer, callback


def upload(store, round_idx=0):
    folder = store.download_client(round_idx, "alice")
    return load_file(str(folder / "adapter_model.safetensors")), json.loads((folder / "client.json").read_text())


# variant -> (TrainingArguments overrides, the steps after whose checkpoint the client is killed);
# MAX_STEPS: killed after the final checkpoint, before the upload
VARIANTS = {
    "plain": ({}, (1, 3, MAX_STEPS)),
    "grad-accum": ({"gradient_accumulation_steps": 2}, (2, MAX_STEPS)),
    "grad-checkpointing": ({"gradient_checkpointing": True}, (3, MAX_STEPS)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kill_and_resume_uploads_exactly_the_uninterrupted_round(tmp_path, variant):
    state = global_state()
    args, kills = VARIANTS[variant]
    straight = fresh_store(tmp_path / "straight", state)
    trainer, _ = client_trainer(tmp_path, straight, tmp_path / "straight-out", save_strategy="no", **args)
    trainer.train()
    expected, expected_info = upload(straight)
    moved = [not torch.equal(v, state[k][:3] if k.endswith("lora_A.weight") else state[k][:, :3])
             for k, v in expected.items() if v.shape == (state[k][:3] if k.endswith("lora_A.weight")
                                                         else state[k][:, :3]).shape]
    assert any(moved) or expected_info["rank_out"] < 3  # the round trained: the test could tell a lost resume
    for kill_at in kills:
        store = fresh_store(tmp_path / f"kill{kill_at}", state)
        out = tmp_path / f"kill{kill_at}-out"
        trainer, _ = client_trainer(tmp_path, store, out, extra=[KillAfterSave(kill_at)], **args)
        with pytest.raises(Killed):
            trainer.train()
        assert store.list_client_uploads(0) == []  # killed: nothing uploaded
        trainer, callback = client_trainer(tmp_path, store, out, **args)
        trainer.train(resume_from_checkpoint=True)
        got, info = upload(store)
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert torch.equal(got[key], value), (variant, kill_at, key)  # bit-identical
        for field in ("rank_in", "rank_out", "tail_norm_start", "tail_norm_end", "global_revision", "num_examples"):
            assert info[field] == expected_info[field], (variant, kill_at, field)
        assert callback.uploaded_rounds == [0]


def test_resume_before_the_fix_would_have_differed(tmp_path):
    """The guard of the test above: reloading the global on resume (the old behaviour) changes the upload."""
    state = global_state()
    straight = fresh_store(tmp_path / "straight", state)
    client_trainer(tmp_path, straight, tmp_path / "a", save_strategy="no")[0].train()
    expected, _ = upload(straight)
    store = fresh_store(tmp_path / "kill", state)
    trainer, _ = client_trainer(tmp_path, store, tmp_path / "b", extra=[KillAfterSave(3)])
    with pytest.raises(Killed):
        trainer.train()
    trainer, callback = client_trainer(tmp_path, store, tmp_path / "b")
    resume = callback._resume_round

    def reload_global(peft_model, latest, identity, saved):  # what on_train_begin did before: the global wins
        resume(peft_model, latest, identity, saved)
        callback._load_global(peft_model, latest)

    callback._resume_round = reload_global
    trainer.train(resume_from_checkpoint=True)
    got, _ = upload(store)
    assert any(not torch.equal(got[k], v) for k, v in expected.items() if got[k].shape == v.shape) or (
        {k: v.shape for k, v in got.items()} != {k: v.shape for k, v in expected.items()})


def test_a_checkpoint_of_the_previous_round_is_refused(tmp_path):
    state = global_state()
    store = fresh_store(tmp_path / "fed", state)
    out = tmp_path / "out"
    client_trainer(tmp_path, store, out)[0].train()  # round 0, checkpoints 1..5 in out
    assert store.list_client_uploads(0) == ["alice"]
    _publish(store, 1, {k: v * 0.5 for k, v in state.items()}, ["alice"], {"alice": 3})
    trainer, callback = client_trainer(tmp_path, store, out)
    with pytest.raises(CheckpointMismatchError) as info:
        trainer.train(resume_from_checkpoint=True)  # a script that always resumes: picks checkpoint-5 of round 0
    message = str(info.value)
    assert "round: checkpoint 0, open round 1" in message and "without resume_from_checkpoint" in message
    assert store.list_client_uploads(1) == [] and callback.uploaded_rounds == []
    # what the message says to do works: a fresh round 1
    trainer, callback = client_trainer(tmp_path, store, tmp_path / "out1")
    trainer.train()
    assert callback.uploaded_rounds == [1]


def test_a_checkpoint_without_round_identity_is_refused(tmp_path):
    state = global_state()
    store = fresh_store(tmp_path / "fed", state)
    out = tmp_path / "out"
    model = make_model(rank=3, seed=11)
    Trainer(model=model, args=make_args(out, max_steps=2, save_strategy="steps", save_steps=1),
            train_dataset=make_dataset(), callbacks=[HetLoRACallback()]).train()
    trainer, _ = client_trainer(tmp_path, store, out)
    with pytest.raises(CheckpointMismatchError, match="carries no HetLoRA round identity"):
        trainer.train(resume_from_checkpoint=True)
    assert store.list_client_uploads(0) == []


def test_a_checkpoint_of_another_client_is_refused(tmp_path):
    state = global_state()
    store = LocalStore(tmp_path / "fed", create=True)
    _publish(store, 0, state, ["alice", "bob"], {"alice": 3, "bob": 3})
    out = tmp_path / "out"
    trainer, _ = client_trainer(tmp_path, store, out, extra=[KillAfterSave(2)])
    with pytest.raises(Killed):
        trainer.train()
    model = make_model(rank=4, seed=11)
    bob = Trainer(model=model, args=make_args(out, max_steps=MAX_STEPS, save_steps=1, save_strategy="steps",
                                              per_device_train_batch_size=2),
                  train_dataset=make_dataset(n=24), callbacks=[FederatedClientCallback(store, "bob")])
    with pytest.raises(CheckpointMismatchError, match="client_id: checkpoint 'alice', open round 'bob'"):
        bob.train(resume_from_checkpoint=True)
    assert store.list_client_uploads(0) == []


def test_a_round_that_trained_no_step_uploads_nothing(tmp_path, caplog):
    # transformers 5 runs one step even when a callback stops training at train begin, so the round's events are
    # driven by hand here: the round begins, then ends at step 0
    store = fresh_store(tmp_path / "fed", global_state())
    trainer, callback = client_trainer(tmp_path, store, tmp_path / "out")
    events = dict(model=trainer.model, train_dataloader=trainer.get_train_dataloader())
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, **events)
    assert trainer.state.global_step == 0
    with caplog.at_level("WARNING"):
        callback.on_train_end(trainer.args, trainer.state, trainer.control, **events)
    assert store.list_client_uploads(0) == [] and callback.uploaded_rounds == []
    assert "trained no step" in callback.not_uploaded[0] and "not uploaded" in caplog.text


def test_restore_callback_states_flag_is_refused_with_the_reason(tmp_path):
    store = fresh_store(tmp_path / "fed", global_state())
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint"):
        client_trainer(tmp_path, store, tmp_path / "out", restore_callback_states_from_checkpoint=True)


def test_deepspeed_and_fsdp_clients_are_refused(tmp_path, monkeypatch):
    store = fresh_store(tmp_path / "fed", global_state())
    args = make_args(tmp_path)  # built before the launcher's environment (transformers would import deepspeed)
    callback = FederatedClientCallback(store, "alice")
    callback._check_args(args)  # plain (DDP) training is fine
    for variable, kind in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        monkeypatch.setenv(variable, "true")
        with pytest.raises(NotImplementedError, match=f"does not support {kind}.*torchrun"):
            callback._check_args(args)
        monkeypatch.delenv(variable)


def test_run_client_rounds_resume_continues_its_round_and_passes_over_older_rounds(tmp_path):
    state = global_state()
    straight = fresh_store(tmp_path / "straight", state)
    client_trainer(tmp_path, straight, tmp_path / "a", save_strategy="no")[0].train()
    expected, _ = upload(straight)
    store = fresh_store(tmp_path / "fed", state)
    out = tmp_path / "out"
    trainer, callback = client_trainer(tmp_path, store, out, extra=[KillAfterSave(2)])
    with pytest.raises(Killed):
        run_client_rounds(trainer, callback, max_rounds=1, sleep=lambda s: None, resume=True)
    trainer, callback = client_trainer(tmp_path, store, out)  # the restarted script, same command line
    checkpoints = Path(trainer.args.output_dir)
    assert callback.resumable_checkpoint(checkpoints) == str(checkpoints / "checkpoint-2")
    assert run_client_rounds(trainer, callback, max_rounds=1, sleep=lambda s: None, resume=True) == [0]
    got, _ = upload(store)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    _publish(store, 1, {k: v * 0.5 for k, v in state.items()}, ["alice"], {"alice": 3})
    trainer, callback = client_trainer(tmp_path, store, out)  # round 0's checkpoints are still in out
    assert callback.resumable_checkpoint(checkpoints) is None and (checkpoints / "checkpoint-5").is_dir()
    assert run_client_rounds(trainer, callback, max_rounds=1, sleep=lambda s: None, resume=True) == [1]
    assert callback.uploaded_rounds == [1]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=3),
                    max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(entry=JSON, name=st.sampled_from(["FederatedClientCallback", "HetLoRACallback", "Other"]))
def test_checkpoint_round_start_of_any_stored_json_is_a_dict_or_none(entry, name):
    state = TrainerState(stateful_callbacks={name: entry})
    found = checkpoint_round_start(state, "FederatedClientCallback")
    assert found is None or isinstance(found, dict)
    if name == "FederatedClientCallback" and isinstance(entry, dict) and isinstance(entry.get("attributes"), dict):
        stored = entry["attributes"].get("hetlora_round")
        assert found == (stored if isinstance(stored, dict) else None)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(saved=st.dictionaries(st.sampled_from(["federation", "round", "client_id", "global_revision", "rank"]), JSON))
def test_a_checkpoint_identity_that_differs_in_anything_is_refused(tmp_path_factory, saved):
    store = fresh_store(tmp_path_factory.mktemp("fed"), global_state())
    callback = FederatedClientCallback(store, "alice")
    latest = store.latest_global()
    identity = callback.round_identity(latest)
    if all(saved.get(k) == v for k, v in identity.items()):
        return  # (hypothesis cannot guess the global's sha256)
    with pytest.raises(CheckpointMismatchError, match="without resume_from_checkpoint"):
        callback._resume_round(None, latest, identity, saved)  # refused before the model is touched


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40) | JSON.map(json.dumps))
def test_resumable_checkpoint_passes_over_any_broken_trainer_state(tmp_path_factory, text):
    store = fresh_store(tmp_path_factory.mktemp("fed"), global_state())
    out = tmp_path_factory.mktemp("out")
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "trainer_state.json").write_text(text)
    (out / "checkpoint-x").mkdir()
    assert FederatedClientCallback(store, "alice").resumable_checkpoint(out) is None


@pytest.mark.parametrize("frozen, nested", [("factors", True), ("merged", False)])  # merged cannot nest
def test_window_client_resumes_bit_identically(tmp_path, frozen, nested):
    """A window round (the global's other components frozen), with nested draws where they apply: the resumed round
    re-creates the frozen part from the global, keeps the checkpoint's window and continues the round's draws."""
    from tests.test_callbacks import _publish_window

    uploads, draws = {}, {}
    for name, kill_at in (("straight", None), ("killed", 3)):
        store, _ = _publish_window(tmp_path / name, {"alice": [6, 1, 5]}, r_min=1)
        args = make_args(tmp_path / f"{name}-out", max_steps=MAX_STEPS, save_strategy="steps", save_steps=1,
                         per_device_train_batch_size=2)
        for extra in ([KillAfterSave(kill_at)] if kill_at else []), []:
            model = make_model(rank=4, lam=5.0, gamma=0.75, seed=11)
            callback = FederatedClientCallback(store, "alice", frozen=frozen, nested=nested)
            trainer = Trainer(model=model, args=args, train_dataset=make_dataset(n=24), callbacks=[callback, *extra])
            if extra:
                with pytest.raises(Killed):
                    trainer.train()
                continue
            trainer.train(resume_from_checkpoint=True if kill_at else None)
            break
        uploads[name], info = upload(store)
        assert set(info["components"]) <= {1, 5, 6} and len(info["components"]) == info["rank_out"]
        draws[name] = callback.nested_draws
    if nested:  # the resumed round's draws go on from the checkpoint's step
        assert len(draws["killed"]) == MAX_STEPS - 3 and draws["killed"] == draws["straight"][3:]
    assert set(uploads["killed"]) == set(uploads["straight"])
    for key, value in uploads["straight"].items():
        assert torch.equal(uploads["killed"][key], value), key


def test_the_federation_fingerprint_survives_an_extension_and_nothing_else(tmp_path):
    store = fresh_store(tmp_path / "fed", global_state())
    callback = FederatedClientCallback(store, "alice")
    assert callback.federation_fingerprint() is None  # no federation.json
    federation = {"base_model": "org/base", "r_min": 2, "r_max": 8, "rounds": 2}
    store.write_federation(federation)
    first = callback.federation_fingerprint()
    store.write_federation({**federation, "rounds": 5})  # the coordinator extends the federation
    assert callback.federation_fingerprint() == first
    store.write_federation({**federation, "r_max": 16})
    assert callback.federation_fingerprint() != first
