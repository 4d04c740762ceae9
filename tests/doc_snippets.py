"""Run a Markdown page's code blocks in order, as a reader would: ```python blocks share one namespace,
```bash blocks run their `hetlora ...` lines through the CLI's `main` (other languages are not run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def code_blocks(page: str | Path) -> list[tuple[str, str]]:
    """[(language, code)] of every fenced block of `page`, in order."""
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(Path(page).read_text())]


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block (continuation lines joined, comments dropped)."""
    joined = code.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def run_blocks(blocks: list[tuple[str, str]], replacements: dict[str, str]) -> dict:
    """Run python and bash blocks in order with `replacements` applied to their text; returns the namespace."""
    from peft_hetlora.cli import main

    namespace: dict = {"__name__": "__readme__"}
    for language, code in blocks:
        for old, new in replacements.items():
            code = code.replace(old, new)
        if language == "python":
            exec(compile(code, "<snippet>", "exec"), namespace)
        elif language == "bash":
            for command in shell_commands(code):
                assert command[0] == "hetlora", f"only hetlora commands are run here, not {command}"
                assert main(command[1:]) == 0, command
    return namespace
