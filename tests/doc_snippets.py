"""Run a Markdown page's code blocks in order, as a reader would, from an empty folder.

The convention every page follows (tests/test_docs_snippets.py enforces it on README.md and docs/*.md):

- every fence names its language; ```python and ```bash blocks are run, everything else (```text for output
  samples and formulas, ```diff, ```json, ```toml, ...) is shown only;
- a python or bash block that cannot run as written (it needs a GPU, a real Hub repo, the network, or it is a
  long benchmark) is preceded by ``<!-- not-run: the reason -->`` on its own line, so the reader sees why too
  when reading the source;
- ```python blocks share one namespace per page; ```bash blocks run line by line: ``hetlora ...`` through the
  CLI's ``main`` in this process, ``cd`` / ``export`` change this process's folder / environment, any other line
  runs in ``bash -c`` with this Python first on ``PATH`` and the repository on ``PYTHONPATH``.

Tiny models: :data:`TINY_MODEL_SITES` are the places where a page loads the real SmolLM2 (``smollm2-135m``); the
runner replaces them with a tiny random model's folder, the one substitution for every page. Everything else runs
as written.

Run pages by hand (with the tiny model folder of your choice; each page runs in its own folder under WORK)::

    python -m tests.doc_snippets /tmp/tiny-llama /tmp/work docs/privacy.md docs/methods.md
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_LANGUAGES = ("python", "bash")
"""The fenced languages that are run; every other language is shown only."""

TINY_MODEL_SITES = ('resolve_model("smollm2-135m")', "--base-model smollm2-135m")
"""Where a page loads the real base model; each becomes the same call on the tiny model's folder."""

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
_NOT_RUN = re.compile(r"<!--\s*not-run:(.*?)-->\s*\Z", re.S)


@dataclass(frozen=True)
class Block:
    """One fenced block: its language, code, 1-based line of the fence, and the not-run reason (None: it runs)."""

    language: str
    code: str
    line: int
    not_run: str | None

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and self.not_run is None


def blocks(page: str | Path) -> list[Block]:
    """Every fenced block of `page`, in order."""
    text = Path(page).read_text()
    found = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()]
        marker = _NOT_RUN.search(before)
        found.append(
            Block(
                language=match.group(1).strip(),
                code=match.group(2),
                line=before.count("\n") + 1,
                not_run=marker.group(1).strip() if marker else None,
            )
        )
    return found


def code_blocks(page: str | Path) -> list[tuple[str, str]]:
    """[(language, code)] of every fenced block of `page`, in order."""
    return [(block.language, block.code) for block in blocks(page)]


def shell_lines(code: str) -> list[str]:
    """The command lines of a bash block (continuation lines joined, comment-only and blank lines dropped)."""
    joined = code.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if shlex.split(line, comments=True)]


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block, split into words (comments dropped)."""
    return [shlex.split(line, comments=True) for line in shell_lines(code)]


def tiny_model_replacements(model_dir: str | Path) -> dict[str, str]:
    """The text replacements that point every :data:`TINY_MODEL_SITES` at `model_dir`."""
    return {site: site.replace("smollm2-135m", str(model_dir)) for site in TINY_MODEL_SITES}


def _run_shell_line(line: str) -> None:
    from peft_hetlora.cli import main

    words = shlex.split(line, comments=True)
    if words[0] == "hetlora":
        assert main(words[1:]) == 0, line
    elif words[0] == "cd" and len(words) == 2:
        os.chdir(os.path.expandvars(words[1]))
    elif words[0] == "export":
        for assignment in words[1:]:
            name, _, value = assignment.partition("=")
            os.environ[name] = os.path.expandvars(value)
    else:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        proc = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


def run_blocks(blocks: list[tuple[str, str]], replacements: dict[str, str]) -> dict:
    """Run python and bash blocks in order with `replacements` applied to their text; returns the namespace."""
    namespace: dict = {"__name__": "__doc_snippets__"}
    for language, code in blocks:
        for old, new in replacements.items():
            code = code.replace(old, new)
        if language == "python":
            exec(compile(code, "<snippet>", "exec"), namespace)
        elif language == "bash":
            for line in shell_lines(code):
                _run_shell_line(line)
    return namespace


def run_page(page: str | Path, model_dir: str | Path) -> dict:
    """Run every runnable block of `page` in order in the current folder, the real model replaced by `model_dir`."""
    runnable = [(block.language, block.code) for block in blocks(page) if block.runs]
    return run_blocks(runnable, tiny_model_replacements(model_dir))


def run_pages(pages: list[str | Path], model_dir: str | Path, work: str | Path) -> dict[str, str | None]:
    """Run each page as :func:`run_page` does, each from its own empty folder under `work` with its own namespace
    and environment (restored afterwards); {page name: None if it ran, else the error and its traceback}."""
    import traceback

    results: dict[str, str | None] = {}
    home, environ = Path.cwd(), dict(os.environ)
    for page in map(Path, pages):
        folder = Path(work) / page.stem
        folder.mkdir(parents=True)
        os.chdir(folder)
        try:
            run_page(page, model_dir)
            results[page.name] = None
        except BaseException:  # noqa: BLE001  (a page's failure is reported, the next page still runs)
            results[page.name] = traceback.format_exc()[-6000:]
        finally:
            os.chdir(home)
            os.environ.clear()
            os.environ.update(environ)
    return results


if __name__ == "__main__":
    # python -m tests.doc_snippets MODEL_DIR WORK_DIR PAGE...  -> one JSON line: {page: null | error}
    import json

    outcome = run_pages(sys.argv[3:], sys.argv[1], sys.argv[2])
    print("DOC-SNIPPETS " + json.dumps(outcome))
