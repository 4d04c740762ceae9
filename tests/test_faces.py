"""The key format (`federated/adapter/`) and the aggregation layer (`federated/aggregation/`) are entered through
their faces, and the key format imports nothing above it (docs/architecture.md#the-target-house, issue 23)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_hetlora.federated.adapter import flat_a, flat_b, is_int
from peft_hetlora.federated.aggregation.component_view import float64_a, float64_b

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "peft_hetlora.federated.adapter"
AGGREGATION = "peft_hetlora.federated.aggregation"
FACES = (ADAPTER, AGGREGATION, f"{AGGREGATION}.privacy", f"{AGGREGATION}.methods")


def _library_imports():
    """(importing module, line, imported module) for every `from ... import` in the library, submodules resolved."""
    for path in [*ROOT.joinpath("peft_hetlora").rglob("*.py"), *ROOT.joinpath("trainer_callbacks").rglob("*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield module, node.lineno, target
            for alias in node.names:  # `from pkg import submodule`
                if (ROOT / Path(*f"{target}.{alias.name}".split("."))).with_suffix(".py").exists():
                    yield module, node.lineno, f"{target}.{alias.name}"


@pytest.mark.parametrize("face", FACES)
def test_every_name_a_face_exports_exists_once(face):
    module = importlib.import_module(face)
    assert len(set(module.__all__)) == len(module.__all__)
    assert [name for name in module.__all__ if not hasattr(module, name)] == []


def test_other_packages_enter_adapter_and_aggregation_through_a_face():
    deep = []
    for importer, line, target in _library_imports():
        for package in (ADAPTER, AGGREGATION):
            inside = importer == package or importer.startswith(package + ".")
            if target.startswith(package + ".") and not inside and target not in FACES:
                deep.append(f"{importer}:{line} imports {target}")
    assert deep == []


def test_the_key_format_imports_only_itself_and_the_leaf():
    upward = [
        f"{importer}:{line} imports {target}"
        for importer, line, target in _library_imports()
        if importer.startswith(ADAPTER) and target.startswith("peft_hetlora")
        and not target.startswith((ADAPTER, "peft_hetlora.utils"))
    ]
    assert upward == []
    # one direction inside it: keys uses component index checks, components never imports keys
    assert not [t for i, _, t in _library_imports() if i == f"{ADAPTER}.components" and t.startswith(ADAPTER)]


_HOSTILE = st.one_of(
    st.integers(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=3), st.none(),
    st.integers(-(2**63), 2**63 - 1).map(np.int64), st.integers(0, 255).map(np.uint8), st.booleans().map(np.bool_),
    st.lists(st.integers(), max_size=2), st.floats(width=32, allow_nan=False).map(np.float32),
)


@settings(max_examples=200, deadline=None)
@given(_HOSTILE)
def test_is_int_takes_python_and_numpy_integers_and_nothing_else(value):
    expected = type(value) in (int, np.int64, np.uint8)  # by exact type, not by the function's own isinstance test
    assert is_int(value) is expected


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.booleans(), st.integers(0, 2**31 - 1))
def test_the_float64_view_is_the_key_format_matrix_in_float64(rank, d_in, d_out, conv, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, d_in, *((1, 1) if conv else ()), generator=g)
    b = torch.randn(d_out, rank, *((1, 1) if conv else ()), generator=g)
    ref_a = a.numpy().astype(np.float64).reshape(rank, d_in)  # numpy reference: (r, d_in) and (d_out, r)
    ref_b = b.numpy().astype(np.float64).reshape(d_out, rank)
    assert float64_a(a).dtype == float64_b(b).dtype == torch.float64
    assert np.array_equal(float64_a(a).numpy(), ref_a) and np.array_equal(float64_b(b, "m").numpy(), ref_b)
    assert torch.equal(float64_a(a), flat_a(a).double()) and torch.equal(float64_b(b), flat_b("m", b).double())
