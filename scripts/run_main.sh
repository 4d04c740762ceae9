#!/usr/bin/env bash
# The main job: a federated HetLoRA run of SmolLM2-135M on chitchat (clients = senders), every method,
# ending in runs/cpu/report.md with plots. Installs what it needs first. Rerun to resume a killed run.
# Extra arguments go to `hetlora simulate` (e.g. --profile quick, --rounds 20, --out runs/mine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false FLWR_TELEMETRY_ENABLED=0
# --no-fixed-validation: the fixed federation validation set (fair early stopping for studies) costs ~1.5x a
# held-out evaluation a round, +4 min here; the main job stops early on client validation instead.
exec .venv/bin/hetlora simulate --profile cpu --out runs/cpu --no-fixed-validation "$@"
