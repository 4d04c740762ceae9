"""The base model as a checked fact: the hash of the adapted weights, recorded by `hetlora init`, checked by
`get_federated_model`; the export records a base that loads offline."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

import peft_hetlora
from peft_hetlora.base_identity import (
    BASE_IDENTITY_FIELD,
    BaseModelMismatchError,
    base_identity,
    check_base_model,
    weights_sha256,
)
from peft_hetlora.cli import main
from peft_hetlora.federated import LocalStore
from peft_hetlora.utils.errors import ConfigMismatchError
from tests.tiny_models import randomize_adapter, tiny_llama, token_batch

ROOT = Path(__file__).resolve().parents[1]
ADAPTED = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]  # q, v of layer 1 (by hand)


# ----------------------------------------------------------------------------- an independent reference
def _bf16_bytes(array: np.ndarray) -> bytes:
    """float32 -> bfloat16 by round-to-nearest-even on the bits (numpy has no bfloat16)."""
    bits = array.astype("<f4").view("<u4").astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    return rounded.tobytes()


def reference_hash(model: torch.nn.Module, names: list[str], dtype: str) -> str:
    digest = hashlib.sha256()
    modules = dict(model.named_modules())
    for name in sorted(names):
        weight = modules[name].weight.detach().numpy()
        digest.update(f"{name}:{list(weight.shape)}:{dtype}\n".encode())
        if dtype == "float32":
            digest.update(weight.astype("<f4").tobytes())
        elif dtype == "float16":
            digest.update(weight.astype("<f2").tobytes())
        else:
            digest.update(_bf16_bytes(weight))
    return digest.hexdigest()


def _config(**overrides):
    values = dict(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    values.update(overrides)
    return peft_hetlora.HetLoRAConfig(**values)


def test_the_record_hashes_exactly_the_adapted_weights():
    model = tiny_llama(seed=3)
    record = base_identity(model, _config(), name="tiny", revision="r1")
    assert record["modules"] == 2 and record["name"] == "tiny" and record["revision"] == "r1"
    for dtype in ("float32", "bfloat16", "float16"):
        assert record["weights_sha256"][dtype] == reference_hash(model, ADAPTED, dtype), dtype
    # weights the adapter does not correct (layer 0, k_proj, norms, embeddings) are not hashed
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(1.0)
        model.model.layers[1].self_attn.k_proj.weight.add_(1.0)
        model.model.norm.weight.add_(1.0)
    assert base_identity(model, _config(), name="tiny")["weights_sha256"] == record["weights_sha256"]
    # a wrapped model hashes the same base weights under the same names
    from peft import get_peft_model

    peft_model = get_peft_model(tiny_llama(seed=3), _config())
    assert base_identity(peft_model, _config(), name="x")["weights_sha256"]["float32"] == reference_hash(
        tiny_llama(seed=3), ADAPTED, "float32")


def test_a_client_in_half_precision_of_the_same_checkpoint_matches():
    record = base_identity(tiny_llama(seed=1), _config(), name="tiny")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_base_model(tiny_llama(seed=1, dtype=dtype), _config(), record)  # no error


def test_one_changed_weight_is_refused_with_both_hashes_and_the_fix():
    record = base_identity(tiny_llama(seed=1), _config(), name="the-base")
    other = tiny_llama(seed=1)
    with torch.no_grad():
        weight = other.model.layers[1].self_attn.v_proj.weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1e9))  # one ulp
    with pytest.raises(BaseModelMismatchError) as info:
        check_base_model(other, _config(), record)
    message = str(info.value)
    assert record["weights_sha256"]["float32"][:16] in message and "'the-base'" in message
    assert reference_hash(other, ADAPTED, "float32")[:16] in message and "load the base model" in message
    assert isinstance(info.value, ConfigMismatchError)  # callers catching the config error catch this one


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["weights_sha256", "modules", "name", "float32", "bfloat16", "format"]), inner, max_size=4),
    max_leaves=12,
))
def test_a_hostile_record_is_refused_as_a_mismatch_never_a_crash(record):
    """federation.json is written by whoever holds the store: any JSON there gives a clear refusal."""
    model = tiny_llama(seed=0)
    try:
        check_base_model(model, _config(), record)
    except BaseModelMismatchError as err:
        assert "federation" in str(err)
    else:  # only a record that really names these weights (or none at all) passes
        assert record is None


def test_weights_sha256_matches_numpy_for_any_weights():
    @given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=12))
    @settings(max_examples=80, deadline=None)
    def check(values):
        array = np.asarray(values, dtype=np.float32).reshape(1, -1)
        expected = hashlib.sha256(f"m:{list(array.shape)}:float32\n".encode() + array.astype("<f4").tobytes())
        assert weights_sha256([("m", torch.from_numpy(array))], torch.float32) == expected.hexdigest()
        expected16 = hashlib.sha256(f"m:{list(array.shape)}:bfloat16\n".encode() + _bf16_bytes(array))
        assert weights_sha256([("m", torch.from_numpy(array))], torch.bfloat16) == expected16.hexdigest()

    check()


# ----------------------------------------------------------------------------- init records it, clients check it
@pytest.fixture
def base_dir(tmp_path):
    folder = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(folder)
    return folder


def _init(store, base, *extra):
    return main(["init", "--store", str(store), "--base-model", str(base), "--r-max", "4", "--lora-alpha", "8",
                 "--target-modules", "q_proj,v_proj", "--layers", "1", "--clients", "alice,bob", *extra])


def _adapted_layers(model):
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def test_init_records_the_base_and_clients_are_checked(tmp_path, base_dir, capsys):
    from transformers import AutoModelForCausalLM

    fed = tmp_path / "fed"
    assert _init(fed, base_dir) == 0
    record = LocalStore(fed).read_federation()[BASE_IDENTITY_FIELD]
    assert record["name"] == str(base_dir) and record["modules"] == 2
    assert record["weights_sha256"]["float32"] == reference_hash(tiny_llama(seed=0), ADAPTED, "float32")

    for dtype in (torch.float32, torch.bfloat16):  # the same folder, loaded as the client likes
        model = peft_hetlora.get_federated_model(
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), LocalStore(fed), max_rank=2)
        assert model.get_rank() == 2
        assert model.peft_config["default"].base_model_name_or_path == str(base_dir)  # what it loaded

    other = tiny_llama(seed=5)  # another base with the same shapes: the config check alone passes it
    with pytest.raises(BaseModelMismatchError, match="not the federation's"):
        peft_hetlora.get_federated_model(other, LocalStore(fed), max_rank=2)
    assert not _adapted_layers(other)  # refused before anything was injected into the client's model

    # init again with another base on the same store: refused, the record is unchanged
    other_dir = tmp_path / "other"
    tiny_llama(seed=5).save_pretrained(other_dir)
    capsys.readouterr()
    assert _init(fed, other_dir, "--base-model-id", str(base_dir)) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetlora: error: init: ") and "another base model" in err and err.count("\n") == 1
    assert LocalStore(fed).read_federation()[BASE_IDENTITY_FIELD] == record


def test_a_federation_from_before_the_record_loads_with_one_notice(tmp_path, base_dir, caplog, monkeypatch):
    import peft_hetlora.base_identity as base_identity_module

    monkeypatch.setattr(base_identity_module, "_NOTICES_GIVEN", {})  # as in a fresh process
    fed = tmp_path / "fed"
    assert _init(fed, base_dir) == 0
    federation_file = fed / "federation.json"
    federation = json.loads(federation_file.read_text())
    del federation[BASE_IDENTITY_FIELD]
    federation_file.write_text(json.dumps(federation))
    with caplog.at_level(logging.WARNING, logger="peft_hetlora.base_identity"):
        model = peft_hetlora.get_federated_model(tiny_llama(seed=9), LocalStore(fed), max_rank=2)
        peft_hetlora.get_federated_model(tiny_llama(seed=9), LocalStore(fed), max_rank=2)  # a second client
    assert model.get_rank() == 2
    notices = [r for r in caplog.records if r.name == "peft_hetlora.base_identity"]
    assert len(notices) == 1 and "not checked" in notices[0].getMessage()


# ----------------------------------------------------------------------------- the export loads offline
def _save_word_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(str(folder))


class _CountingServer:
    """A loopback TCP listener that counts connections (stands for the Hub; nothing outside is contacted)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self):
        self.sock.close()


