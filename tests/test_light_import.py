"""The layers of the house (docs/architecture.md#the-leaf): `import peft_hetlora.federated` loads neither peft,
transformers nor flwr; the tuner stands on the leaf only (`from peft_hetlora import HetLoRAConfig` loads no
`peft_hetlora.federated`, flower, simulation or CLI module); no import cycle between the package's modules; and
importing `peft_hetlora` still registers HETLORA with PEFT whenever peft is imported (before or after)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = ("peft", "transformers", "flwr")
REPO = Path(__file__).resolve().parents[1]


def run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, check=False,
        env=env, cwd=str(REPO),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_federated_core_imports_no_framework():
    out = run(
        f"""
        import sys
        import peft_hetlora.federated
        from peft_hetlora.federated import aggregate, register_aggregation, LocalStore, Coordinator
        print(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))
        """
    )
    assert out == "[]"


@pytest.mark.parametrize(
    "imports",
    [
        "import peft_hetlora; from peft import PeftModel",
        "import peft; import peft_hetlora",
        "from peft_hetlora.config import HetLoRAConfig",
        "from peft_hetlora import HetLoRAConfig",
    ],
)
def test_importing_the_package_registers_hetlora_with_peft(imports):
    out = run(
        f"""
        {imports}
        from peft import PeftType
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
        kind = PeftType.HETLORA
        print(PEFT_TYPE_TO_CONFIG_MAPPING[kind].__name__, PEFT_TYPE_TO_TUNER_MAPPING[kind].__name__)
        """
    )
    assert out == "HetLoRAConfig HetLoRAModel"


# ----------------------------------------------------------------------------- the tuner stands on the leaf
# Everything that is not the tuner (config, layer, model, export, quantisation, registration), the PEFT import hook,
# the federation-settings reader, or the leaf `peft_hetlora.utils`.
ENGINE_PACKAGES = ("peft_hetlora.federated", "peft_hetlora.flower", "peft_hetlora.model_source",
                   "peft_hetlora.commands", "peft_hetlora.cli", "hetlora_bench")
LEAF_ALLOWED_IMPORTS = {"__future__", "collections", "dataclasses", "json", "math", "numbers", "pathlib", "re",
                        "typing"}


def test_hetlora_config_loads_no_engine_module():
    out = run(
        """
        import sys
        from peft_hetlora import HetLoRAConfig
        HetLoRAConfig(r=8, rank=2, target_modules=["q_proj"])
        print(sorted(m for m in sys.modules if m.startswith("peft_hetlora")))
        """
    )
    loaded = ast.literal_eval(out)
    assert "peft_hetlora.config" in loaded  # the probe really imported the tuner
    engine = [m for m in loaded if m.startswith(ENGINE_PACKAGES)]
    assert engine == [], f"importing HetLoRAConfig loads engine modules: {engine}"


def test_the_leaf_imports_only_the_standard_library_and_itself():
    for path in sorted((REPO / "peft_hetlora" / "utils").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, f"{path.name} reaches out of the leaf: level {node.level} import"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    assert name.split(".")[0] in LEAF_ALLOWED_IMPORTS, f"{path.name} imports {name}"


# ----------------------------------------------------------------------------- no import cycle in the package
def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(roots: tuple[str, ...] = ("peft_hetlora", "trainer_callbacks")) -> dict[str, set[str]]:
    """module -> the package modules it imports (any import statement, function-level ones included)."""
    files = {module_name(p): p for root in roots for p in (REPO / root).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target in files:
                    graph[name].add(target)
                for alias in node.names:  # `from . import keys` imports the module keys
                    if f"{target}.{alias.name}" in files:
                        graph[name].add(f"{target}.{alias.name}")
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in files)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_known_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


TUNER = ("peft_hetlora", "peft_hetlora.config", "peft_hetlora.layer", "peft_hetlora.model", "peft_hetlora.export",
         "peft_hetlora.quantization", "peft_hetlora.quantized_layers", "peft_hetlora.registration",
         "peft_hetlora.peft_hook", "peft_hetlora.federation_config", "peft_hetlora.base_identity",
         "peft_hetlora.known_noise")


def test_no_import_cycle_in_the_tuner_or_the_leaf():
    graph = import_graph()
    assert graph["peft_hetlora.config"], "the import graph reader found no import in config.py"
    bottom = [c for c in cycles(graph) if any(m in TUNER or m.startswith("peft_hetlora.utils") for m in c)]
    assert bottom == []


def test_the_tuner_imports_only_the_tuner_and_the_leaf():
    graph = import_graph()
    for module in TUNER:
        outside = sorted(t for t in graph[module] if t not in TUNER and not t.startswith("peft_hetlora.utils"))
        assert outside == [], f"{module} imports {outside}"


def test_no_import_cycle_anywhere_in_the_package():
    """No import circle in the library, the callbacks or the bench beside them (issue 23)."""
    graph = import_graph(("peft_hetlora", "trainer_callbacks", "hetlora_bench"))
    assert graph["hetlora_bench.runner"], "the import graph reader found no import in the bench"
    assert cycles(graph) == []


# ----------------------------------------------------------------------------- the design the code cites
def heading_anchors(page: Path) -> set[str]:
    """The anchors MkDocs' `toc` gives the headings of `page` (lower case, punctuation dropped, spaces -> '-')."""
    anchors = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", title)).strip("-"))
    return anchors


