"""Every docstring example in the package runs and prints what it says.

The examples follow huggingface_hub's style: `>>>` lines inside a ```py fence. Plain `doctest` would read the
closing fence as expected output, so the parser here ends an example's output at a fence line.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re

import pytest

import hetlora_bench
import peft_hetlora

_FENCE = re.compile(r"^([ \t]*)```\w*[ \t]*$", re.MULTILINE)


class FencedDocTestParser(doctest.DocTestParser):
    """A DocTestParser for which a Markdown code fence line ends an example's expected output."""

    def parse(self, string: str, name: str = "<string>"):
        # a fence becomes a blank line, which is what ends expected output in doctest
        return super().parse(_FENCE.sub(r"\1", string), name)


MODULES = sorted(info.name for package in (peft_hetlora, hetlora_bench)  # the library and the bench beside it
                 for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."))


def test_the_parser_ends_output_at_a_fence():
    text = "```py\n>>> 1 + 1\n2\n```\nprose\n"
    (example,) = FencedDocTestParser().get_examples(text)
    assert example.source == "1 + 1\n" and example.want == "2\n"
    # the plain parser takes the fence as output: the reason this file exists
    (plain,) = doctest.DocTestParser().get_examples(text)
    assert plain.want == "2\n```\nprose\n"


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    if ".flower" in module_name:
        pytest.importorskip("flwr")  # the optional extra
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(parser=FencedDocTestParser())
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in finder.find(module):
        if test.examples:
            runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