_LOAD = """
import json, sys, torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor(json.loads(sys.argv[2]))
print("LOGITS " + json.dumps(model(input_ids=ids).logits[0, -1, :8].tolist()))
"""


def test_export_records_a_local_base_that_loads_offline_without_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = Path("base")  # relative, as a user types it
    tiny_llama(seed=0).save_pretrained(base)
    _save_word_tokenizer(base, 96)
    from peft import get_peft_model

    het = get_peft_model(tiny_llama(seed=0), _config(rank=3))
    randomize_adapter(het)
    het.peft_config["default"].base_model_name_or_path = "base"
    het.save_pretrained("het")
    ids = token_batch()
    expected = het(input_ids=ids).logits[0, -1, :8]

    assert main(["export", "het", "lora"]) == 0
    config = json.loads(Path("lora/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    assert (Path("lora") / "tokenizer_config.json").is_file()

    hub = _CountingServer()
    try:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"),
               "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
        env.pop("HF_HUB_OFFLINE", None)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        proc = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path / "lora"), json.dumps(ids.tolist())],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    finally:
        hub.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits = torch.tensor(json.loads(proc.stdout.split("LOGITS ", 1)[1]))
    torch.testing.assert_close(logits, expected.detach(), rtol=1e-5, atol=1e-5)
    assert hub.connections == 0, "the export's load asked the Hub"
    assert "Unable to fetch remote file" not in proc.stderr

    # --base-model-name-or-path records what the operator names (here the same folder, elsewhere)
    moved = tmp_path / "moved-base"
    base.rename(moved)
    assert main(["export", "het", "lora2", "--base-model-name-or-path", str(moved)]) == 0
    assert json.loads(Path("lora2/adapter_config.json").read_text())["base_model_name_or_path"] == str(moved)
    plain = PeftModel.from_pretrained(tiny_llama(seed=0), "lora2")
    torch.testing.assert_close(plain(input_ids=ids).logits[0, -1, :8], expected, rtol=1e-5, atol=1e-5)


