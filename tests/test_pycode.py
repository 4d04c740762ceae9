"""The `pycode` corpus: Python source blocks by installed package, packages as data owners."""

from __future__ import annotations

import importlib.metadata

import pytest

from hetlora_bench.data import load_client_corpus
from hetlora_bench.pycode import pycode_examples, split_module

SOURCE = '''"""Doc."""
import os
X = 1

@decorator
def f(a):
    b = a + 1
    return b

def tiny():
    pass

class C:
    def m(self):
        return 1
'''


def test_split_module_cuts_at_top_level_blocks():
    blocks = split_module(SOURCE)
    assert blocks == [
        '"""Doc."""\nimport os\nX = 1',
        "@decorator\ndef f(a):\n    b = a + 1\n    return b",
        "class C:\n    def m(self):\n        return 1",
    ]  # `tiny` has 2 lines < min_lines
    long = "def g():\n" + "".join(f"    x{i} = {i}\n" for i in range(100))
    (cut,) = split_module(long, max_chars=60)
    assert len(cut) <= 60 and cut.endswith(tuple("0123456789")) and long.startswith(cut)


def test_small_slice_is_deterministic_and_versioned():
    corpus = pycode_examples(packages=["idna"])
    assert list(corpus) == ["idna"]
    assert corpus.versions["idna"] == importlib.metadata.version("idna")
    assert len(corpus["idna"]) >= 20 and corpus.files["idna"] >= 1
    assert pycode_examples(packages=["idna"]) == corpus
    with pytest.raises(ValueError, match="not installed"):
        pycode_examples(packages=["surely-not-installed-xyz"])


def test_corpus_holds_out_unseen_packages():
    corpus = load_client_corpus(
        "pycode", num_clients=4, min_examples=20, max_examples_per_client=8, max_eval_examples=10, seed=0
    )
    assert len(corpus.clients) == 4 and corpus.info["name"] == "pycode"
    assert not set(corpus.heldout_clients) & set(corpus.clients)
    assert set(corpus.eval["client_id"]) <= set(corpus.heldout_clients) and len(corpus.eval) == 10
    assert all(len(ds) + len(corpus.validation[c]) == 8 for c, ds in corpus.clients.items())
    assert set(corpus.info["versions"]) == set(corpus.heldout_clients) | set(corpus.clients)
    again = load_client_corpus(
        "pycode", num_clients=4, min_examples=20, max_examples_per_client=8, max_eval_examples=10, seed=0
    )
    assert again.client_ids == corpus.client_ids and again.eval["text"] == corpus.eval["text"]
