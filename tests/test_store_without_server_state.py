"""A user's store written against the `AdapterStore` protocol before `server_state=` existed keeps working with
the client callbacks (called without the keyword, one `FutureWarning`); a store that takes it gets the client view."""

from __future__ import annotations

import doctest
import importlib
import json
import warnings

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import Trainer, TrainingArguments

import peft_hetlora
from peft_hetlora.federated.stores import LocalStore
from tests.test_docstrings import FencedDocTestParser
from tests.tiny_models import tiny_llama
from trainer_callbacks import FederatedClientCallback, run_client_rounds
from trainer_callbacks.client_view import accepts_server_state, client_get_global, client_latest_global

TARGETS = ["q_proj", "v_proj"]


def _model(rank: int, seed: int):
    config = peft_hetlora.HetLoRAConfig(r=8, rank=rank, lora_alpha=16, target_modules=TARGETS)
    torch.manual_seed(seed)
    return get_peft_model(tiny_llama(seed=0), config)


def _published(tmp_path) -> LocalStore:
    """A LocalStore with global 0 published for participant alice at rank 4 (as `_publish` in test_callbacks)."""
    store = LocalStore(tmp_path / "fed", create=True)
    folder = tmp_path / "staging"
    folder.mkdir()
    peft_hetlora.HetLoRAConfig(r=8, lora_alpha=16, target_modules=TARGETS).save_pretrained(str(folder))
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(_model(8, 0)).items()}
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "round.json").write_text(json.dumps({"round": 0, "participants": ["alice"], "ranks": {"alice": 4}}))
    store.publish_global(0, folder)
    return store


def _args(tmp_path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1,
                             learning_rate=1e-2, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
                             dataloader_num_workers=0)


def _dataset():
    from datasets import Dataset

    ids = [[(7 * i + j) % 50 for j in range(12)] for i in range(8)]
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _old_store_class():
    """A duck-typed store as the docs describe custom ones, written before `server_state` (a new class per test, so
    the once-per-class bookkeeping starts afresh)."""

    class OldStore:
        def __init__(self, inner: LocalStore) -> None:
            self.inner = inner
            self.calls: list[tuple] = []

        def read_federation(self):
            return self.inner.read_federation()

        def write_federation(self, federation):
            self.inner.write_federation(federation)

        def publish_global(self, round_idx, folder):
            return self.inner.publish_global(round_idx, folder)

        def latest_global(self):
            self.calls.append(("latest_global",))
            return self.inner.latest_global()

        def get_global(self, round_idx):
            self.calls.append(("get_global", round_idx))
            return self.inner.get_global(round_idx)

        def upload_client(self, round_idx, client_id, folder):
            self.inner.upload_client(round_idx, client_id, folder)

        def list_client_uploads(self, round_idx):
            return self.inner.list_client_uploads(round_idx)

        def download_client(self, round_idx, client_id):
            return self.inner.download_client(round_idx, client_id)

        def write_summary(self, round_idx, summary):
            self.inner.write_summary(round_idx, summary)

        def read_summary(self, round_idx):
            return self.inner.read_summary(round_idx)

    return OldStore


def test_a_store_without_the_keyword_runs_a_client_round_with_one_future_warning(tmp_path):
    inner = _published(tmp_path)
    store = _old_store_class()(inner)
    model = _model(4, 1)
    callback = FederatedClientCallback(store, "alice")
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained = run_client_rounds(trainer, callback, max_rounds=1, sleep=lambda s: None)
    assert trained == [0]
    # the upload reached the store, against the global it read without the keyword
    info = json.loads((inner.download_client(0, "alice") / "client.json").read_text())
    assert info["round"] == 0 and info["global_revision"] == inner.get_global(0).revision
    assert ("get_global", 0) in store.calls and ("latest_global",) in store.calls
    future = [w for w in caught if issubclass(w.category, FutureWarning) and "server_state" in str(w.message)]
    assert len(future) == 1, [str(w.message) for w in future]
    message = str(future[0].message)
    assert "OldStore" in message and "*, server_state: bool = True" in message
    # the same store class again: no second warning
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert client_latest_global(store).round == 0 and client_get_global(store, 0).round == 0
    assert not [w for w in again if issubclass(w.category, FutureWarning)]


def test_a_store_with_the_keyword_gets_the_clients_view_without_a_warning(tmp_path):
    inner = _published(tmp_path)
    seen: list[dict] = []

    class NewStore:
        def get_global(self, round_idx, *, server_state=True):
            seen.append({"round": round_idx, "server_state": server_state})
            return inner.get_global(round_idx)

        def latest_global(self, **kwargs):  # **kwargs takes the keyword too
            seen.append(kwargs)
            return inner.latest_global()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert client_get_global(NewStore(), 0).revision == inner.get_global(0).revision
        assert client_latest_global(NewStore()).round == 0
    assert seen == [{"round": 0, "server_state": False}, {"server_state": False}]


def test_a_type_error_inside_a_store_is_never_taken_for_a_missing_keyword(tmp_path):
    calls: list[int] = []

    class Broken:
        def get_global(self, round_idx, *, server_state=True):
            calls.append(round_idx)
            raise TypeError("the store's own bug")

    class OldBroken:
        def get_global(self, round_idx):
            calls.append(round_idx)
            raise TypeError("the old store's own bug")

    with pytest.raises(TypeError, match="the store's own bug"):
        client_get_global(Broken(), 3)
    with pytest.warns(FutureWarning), pytest.raises(TypeError, match="the old store's own bug"):
        client_get_global(OldBroken(), 4)
    assert calls == [3, 4]  # each called once: no retry with or without the keyword


def test_the_signature_is_read_once_per_store_class(monkeypatch):
    import trainer_callbacks.client_view as view

    class Old:
        def latest_global(self):
            return None

    reads: list[object] = []
    real = view.inspect.signature
    monkeypatch.setattr(view.inspect, "signature", lambda f: reads.append(f) or real(f))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for _ in range(3):
            assert client_latest_global(Old()) is None
    assert len(reads) == 1
    assert accepts_server_state(Old().latest_global) is False


def test_client_view_docstring_examples_run():
    finder = doctest.DocTestFinder(parser=FencedDocTestParser())
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in finder.find(importlib.import_module("trainer_callbacks.client_view")):
        if test.examples:
            runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def test_the_built_in_stores_get_the_keyword():
    from peft_hetlora.federated.stores import HubStore

    for cls in (LocalStore, HubStore):
        assert accepts_server_state(cls.get_global) and accepts_server_state(cls.latest_global), cls