def test_the_builtin_spec_exports_as_its_local_folder(tmp_path, monkeypatch):
    from peft_hetlora.commands.export import usable_base

    converted = tmp_path / "models" / "smollm2-135m"
    converted.mkdir(parents=True)
    monkeypatch.setattr("peft_hetlora.model_source.resolve_model", lambda spec: converted)
    assert usable_base("smollm2-135m") == str(converted.resolve())
    assert usable_base("./my-model") == "./my-model" and usable_base(None) is None


def test_a_trainer_client_built_without_get_federated_model_is_checked_too(tmp_path, base_dir):
    """A script that wraps its own model (plain `get_peft_model`, TRL's `peft_config`) reaches the callback only:
    the callback checks the base against federation.json before the first step, and uploads nothing."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from peft_hetlora import HetLoRAConfig
    from trainer_callbacks import FederatedClientCallback

    fed = tmp_path / "fed"
    assert _init(fed, base_dir) == 0
    store = LocalStore(fed)
    ids = [[1, 2, 3, 4, 5, 6, 7, 8]] * 4
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    for seed, refused in ((0, False), (5, True)):
        config = HetLoRAConfig.from_federation(store, rank=2)
        model = get_peft_model(tiny_llama(seed=seed), config)
        args = TrainingArguments(str(tmp_path / f"out{seed}"), max_steps=1, per_device_train_batch_size=4,
                                 report_to=[], use_cpu=True)
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          callbacks=[FederatedClientCallback(store, client_id="alice" if seed == 0 else "bob")])
        if refused:
            with pytest.raises(BaseModelMismatchError, match="not the federation's"):
                trainer.train()
            assert store.list_client_uploads(0) == ["alice"]  # bob uploaded nothing
        else:
            trainer.train()
