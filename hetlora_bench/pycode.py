"""``pycode``: Python source by package, a federated code-completion corpus with software projects as data owners.

Every installed Python distribution (the project pins its environment in ``scripts/constraints.txt``) is one
data owner: an organisation that would fine-tune a shared code model on its own code without sharing it. An
example is one top-level block of a module (a ``def`` / ``class`` with its body, or the module's prelude of
imports and constants), cut at top-level statement boundaries so every example is syntactically whole. The
partition is naturally non-IID (each project has its own domain, API vocabulary, naming and comment style) and
heavily skewed in size (torch or transformers hold thousands of blocks, small helpers a few dozen); held-out
owners are packages no client has seen, i.e. generalisation to a new organisation's code.

Nothing is downloaded: the text is the ``.py`` files already on disk, listed by ``importlib.metadata``
(``RECORD``), read in sorted order, so a given set of installed versions always gives the same corpus
(``pycode_examples(...).versions`` records them).

Example:
    >>> per_owner = pycode_examples(packages=["six", "idna"])  # doctest: +SKIP
    >>> sorted(per_owner)  # doctest: +SKIP
    ['idna', 'six']
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Iterable
from pathlib import Path

PYCODE = "pycode"
#: a top-level statement that starts a new example (decorators stay with their def / class)
_TOP_LEVEL = re.compile(r"^(?:@|def |async def |class )")
#: distributions that are not third-party code owners (this project, its editable installs)
_EXCLUDED = {"peft-hetlora", "peft_hetlora"}


class PyCodeCorpus(dict):
    """``{owner: [examples]}`` plus ``versions`` (owner -> installed version) and ``files`` (owner -> .py count)."""

    versions: dict[str, str]
    files: dict[str, int]


def split_module(source: str, *, max_chars: int = 2000, min_lines: int = 3) -> list[str]:
    """Cut a module's source into top-level blocks (prelude, each def / class with its decorators).

    Blocks shorter than ``min_lines`` non-blank lines are dropped; longer than ``max_chars`` are truncated at a
    line boundary (the model sees at most ``block_size`` tokens anyway).

    Example:
        >>> split_module("import os\\nX = 1\\nY = 2\\n\\ndef f():\\n    a = 1\\n    return a\\n", min_lines=2)
        ['import os\\nX = 1\\nY = 2', 'def f():\\n    a = 1\\n    return a']
    """
    blocks: list[list[str]] = [[]]
    for line in source.splitlines():
        if _TOP_LEVEL.match(line) and not (blocks[-1] and blocks[-1][-1].startswith("@")):
            blocks.append([])
        blocks[-1].append(line)
    out = []
    for lines in blocks:
        text = "\n".join(lines).strip()
        if sum(1 for x in text.splitlines() if x.strip()) < min_lines:
            continue
        if len(text) > max_chars:
            cut = text.rfind("\n", 0, max_chars)
            text = text[: cut if cut > 0 else max_chars]
        out.append(text)
    return out


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pycode_examples(
    packages: Iterable[str] | None = None,
    *,
    max_chars_per_owner: int = 300_000,
    max_example_chars: int = 2000,
    min_lines: int = 3,
) -> PyCodeCorpus:
    """Owner (normalised distribution name) -> that distribution's code blocks (see :func:`split_module`).

    Args:
        packages: distribution names to use (default: every installed distribution with ``.py`` files).
        max_chars_per_owner: stop reading an owner's files after this much source (files in sorted order), which
            bounds load time for very large packages (the size skew remains: see ``docs/simulate.md``).

    Raises:
        ValueError: a named package is not installed.

    Example:
        >>> corpus = pycode_examples(packages=["idna"])  # doctest: +SKIP
        >>> corpus.versions  # doctest: +SKIP
        {'idna': '3.20'}
    """
    key = (None if packages is None else tuple(packages), max_chars_per_owner, max_example_chars, min_lines)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _read(*key)
    cached = _CACHE[key]
    corpus = PyCodeCorpus({owner: list(blocks) for owner, blocks in cached.items()})
    corpus.versions, corpus.files = dict(cached.versions), dict(cached.files)
    return corpus


_CACHE: dict[tuple, PyCodeCorpus] = {}


def _read(
    packages: tuple[str, ...] | None, max_chars_per_owner: int, max_example_chars: int, min_lines: int
) -> PyCodeCorpus:
    dists = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and _normalise(name) not in _EXCLUDED:
            dists.setdefault(_normalise(name), dist)
    if packages is not None:
        wanted = [_normalise(p) for p in packages]
        missing = [p for p in wanted if p not in dists]
        if missing:
            raise ValueError(f"pycode: package(s) {missing} are not installed; install them or leave them out.")
        dists = {p: dists[p] for p in wanted}
    corpus = PyCodeCorpus()
    corpus.versions, corpus.files = {}, {}
    for owner in sorted(dists):
        dist = dists[owner]
        files = sorted(str(f) for f in (dist.files or []) if str(f).endswith(".py"))
        examples: list[str] = []
        read = n_files = 0
        for rel in files:
            if read >= max_chars_per_owner:
                break
            path = Path(dist.locate_file(rel))
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            read += len(source)
            n_files += 1
            examples += split_module(source, max_chars=max_example_chars, min_lines=min_lines)
        if examples:
            corpus[owner] = examples
            corpus.versions[owner] = dist.version
            corpus.files[owner] = n_files
    return corpus
