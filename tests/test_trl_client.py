"""TRL's `SFTTrainer` as a HetLoRA client (examples/trl_sft_client.py): a 2-client, 2-round federation on a
LocalStore with a tiny model; the exported plain-LoRA adapter computes what the final global computes."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_hetlora.federated import LocalStore
from tests.tiny_models import VOCAB_SIZE, tiny_llama

pytest.importorskip("trl")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_sft_client.py"


def word_tokenizer(texts: list[str]):
    """A word-level tokenizer over `texts` (no download): [PAD]=0, [UNK]=1, [EOS]=2, then the words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in texts for w in text.replace(".", " ").replace(",", " ").replace(";", " ").split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    assert len(vocab) <= VOCAB_SIZE
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def test_sft_trainer_clients_in_a_two_round_federation(tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, get_peft_model, set_peft_model_state_dict

    import peft_hetlora
    from peft_hetlora.cli import main as hetlora

    example = runpy.run_path(str(EXAMPLE), run_name="trl_sft_client")
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    word_tokenizer(example["TEXTS"]).save_pretrained(base)
    monkeypatch.chdir(tmp_path)
    assert hetlora(["init", "--store", "fed", "--base-model", str(base), "--r-max", "8", "--r-min", "2",
                    "--lora-alpha", "16", "--target-modules", "q_proj,v_proj", "--clients", "alice,bob",
                    "--rounds", "2"]) == 0
    store = LocalStore("fed")
    for round_idx in range(2):
        for client_id, max_rank in (("alice", "4"), ("bob", "8")):
            trained = example["main"](["--store", "fed", "--client-id", client_id, "--max-rank", max_rank,
                                       "--model", str(base), "--max-steps", "2", "--output-dir", f"out/{client_id}"])
            assert trained == [round_idx]
        assert sorted(store.list_client_uploads(round_idx)) == ["alice", "bob"]
        assert hetlora(["coordinate", "--store", "fed"]) == 0
        assert sorted(store.read_summary(round_idx)["accepted"]) == ["alice", "bob"]
    final = store.latest_global()
    assert final.round == 2

    peft_hetlora.export_lora("fed", "fed-lora", base_model_name_or_path=str(base))
    exported = AutoPeftModelForCausalLM.from_pretrained("fed-lora").eval()
    assert exported.peft_config["default"].peft_type == "LORA"
    # the final global on the HetLoRA side, at full rank, from its published files
    weights = load_file(str(Path(final.path) / "adapter_model.safetensors"))
    config = peft_hetlora.HetLoRAConfig.from_pretrained(final.path)
    reference = get_peft_model(tiny_llama(), config).eval()
    set_peft_model_state_dict(reference, weights)
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = tiny_llama().eval()(ids).logits
        got, expected = exported(ids).logits, reference(ids).logits
    assert not torch.allclose(expected, plain, atol=1e-4)  # the global changes the model: the check has teeth
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
