"""docs/trainer.md's blocks, run in order as a reader would, with a tiny model and tokenizer in place of SmolLM2:
a Trainer client with checkpoints and a TRL SFTTrainer client, a coordinator round, then the refused resume of
round 0's checkpoint in round 1 and the fresh round 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.doc_snippets import code_blocks, run_blocks
from tests.test_trl_client import word_tokenizer
from tests.tiny_models import tiny_llama

PAGE = Path(__file__).resolve().parents[1] / "docs" / "trainer.md"

pytest.importorskip("trl")


def test_trainer_page_runs_in_order(tmp_path, monkeypatch, capsys):
    from peft_hetlora.federated import LocalStore

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    word_tokenizer(["The federation trains one adapter.", "Every client keeps its data."]).save_pretrained(base)
    monkeypatch.chdir(tmp_path)
    blocks = code_blocks(PAGE)
    assert {lang for lang, _ in blocks} <= {"diff", "bash", "python", "console"}  # console/diff: not run
    namespace = run_blocks(blocks, {"smollm2-135m": str(base)})

    store = LocalStore(tmp_path / "fed")
    assert sorted(store.read_summary(0)["accepted"]) == ["alice", "bob"]
    assert store.list_client_uploads(1) == ["alice"]
    assert "round: checkpoint 0, open round 1" in capsys.readouterr().out
    info = json.loads((store.download_client(1, "alice") / "client.json").read_text())
    assert info["global_revision"] == store.get_global(1).revision  # round 1 started from global 1
    assert namespace["alice"].uploaded_rounds == [0, 1]
