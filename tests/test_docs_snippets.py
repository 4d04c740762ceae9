"""Every fenced code block of README.md and docs/*.md runs as written, in order, from an empty folder.

The pages run in one fresh process, each in its own empty folder with its own namespace and environment (as a
reader's shell), against the Hub test double, with the tiny model in place of SmolLM2. tests/doc_snippets.py states
the convention: which blocks run, how a block is marked not runnable, the one tiny-model substitution.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.doc_snippets import RUN_LANGUAGES, blocks
from tests.tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Pages whose blocks are not yet whole (none: every page passes like every other).
PAGES_AWAITING_THEIR_OWNERS: dict[str, str] = {}

# The README is run in-process by tests/test_readme.py, which also checks what its snippets produce.
RUN_ELSEWHERE = {
    "README.md": "tests/test_readme.py",
    "trainer.md": "tests/test_trainer_doc.py",  # a tiny model *with* a tokenizer (TRL's SFTTrainer needs one)
}


def _page_id(page: Path) -> str:
    return page.name


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_fence_names_its_language_and_every_skip_says_why(page):
    if page.name in PAGES_AWAITING_THEIR_OWNERS:
        pytest.xfail(PAGES_AWAITING_THEIR_OWNERS[page.name])
    for block in blocks(page):
        where = f"{page.name}:{block.line}"
        assert block.language, f"{where}: a fence without a language (use ```text for output or formulas)"
        assert block.language != "sh", f"{where}: use ```bash"
        if block.not_run is not None:
            assert block.language in RUN_LANGUAGES, f"{where}: a not-run marker on a ```{block.language} block"
            assert len(block.not_run) >= 10, f"{where}: a not-run marker must say why"


@pytest.fixture(scope="module")
def page_outcomes(tmp_path_factory) -> dict[str, str | None]:
    """Every page with something to run, run once in one fresh process (imports paid once), each page in its own
    empty folder with its own namespace, against the Hub test double, with the tiny model."""
    import huggingface_hub.constants

    from tests.hub_double import HubDouble

    pages = [
        page for page in PAGES
        if page.name not in PAGES_AWAITING_THEIR_OWNERS and page.name not in RUN_ELSEWHERE
        and any(block.runs for block in blocks(page))
    ]
    tmp = tmp_path_factory.mktemp("doc-pages")
    model_dir = tmp / "tiny-model"
    tiny_llama().save_pretrained(model_dir)
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = False  # the double is on loopback
    double = HubDouble().start()
    try:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HF_ENDPOINT": double.endpoint,
            "HF_TOKEN": double.token,
            "HF_HOME": str(tmp / "hf-home"),
            "TOKENIZERS_PARALLELISM": "false",
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        env.pop("HF_HUB_OFFLINE", None)
        proc = subprocess.run(
            [sys.executable, "-m", "tests.doc_snippets", str(model_dir), str(tmp / "work"), *map(str, pages)],
            cwd=tmp, env=env, capture_output=True, text=True, timeout=900,
        )
    finally:
        double.stop()
        huggingface_hub.constants.HF_HUB_OFFLINE = offline
    assert proc.returncode == 0 and "DOC-SNIPPETS " in proc.stdout, proc.stderr[-6000:]
    return json.loads(proc.stdout.rsplit("DOC-SNIPPETS ", 1)[1].splitlines()[0])


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_runs_as_written_from_an_empty_folder(page, page_outcomes):
    if page.name in PAGES_AWAITING_THEIR_OWNERS:
        pytest.xfail(PAGES_AWAITING_THEIR_OWNERS[page.name])
    if page.name in RUN_ELSEWHERE:
        pytest.skip(f"run by {RUN_ELSEWHERE[page.name]}")
    if not any(block.runs for block in blocks(page)):
        return  # nothing to run: every block is shown only or marked not-run (checked above)
    assert page_outcomes[page.name] is None, f"{page.name}:\n{page_outcomes[page.name]}"


def test_the_runner_keeps_the_convention_and_reports_a_broken_page(tmp_path):
    from tests.doc_snippets import run_pages

    good = tmp_path / "good.md"
    good.write_text(
        "Text.\n\n```python\nx = 2\n```\n\n<!-- not-run: needs a CUDA GPU -->\n```python\nraise SystemExit(1)\n```\n\n"
        "```text\nnot code\n```\n\n```bash\nexport DOC_SNIPPETS_SAMPLE=1  # a comment\npython -c \"import sys; \\\n"
        "sys.exit(0)\"\n```\n\n```python\nimport os\nassert x == 2 and os.environ['DOC_SNIPPETS_SAMPLE'] == '1'\n"
        "open('made-here', 'w').close()\n```\n"
    )
    broken = tmp_path / "broken.md"
    broken.write_text("```python\nundefined_name\n```\n")
    found = blocks(good)
    assert [(b.language, b.runs) for b in found] == [
        ("python", True), ("python", False), ("text", False), ("bash", True), ("python", True)
    ]
    assert found[1].not_run == "needs a CUDA GPU" and found[1].line == 8  # 1-based line of its fence
    outcome = run_pages([good, broken], tmp_path / "model-unused", tmp_path / "work")
    assert outcome["good.md"] is None
    assert "NameError" in outcome["broken.md"] and "undefined_name" in outcome["broken.md"]
    assert (tmp_path / "work" / "good" / "made-here").is_file()  # each page in its own folder
    assert "DOC_SNIPPETS_SAMPLE" not in os.environ  # the page's environment does not leak
