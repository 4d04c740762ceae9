#!/usr/bin/env bash
# The test suite (fast: tiny random models, no network). Installs what it needs first.
# Extra arguments go to pytest (e.g. -k store, -m slow for the real-model runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export TOKENIZERS_PARALLELISM=false FLWR_TELEMETRY_ENABLED=0 RAY_DISABLE_DOCKER_CPU_WARNING=1
exec .venv/bin/python -m pytest -q "$@"
