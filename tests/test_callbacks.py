"""Trainer callbacks: regulariser in the optimised loss, pruning, gradient accumulation, federated round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments

import peft_hetlora
from peft_hetlora.federated.aggregation import ClientUpdate, aggregate
from peft_hetlora.federated.stores import LocalStore
from tests.tiny_models import VOCAB_SIZE, tiny_llama
from trainer_callbacks import FederatedClientCallback, HetLoRACallback, run_client_rounds

TARGETS = ["q_proj", "v_proj"]


def make_model(rank=4, r=8, lam=0.0, gamma=0.99, seed=0, r_min=1):
    torch.manual_seed(seed)
    config = peft_hetlora.HetLoRAConfig(
        r=r, rank=rank, r_min=r_min, lora_alpha=16, target_modules=TARGETS, prune_lambda=lam, prune_gamma=gamma
    )
    model = get_peft_model(tiny_llama(seed=seed), config)
    # B starts at zero; give the adapter a non-trivial starting point so tail norms move
    gen = torch.Generator().manual_seed(seed + 1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.05
    return model


def make_dataset(n=16, length=12, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB_SIZE, (n, length), generator=gen)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def make_args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def hand_tail_norm(model, gamma):
    total = torch.zeros(())
    for layer in [m for m in model.modules() if isinstance(m, peft_hetlora.HetLoRALinear)]:
        k = layer.get_active_rank("default")
        t = min(math.floor(gamma * k), k - 1)
        a = layer.lora_A["default"].weight[t:k]
        b = layer.lora_B["default"].weight[:, t:k]
        total = total + torch.sqrt((b**2).sum()) * torch.sqrt((a**2).sum())
    return total


def test_regularizer_in_model_loss_matches_hand_term():
    model = make_model(lam=0.7)
    model.train()
    batch = torch.randint(0, VOCAB_SIZE, (2, 8), generator=torch.Generator().manual_seed(0))
    with_term = model(input_ids=batch, labels=batch).loss
    model.base_model.peft_config["default"].prune_lambda = 0.0
    without = model(input_ids=batch, labels=batch).loss
    expected = 0.7 * hand_tail_norm(model, 0.99)
    torch.testing.assert_close(with_term - without, expected, rtol=1e-5, atol=1e-6)


def test_regularizer_gradient_matches_autograd_of_hand_term():
    model = make_model(lam=0.5)
    model.train()
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    term = model.base_model.regularizer()
    grads = torch.autograd.grad(term, params, allow_unused=True)
    hand = 0.5 * hand_tail_norm(model, 0.99)
    hand_grads = torch.autograd.grad(hand, params, allow_unused=True)
    nonzero = 0
    for g, h in zip(grads, hand_grads):
        g = torch.zeros(()) if g is None else g
        h = torch.zeros(()) if h is None else h
        torch.testing.assert_close(g, h)
        nonzero += int(torch.count_nonzero(g) > 0)
    assert nonzero > 0


def _train(tmp_path, model, callbacks, **args):
    trainer = Trainer(model=model, args=make_args(tmp_path, **args), train_dataset=make_dataset(), callbacks=callbacks)
    trainer.train()
    return trainer


def test_lambda_shrinks_the_tail_faster(tmp_path):
    ends = {}
    for lam in (0.0, 5.0):
        model = make_model(lam=lam)
        callback = HetLoRACallback(prune=False)
        _train(tmp_path / str(lam), model, [callback], max_steps=5)
        ends[lam] = callback.last_round["tail_norm_end"] / callback.last_round["tail_norm_start"]
    assert ends[5.0] < ends[0.0]


def test_pruning_fires_exactly_when_tail_shrinks(tmp_path):
    model = make_model(rank=8, lam=50.0, gamma=0.75)
    callback = HetLoRACallback()
    _train(tmp_path, model, [callback])
    info = callback.last_round
    assert info["tail_norm_end"] < info["tail_norm_start"]
    assert info["rank_out"] == max(1, min(math.floor(0.75 * 8), 7)) == model.get_rank()
    # a growing tail (lambda = 0, large learning rate on zero-init-free B) must not prune
    model = make_model(rank=8, lam=0.0)
    callback = HetLoRACallback()
    start = float(model.base_model.tail_norm())
    _train(tmp_path / "b", model, [callback], learning_rate=0.0)
    assert callback.last_round["tail_norm_end"] == pytest.approx(start)
    assert callback.last_round["rank_out"] == 8


def test_logs_carry_hetlora_values(tmp_path):
    model = make_model(lam=0.3)
    trainer = _train(tmp_path, model, [HetLoRACallback(prune=False)])
    logged = [entry for entry in trainer.state.log_history if "hetlora/rank" in entry]
    assert logged and logged[-1]["hetlora/rank"] == 4.0
    assert logged[-1]["hetlora/regularizer"] == pytest.approx(0.3 * logged[-1]["hetlora/tail_norm"])


def test_gradient_accumulation_equivalence(tmp_path):
    finals = []
    for batch, accum in ((8, 1), (2, 4)):
        model = make_model(lam=2.0)
        _train(
            tmp_path / f"{batch}x{accum}",
            model,
            [HetLoRACallback(prune=False)],
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accum,
            max_steps=2,
            learning_rate=1e-3,
        )
        finals.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    for name in finals[0]:
        torch.testing.assert_close(finals[0][name], finals[1][name], rtol=1e-4, atol=1e-5)


def test_rejects_non_hetlora_model(tmp_path):
    with pytest.raises(TypeError, match="HetLoRA PeftModel"):
        _train(tmp_path, tiny_llama(), [HetLoRACallback()])


def _publish(store, round_idx, state, participants, ranks, r_max=8, r_min=None):
    folder = store.path / f"_staging_{round_idx}"
    folder.mkdir()
    config = peft_hetlora.HetLoRAConfig(r=r_max, lora_alpha=16, target_modules=TARGETS)
    config.save_pretrained(str(folder))
    save_file(state, str(folder / "adapter_model.safetensors"))
    info = {"round": round_idx, "participants": participants, "ranks": ranks}
    if r_min is not None:
        info["r_min"] = r_min
    (folder / "round.json").write_text(json.dumps(info))
    store.publish_global(round_idx, folder)


def test_two_clients_two_rounds_through_local_store(tmp_path):
    store = LocalStore(tmp_path / "fed", create=True)
    init = make_model(rank=8)
    from peft import get_peft_model_state_dict

    global0 = {k: v.detach().clone() for k, v in get_peft_model_state_dict(init).items()}
    ranks = {"alice": 2, "bob": 6}
    _publish(store, 0, global0, ["alice", "bob"], ranks)

    clients = {cid: make_model(rank=rank, seed=i + 10) for i, (cid, rank) in enumerate(ranks.items())}
    for round_idx in range(2):
        for cid, model in clients.items():
            callback = FederatedClientCallback(store, cid)
            trainer = Trainer(
                model=model,
                args=make_args(tmp_path / cid),
                train_dataset=make_dataset(seed=len(cid)),
                callbacks=[callback],
            )
            # the model starts each round from the published global, truncated to its rank
            trained = run_client_rounds(trainer, callback, max_rounds=1, sleep=lambda s: None)
            assert trained == [round_idx]
            uploaded = store.download_client(round_idx, cid)
            info = json.loads((uploaded / "client.json").read_text())
            weights = load_file(str(uploaded / "adapter_model.safetensors"))
            assert info["round"] == round_idx and info["rank_in"] == ranks[cid]
            assert info["global_revision"] == store.get_global(round_idx).revision
            assert info["num_examples"] == 16 and info["train_loss"] is not None
            assert {w.shape[0] for k, w in weights.items() if k.endswith("lora_A.weight")} == {info["rank_out"]}
        updates = []
        for cid in ranks:
            folder = store.download_client(round_idx, cid)
            info = json.loads((folder / "client.json").read_text())
            updates.append(
                ClientUpdate(
                    cid, load_file(str(folder / "adapter_model.safetensors")), info["rank_out"], info["num_examples"]
                )
            )
        result = aggregate(updates, method="hetlora", r_max=8)
        _publish(store, round_idx + 1, result.state_dict, list(ranks), ranks)
        # a client re-running the round it already uploaded does nothing
        callback = FederatedClientCallback(store, "alice")
        assert callback.already_uploaded(round_idx)

    # round 1 started from the round-1 global: alice's rank-2 model after pull equals its truncation
    model = make_model(rank=2, seed=99)
    callback = FederatedClientCallback(store, "alice")
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path / "check", max_steps=1, learning_rate=0.0),
        train_dataset=make_dataset(),
        callbacks=[callback],
    )
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=model)
    global2 = load_file(str(store.latest_global().path / "adapter_model.safetensors"))
    from peft import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(model)
    for key, value in loaded.items():
        expected = global2[key][:2] if key.endswith("lora_A.weight") else global2[key][:, :2]
        torch.testing.assert_close(value, expected)


def test_client_errors_before_training(tmp_path):
    store = LocalStore(tmp_path / "fed", create=True)
    model = make_model(rank=4)
    with pytest.raises(RuntimeError, match="no global adapter yet"):
        _train(tmp_path, model, [FederatedClientCallback(store, "alice")])
    with pytest.raises(ValueError, match="Invalid client id"):
        FederatedClientCallback(store, "../evil")
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(make_model(rank=8))
    _publish(store, 0, state, ["alice"], {"alice": 6})
    with pytest.raises(RuntimeError, match="not a participant"):
        _train(tmp_path, model, [FederatedClientCallback(store, "carol")])
    other = {k.replace("q_proj", "k_proj"): v for k, v in state.items()}
    store2 = LocalStore(tmp_path / "fed2", create=True)
    _publish(store2, 0, other, ["alice"], {"alice": 2})
    with pytest.raises(ValueError, match="does not fit this model"):
        _train(tmp_path, model, [FederatedClientCallback(store2, "alice")])


def test_client_prunes_no_lower_than_the_federation_r_min(tmp_path):
    from peft import get_peft_model_state_dict

    store = LocalStore(tmp_path / "fed", create=True)
    state = {k: v + 0.05 for k, v in get_peft_model_state_dict(make_model(rank=8)).items()}
    _publish(store, 0, state, ["alice"], {"alice": 3}, r_min=3)
    model = make_model(rank=3, lam=50.0, gamma=0.5)  # local default r_min=1 would allow 3 -> 1
    callback = FederatedClientCallback(store, "alice")
    _train(tmp_path, model, [callback])
    assert callback.last_round["tail_norm_end"] < callback.last_round["tail_norm_start"]
    assert callback.last_round["rank_out"] == 3


def test_config_rank_follows_a_loaded_adapter(tmp_path):
    model = make_model(rank=8)
    model.set_rank(3)
    model.save_pretrained(str(tmp_path / "pruned"))
    fresh = make_model(rank=8, seed=5)
    fresh.load_adapter(str(tmp_path / "pruned"), adapter_name="default", is_trainable=True)
    assert fresh.get_rank() == 3
    assert fresh.peft_config["default"].rank == 3
    fresh.save_pretrained(str(tmp_path / "again"))
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert saved["rank"] == 3


def test_final_global_ends_the_client_loop(tmp_path):
    from peft import get_peft_model_state_dict

    store = LocalStore(tmp_path / "fed", create=True)
    state = get_peft_model_state_dict(make_model(rank=8))
    _publish(store, 0, state, ["alice"], {"alice": 4})
    folder = store.path / "_final"
    folder.mkdir()
    peft_hetlora.HetLoRAConfig(r=8, lora_alpha=16, target_modules=TARGETS).save_pretrained(str(folder))
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "round.json").write_text(json.dumps({"round": 1, "participants": ["alice"], "final": True}))
    store.publish_global(1, folder)
    model = make_model(rank=4)
    callback = FederatedClientCallback(store, "alice")
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=make_dataset(), callbacks=[callback])
    assert run_client_rounds(trainer, callback, max_rounds=5, sleep=lambda s: None) == []
    trainer.train()  # a direct train() on a final global does nothing and uploads nothing
    assert store.list_client_uploads(1) == []


def test_unloaded_base_model_keeps_no_regulariser_hook():
    model = make_model(lam=1.0)
    base = model.unload()
    batch = torch.randint(0, VOCAB_SIZE, (2, 8), generator=torch.Generator().manual_seed(0))
    base.train()
    plain = tiny_llama(seed=0)
    plain.train()
    torch.testing.assert_close(base(input_ids=batch, labels=batch).loss, plain(input_ids=batch, labels=batch).loss)


# ----------------------------------------------------------------------------- the federation's settings
def _published_store(tmp_path, ranks, **config):
    """A store whose global 0 is an r=8, lora_alpha=16 adapter on TARGETS (plus `config` overrides)."""
    from peft import get_peft_model_state_dict

    store = LocalStore(tmp_path / "fed", create=True)
    folder = tmp_path / "global0"
    model = get_peft_model(
        tiny_llama(), peft_hetlora.HetLoRAConfig(**{"r": 8, "lora_alpha": 16, "target_modules": TARGETS, **config})
    )
    model.save_pretrained(str(folder))
    save_file(get_peft_model_state_dict(model), str(folder / "adapter_model.safetensors"))
    (folder / "round.json").write_text(json.dumps({"round": 0, "participants": list(ranks), "ranks": ranks}))
    store.publish_global(0, folder)
    return store


@pytest.mark.parametrize(
    "field, client, shown",
    [
        ("lora_alpha", {"lora_alpha": 8}, ("8.0", "16.0")),  # the README's old snippet: scale 1.0 vs 2.0
        ("r", {"r": 16}, ("16", "8")),
        ("rank_scaling", {"rank_scaling": "rslora"}, ("'rslora'", "'fixed'")),
        ("target_modules", {"target_modules": ["q_proj"]}, ("['q_proj']", "['q_proj', 'v_proj']")),
        ("layers_to_transform", {"layers_to_transform": [1]}, ("[1]", "None")),
    ],
)
def test_client_with_other_math_settings_is_refused_before_any_step(tmp_path, field, client, shown):
    from peft_hetlora.utils.errors import ConfigMismatchError, HetLoRAError

    store = _published_store(tmp_path, {"alice": 4})
    settings = {"r": 8, "rank": 4, "lora_alpha": 16, "target_modules": TARGETS, **client}
    model = get_peft_model(tiny_llama(), peft_hetlora.HetLoRAConfig(**settings))
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=make_dataset(),
                      callbacks=[FederatedClientCallback(store, "alice")])
    with pytest.raises(ConfigMismatchError) as info:
        trainer.train()
    message = str(info.value)
    assert isinstance(info.value, HetLoRAError)
    assert f"{field}: this client has {shown[0]} but the federation has {shown[1]}" in message
    assert "from_federation" in message  # the fix
    assert trainer.state.global_step == 0 and store.list_client_uploads(0) == []
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_check_matches_federation_covers_layer_math_fields():
    from peft_hetlora.federation_config import check_matches_federation
    from peft_hetlora.utils.errors import ConfigMismatchError

    ours = {"r": 8, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"], "layers_to_transform": 1}
    # equal up to representation: list order, int vs [int], int vs float alpha, defaults spelled out
    check_matches_federation(ours, {"r": 8, "lora_alpha": 16.0, "target_modules": ["q_proj", "v_proj"],
                                    "layers_to_transform": [1], "bias": "none", "fan_in_fan_out": False})
    for field, value in (("bias", "lora_only"), ("fan_in_fan_out", True), ("layers_pattern", "h")):
        with pytest.raises(ConfigMismatchError, match=f"{field}: this client has"):
            check_matches_federation(ours, {**ours, field: value})


def test_rank_above_the_device_budget_trains_at_the_budget(tmp_path):

    store = _published_store(tmp_path, {"alice": 7, "bob": 7})
    for cid, rank, max_rank, expected in (("alice", 4, None, 4), ("bob", 6, 3, 3)):
        model = make_model(rank=rank)
        callback = FederatedClientCallback(store, cid, max_rank=max_rank)
        _train(tmp_path / cid, model, [callback])  # assigned 7 > budget: no error
        folder = store.download_client(0, cid)
        info = json.loads((folder / "client.json").read_text())
        weights = load_file(str(folder / "adapter_model.safetensors"))
        assert info["rank_in"] == expected and info["max_rank"] == expected
        assert {w.shape[0] for k, w in weights.items() if k.endswith("lora_A.weight")} == {info["rank_out"]}
        assert info["rank_out"] <= expected


def test_budget_below_the_federation_r_min_is_refused(tmp_path):
    from peft_hetlora.utils.errors import RankError

    store = LocalStore(tmp_path / "fed", create=True)
    from peft import get_peft_model_state_dict

    _publish(store, 0, get_peft_model_state_dict(make_model(rank=8)), ["alice"], {"alice": 4}, r_min=3)
    with pytest.raises(RankError, match="r_min=3"):
        _train(tmp_path, make_model(rank=2), [FederatedClientCallback(store, "alice")])
    with pytest.raises(RankError, match="max_rank .* must be >= 1, got 0"):
        FederatedClientCallback(store, "alice", max_rank=0)


def test_from_federation_builds_a_config_that_cannot_differ(tmp_path):
    from peft_hetlora.utils.errors import ConfigMismatchError

    store = _published_store(tmp_path, {"alice": 2}, lora_alpha=32, rank_scaling="rslora", layers_to_transform=[1])
    config = peft_hetlora.HetLoRAConfig.from_federation(store, rank=3, prune_lambda=0.5)
    assert (config.r, config.rank, config.lora_alpha, config.rank_scaling) == (8, 3, 32, "rslora")
    assert sorted(config.target_modules) == sorted(TARGETS) and config.layers_to_transform == [1]
    assert config.prune_lambda == 0.5 and config.scaling == pytest.approx(32 / math.sqrt(8))
    # the same from the global's folder, and a contradiction is refused
    assert peft_hetlora.HetLoRAConfig.from_federation(store.latest_global().path).lora_alpha == 32
    with pytest.raises(ConfigMismatchError, match="lora_alpha"):
        peft_hetlora.HetLoRAConfig.from_federation(store, lora_alpha=16)
    # one call: the model fits, trains at min(assigned=2, budget=3) and uploads
    model = peft_hetlora.get_federated_model(tiny_llama(), store, max_rank=3)
    assert model.get_rank() == 3
    _train(tmp_path, model, [FederatedClientCallback(store, "alice")])
    info = json.loads((store.download_client(0, "alice") / "client.json").read_text())
    assert info["rank_in"] == 2 and info["max_rank"] == 3


def test_from_federation_refuses_a_budget_below_r_min(tmp_path):
    from peft_hetlora.utils.errors import RankError

    store = _published_store(tmp_path, {"alice": 4}, r_min=3)
    assert peft_hetlora.HetLoRAConfig.from_federation(store, rank=3).r_min == 3
    with pytest.raises(RankError, match="r_min=3"):
        peft_hetlora.HetLoRAConfig.from_federation(store, rank=2)


# ---------------------------------------------------------------------- window clients (docs/design.md#component-rule)
def _publish_window(tmp_path, components, ranks=None, r_min=None, seed=21):
    """Global 0 at r_max=8 with every component non-zero; round.json assigns `components` per client."""
    from peft import get_peft_model_state_dict

    store = LocalStore(tmp_path / "fed", create=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(make_model(rank=8)).items()}
    state = {k: torch.randn(shape, generator=gen) * 0.1 for k, shape in shapes.items()}
    folder = tmp_path / "global0"
    folder.mkdir()
    peft_hetlora.HetLoRAConfig(r=8, lora_alpha=16, target_modules=TARGETS).save_pretrained(str(folder))
    save_file(state, str(folder / "adapter_model.safetensors"))
    info = {"round": 0, "participants": list(components), "components": components,
            "ranks": ranks or {cid: len(c) for cid, c in components.items()}}
    if r_min is not None:
        info["r_min"] = r_min
    (folder / "round.json").write_text(json.dumps(info))
    store.publish_global(0, folder)
    return store, state


def _same_rows_dataset(n=8, length=12, seed=5):
    row = torch.randint(0, VOCAB_SIZE, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": [row] * n, "labels": [row] * n}), torch.tensor([row])


@pytest.mark.parametrize("frozen", ["factors", "merged"])
def test_window_client_trains_the_whole_global_and_uploads_only_its_components(tmp_path, frozen):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    store, state = _publish_window(tmp_path, {"alice": [6, 1, 5]})
    dataset, row = _same_rows_dataset()
    # the reference: the whole rank-8 global on a plain client, computed independently of the window code
    reference = make_model(rank=8, seed=7)  # the same base model as the client's
    set_peft_model_state_dict(reference, state)
    reference.eval()
    with torch.no_grad():
        global_loss = float(reference(input_ids=row, labels=row).loss)
    model = make_model(rank=4, seed=7)  # budget 4 > the window: trains exactly the 3 assigned components
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    callback = FederatedClientCallback(store, "alice", frozen=frozen)
    trainer = Trainer(model=model, args=make_args(tmp_path, learning_rate=0.0, max_steps=2),
                      train_dataset=dataset, callbacks=[callback])
    trainer.train()
    # with lr 0 the client's training loss is the global model's loss: its model is the global model
    assert trainer.state.log_history[-1]["train_loss"] == pytest.approx(global_loss, rel=1e-5)
    folder = store.download_client(0, "alice")
    info = json.loads((folder / "client.json").read_text())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert info["components"] == [1, 5, 6] and info["rank_in"] == 3 and info["rank_out"] == 3
    for key, value in weights.items():
        expected = state[key][[1, 5, 6]] if key.endswith("lora_A.weight") else state[key][:, [1, 5, 6]]
        torch.testing.assert_close(value, expected)  # lr 0: exactly the global's components 1, 5, 6
    # end of the round: the frozen part is gone and the base weights are the base again
    assert model.base_model.frozen_components() == []
    for key, value in model.state_dict().items():
        if key in base_before:
            torch.testing.assert_close(value, base_before[key], rtol=0, atol=1e-6)
    assert set(get_peft_model_state_dict(model)) == set(weights)


def test_window_training_moves_only_the_window_same_for_factors_and_merged(tmp_path):
    uploads = {}
    for frozen in ("factors", "merged"):
        store, state = _publish_window(tmp_path / frozen, {"bob": [0, 3, 7]})
        model = make_model(rank=3, seed=7)
        _train(tmp_path / frozen, model, [FederatedClientCallback(store, "bob", frozen=frozen)], max_steps=3)
        uploads[frozen] = load_file(str(store.download_client(0, "bob") / "adapter_model.safetensors"))
        moved = [not torch.allclose(v, state[k][[0, 3, 7]] if k.endswith("A.weight") else state[k][:, [0, 3, 7]])
                 for k, v in uploads[frozen].items()]
        assert any(moved)
    for key, value in uploads["factors"].items():
        torch.testing.assert_close(value, uploads["merged"][key], rtol=1e-4, atol=1e-5)


def test_window_is_cut_to_the_budget_and_pruning_shrinks_the_uploaded_components(tmp_path):
    store, _ = _publish_window(tmp_path, {"carol": [7, 2, 4, 5, 6]})
    model = make_model(rank=4, lam=50.0, gamma=0.5)  # budget 4: keeps 2, 4, 5, 6 (the lowest indices)
    callback = FederatedClientCallback(store, "carol")
    _train(tmp_path, model, [callback])
    info = json.loads((store.download_client(0, "carol") / "client.json").read_text())
    assert info["rank_in"] == 4 and info["max_rank"] == 4
    assert callback.last_round["pruned"] and info["rank_out"] == 2
    assert info["components"] == [2, 4]  # the window's tail (highest indices) went first
    weights = load_file(str(store.download_client(0, "carol") / "adapter_model.safetensors"))
    assert {w.shape[0] for k, w in weights.items() if k.endswith("lora_A.weight")} == {2}


@pytest.mark.parametrize("bad", [[1, 1], [8], [-1], [], "0,1", [True]])
def test_malformed_components_in_round_json_are_refused_before_any_step(tmp_path, bad):
    from peft_hetlora.utils.errors import RankError

    store, _ = _publish_window(tmp_path, {"dave": bad}, ranks={"dave": 2})
    model = make_model(rank=4)
    trainer = Trainer(model=model, args=make_args(tmp_path), train_dataset=make_dataset(),
                      callbacks=[FederatedClientCallback(store, "dave")])
    with pytest.raises(RankError, match="components"):
        trainer.train()
    assert trainer.state.global_step == 0 and store.list_client_uploads(0) == []


def test_a_client_without_components_after_a_window_round_is_back_on_the_prefix(tmp_path):
    store, state = _publish_window(tmp_path, {"erin": [3, 4]})
    model = make_model(rank=4)
    first = FederatedClientCallback(store, "erin", prune=False)
    _train(tmp_path, model, [first], max_steps=1)
    assert first.last_round["components"] == [3, 4]
    assert model.get_components() == [0, 1] and model.base_model.frozen_components() == []
    model.set_rank(4)  # a plain model again: what the simulator does between rounds
    store2 = LocalStore(tmp_path / "fed2", create=True)
    _publish(store2, 0, state, ["erin"], {"erin": 3})
    _train(tmp_path / "b", model, [FederatedClientCallback(store2, "erin")], max_steps=1)
    info = json.loads((store2.download_client(0, "erin") / "client.json").read_text())
    assert "components" not in info and info["rank_in"] == 3
    assert model.get_components() == [0, 1, 2] and model.peft_config["default"].components is None


def test_window_client_with_nested_training_draws_per_step_and_uploads_its_window(tmp_path):
    store, _ = _publish_window(tmp_path, {"finn": [1, 2, 5, 7]}, r_min=2)
    model = make_model(rank=4)
    callback = FederatedClientCallback(store, "finn", nested=True, prune=False)
    _train(tmp_path, model, [callback], max_steps=4, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    assert len(callback.nested_draws) == 4 and all(2 <= d <= 4 for d in callback.nested_draws)
    info = json.loads((store.download_client(0, "finn") / "client.json").read_text())
    assert info["components"] == [1, 2, 5, 7] and info["rank_out"] == 4
    assert all(layer._truncation["default"] is None
               for layer in model.modules() if isinstance(layer, peft_hetlora.HetLoRALinear))


@pytest.mark.parametrize("module_name", ["trainer_callbacks", "trainer_callbacks.federated_client",
                                         "trainer_callbacks.hetlora_callback", "trainer_callbacks.processes",
                                         "trainer_callbacks.rounds"])
def test_trainer_callbacks_docstring_examples_run(module_name):
    import doctest
    import importlib

    from tests.test_docstrings import FencedDocTestParser

    finder = doctest.DocTestFinder(parser=FencedDocTestParser())
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in finder.find(importlib.import_module(module_name)):
        if test.examples:
            runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
