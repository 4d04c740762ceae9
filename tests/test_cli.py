"""The `hetlora` command line: export and argument errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_hetlora
from peft_hetlora.cli import main
from tests.tiny_models import randomize_adapter, tiny_llama, token_batch


def test_export_command_writes_a_plain_lora_with_the_same_outputs(tmp_path, capsys):
    model = get_peft_model(
        tiny_llama(), peft_hetlora.HetLoRAConfig(r=8, rank=5, lora_alpha=16, target_modules=["q_proj"])
    )
    randomize_adapter(model)
    model.set_rank(3)
    model.save_pretrained(str(tmp_path / "het"))
    ids = token_batch()
    expected = model(input_ids=ids).logits

    assert main(["export", str(tmp_path / "het"), str(tmp_path / "lora")]) == 0
    assert "Plain LoRA adapter written" in capsys.readouterr().out
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == pytest.approx(16 / 8 * 3)
    plain = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora"))
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_command_explains_a_missing_adapter(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "save_pretrained" in capsys.readouterr().err


def test_simulate_rejects_unknown_profile():
    with pytest.raises(SystemExit):
        main(["simulate", "--profile", "huge"])
