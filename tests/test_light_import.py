"""The framework-free core: `import peft_hetlora.federated` loads neither peft, transformers nor flwr, and
importing `peft_hetlora` still registers HETLORA with PEFT whenever peft is imported (before or after)."""

from __future__ import annotations

import os
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