def test_every_design_citation_names_a_section_of_docs_design():
    anchors = heading_anchors(REPO / "docs" / "design.md")
    assert {"scale-rule", "component-rule", "store-layout", "round-protocol"} <= anchors
    sources = [*(REPO / "peft_hetlora").rglob("*.py"), *(REPO / "trainer_callbacks").rglob("*.py"),
               *(REPO / "tests").glob("*.py"), *(REPO / "benchmarks").rglob("*.py"), REPO / "CONTRIBUTING.md"]
    cited = {}
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for first, more in re.findall(r"design\.md#([\w-]+)((?:, #[\w-]+)*)", text):
            for anchor in [first, *re.findall(r"#([\w-]+)", more)]:
                cited.setdefault(anchor, path.name)
    assert len(cited) >= 5, "the citation reader found almost no citation"
    missing = {anchor: where for anchor, where in cited.items() if anchor not in anchors}
    assert missing == {}, f"citations of sections docs/design.md lacks: {missing}"
    stale = [p.name for p in sources if re.search(r"\bDESIGN(\.md)? ?[0-9§]", p.read_text(encoding="utf-8"))]
    assert stale == [], f"citations of the old design brief: {stale}"


# ----------------------------------------------------------------------------- the bench beside the library
BENCH_ONLY = ("hetlora_bench", "matplotlib")


@pytest.mark.parametrize(
    "code",
    [
        "import peft_hetlora",
        "import peft_hetlora.federated",
        "import trainer_callbacks",
        "import peft_hetlora.flower",
        "import peft_hetlora.model_source",
        "from peft_hetlora.cli import build_parser; build_parser(['init']); build_parser(['export', 'a', 'b'])",
        "import contextlib, io\nfrom peft_hetlora.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n        main(['--help'])\n    except SystemExit:\n        pass",
    ],
)
def test_the_library_never_imports_the_bench(code):
    out = run(f"import sys\n{code}\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {BENCH_ONLY!r}))")
    assert out == "[]"


def test_nothing_in_the_library_names_the_bench_in_an_import():
    checked = 0
    for root in ("peft_hetlora", "trainer_callbacks"):
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    assert not any(a.name.split(".")[0] == "hetlora_bench" for a in node.names), path
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    assert (node.module or "").split(".")[0] != "hetlora_bench", path
                checked += isinstance(node, (ast.Import, ast.ImportFrom))
    assert checked > 100, "the reader found too few import statements"


def test_the_bench_packages_are_an_extra_not_a_requirement():
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    tree = ast.parse(setup)
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    wanted = ("install_requires", "extras_require")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in wanted}
    names = lambda reqs: {re.split(r"[<>=\[ ]", r, maxsplit=1)[0] for r in reqs}  # noqa: E731
    bench_only = {"matplotlib", "datasets", "evaluate", "pyyaml"}  # imported by hetlora_bench only
    assert bench_only.isdisjoint(names(kwargs["install_requires"]))
    assert bench_only <= names(kwargs["extras_require"]["bench"])
