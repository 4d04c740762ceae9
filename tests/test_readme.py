"""The README's snippets, run in order as a newcomer would, against `hetlora init` / `hetlora coordinate`
with their default policy (uniform ranks in [r_min, r_max]), on a tiny model instead of SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

from tests.doc_snippets import blocks, code_blocks, run_page
from tests.tiny_models import tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_setup_commands():
    language, code = code_blocks(README)[0]
    assert language == "bash" and code.split() == "bash scripts/run_main.sh bash scripts/run_tests.sh".split()
    assert blocks(README)[0].not_run  # the set-up is CI's own step, not part of the snippet run


def test_readme_snippets_run_in_order(tmp_path, monkeypatch):
    from peft_hetlora.federated import LocalStore

    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    monkeypatch.chdir(tmp_path)
    runnable = [block.language for block in blocks(README) if block.runs]
    assert runnable[:4] == ["bash", "python", "bash", "python"]  # init, clients, coordinate, export
    namespace = run_page(README, base)  # every block but the marked set-up commands, on the tiny model

    store = LocalStore(tmp_path / "fed")
    assert store.latest_global().round == 1  # both uploads were accepted and aggregated
    assert sorted(store.read_summary(0)["accepted"]) == ["alice", "bob"]
    assigned = json.loads((store.get_global(0).path / "round.json").read_text())["ranks"]
    for client_id, budget in (("alice", 4), ("bob", 16)):
        info = json.loads((store.download_client(0, client_id) / "client.json").read_text())
        assert info["max_rank"] == budget
        assert info["rank_in"] == min(assigned[client_id], budget)
    assert namespace["served"].peft_config["default"].peft_type == "LORA"
    assert namespace["model"].get_rank() == 4  # the PEFT-method snippet
