"""Benchmark the Flower engine against the in-process engine: wall time per round and memory per virtual client.

The same experiment runs twice per federation size K (default 10 and 100 virtual clients): once with
`run_flower_simulation` (Ray virtual clients, 1 CPU each, all CPUs of the machine) and once with
`run_inprocess_simulation` (one client after another in this process, torch limited to the same number of threads
a virtual client gets). Both use the same toy task (tiny random Llama, per-client bigram token data), rank policy,
client sampling, local training (`transformers.Trainer` + `HetLoRACallback`) and `aggregate` call; every client
trains every round.

Measured:

- wall time of each round (configure -> aggregate): the first round (workers import and warm up) and the mean of
  the later ("warm") rounds; and the start-up of each engine (Ray, actors, first imports);
- memory: RSS of the Ray ClientApp actor processes (sampled every 0.2 s during the run; peak per actor and summed),
  of the other Ray processes (raylet, GCS, ...), and of this driver process; "per virtual client" is
  (all Ray processes + driver growth) / K. For the in-process engine, the driver's peak RSS growth. (The sampler
  runs in a thread of this process, every 0.5 s.)

Usage::

    FLWR_TELEMETRY_ENABLED=0 python benchmarks/bench_flower.py                      # K = 10, 100; 3 rounds
    FLWR_TELEMETRY_ENABLED=0 python benchmarks/bench_flower.py --clients 10 --rounds 1 --quick
    python benchmarks/bench_flower.py --json benchmarks/results/flower.json --markdown benchmarks/results/flower.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from hetlora_bench.engines import run_flower_simulation, run_inprocess_simulation  # noqa: E402
from hetlora_bench.toy import ToyTask  # noqa: E402
from peft_hetlora import HetLoRAConfig  # noqa: E402
from peft_hetlora.flower import LocalTrainingConfig  # noqa: E402

MB = 1024 * 1024


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descendants(root: int) -> set[int]:
    """Processes below `root` (Ray's raylet, GCS and workers are children of this driver)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in out:
                out.add(child)
                stack.append(child)
    return out


class MemorySampler:
    """Samples the RSS of this process and of its descendants (Ray) every `interval` seconds, in a thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.actor_peak: dict[int, int] = {}
        self.ray_total_peak = 0
        self.ray_other_peak = 0
        self.driver_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            total = other = 0
            for pid in _descendants(me):
                rss = _rss(pid)
                if rss is None:
                    continue
                total += rss
                if "ClientAppActor" in _cmdline(pid):
                    self.actor_peak[pid] = max(self.actor_peak.get(pid, 0), rss)
                else:
                    other += rss
            self.ray_total_peak = max(self.ray_total_peak, total)
            self.ray_other_peak = max(self.ray_other_peak, other)
            self.driver_peak = max(self.driver_peak, _rss(me) or 0)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_case(engine: str, k: int, args: argparse.Namespace) -> dict:
    task = ToyTask(num_examples=args.examples, seq_len=args.seq_len)
    config = HetLoRAConfig(r=args.r_max, r_min=args.r_min, lora_alpha=2 * args.r_max,
                           target_modules=["q_proj", "v_proj"], prune_lambda=0.01)
    settings = dict(num_clients=k, adapter_config=config, ranks="uniform", method=args.method, rounds=args.rounds,
                    training=LocalTrainingConfig(local_steps=args.local_steps, batch_size=args.batch_size),
                    seed=args.seed)
    driver_before = _rss(os.getpid()) or 0
    started = time.perf_counter()
    with MemorySampler() as mem:
        if engine == "flower":
            run = run_flower_simulation(task, num_cpus=args.num_cpus, cpus_per_client=1.0, **settings)
        else:
            run = run_inprocess_simulation(task, num_threads=1, **settings)
    wall = time.perf_counter() - started
    rounds = run.round_seconds()
    actors = sorted(mem.actor_peak.values())
    ray_other = mem.ray_other_peak
    driver_growth = max(0, mem.driver_peak - driver_before)
    out = {
        "engine": engine,
        "clients": k,
        "rounds": args.rounds,
        "round_seconds": [round(s, 3) for s in rounds],
        "first_round_seconds": round(rounds[0], 3),
        "warm_round_seconds": round(sum(rounds[1:]) / len(rounds[1:]), 3) if len(rounds) > 1 else None,
        "startup_seconds": round(wall - sum(rounds), 3),
        "wall_seconds": round(wall, 3),
        "accepted_per_round": [r["metrics"]["num_accepted"] for r in run.rounds],
        "train_loss": [r["metrics"]["train_loss"] for r in run.rounds],
        "driver_rss_growth_mb": round(driver_growth / MB, 1),
    }
    if engine == "flower":
        total = mem.ray_total_peak + driver_growth
        out.update({
            "actors": len(actors),
            "actor_rss_peak_mb": round(max(actors) / MB, 1) if actors else None,
            "actor_rss_mean_mb": round(sum(actors) / len(actors) / MB, 1) if actors else None,
            "ray_other_rss_mb": round(ray_other / MB, 1),
            "ray_total_rss_peak_mb": round(mem.ray_total_peak / MB, 1),
            "memory_per_virtual_client_mb": round(total / k / MB, 2),
        })
    else:
        out["memory_per_virtual_client_mb"] = round(driver_growth / k / MB, 2)
    return out, run.final_state_dict


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "| K clients | engine | s/round (warm) | first round s | start-up s | actors | peak RSS / actor MB | "
        "Ray total RSS MB | driver growth MB | MB / virtual client |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['clients']} | {r['engine']} | {_num(r['warm_round_seconds'])} | {r['first_round_seconds']:.2f} | "
            f"{r['startup_seconds']:.1f} | {r.get('actors', '-')} | {r.get('actor_rss_peak_mb', '-')} | "
            f"{r.get('ray_total_rss_peak_mb', '-')} | {r['driver_rss_growth_mb']} | "
            f"{r['memory_per_virtual_client_mb']} |"
        )
    speed = []
    by = {(r["clients"], r["engine"]): r for r in results}
    for k in sorted({r["clients"] for r in results}):
        if (k, "flower") in by and (k, "inprocess") in by:
            key = "warm_round_seconds" if by[(k, "flower")]["warm_round_seconds"] else "first_round_seconds"
            ratio = by[(k, "flower")][key] / by[(k, "inprocess")][key]
            diff = by[(k, "flower")].get("final_max_abs_diff_vs_other_engine")
            speed.append(f"- K={k}: Flower / in-process time per round ({key.split('_')[0]}) = {ratio:.2f}"
                         + (f"; final globals differ by at most {diff:.2e}" if diff is not None else ""))
    return "\n".join(lines + [""] + speed) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--examples", type=int, default=16, help="training sequences per client")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--r-max", type=int, default=8)
    parser.add_argument("--r-min", type=int, default=2)
    parser.add_argument("--method", default="hetlora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--engines", nargs="+", default=["inprocess", "flower"], choices=["inprocess", "flower"])
    parser.add_argument("--quick", action="store_true", help="1 local step, 8 examples of 16 tokens")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args()
    if args.quick:
        args.local_steps, args.examples, args.seq_len = 1, 8, 16

    import flwr
    import ray

    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "ray": ray.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
    }
    results: list[dict] = []
    for k in args.clients:
        finals = {}
        for engine in args.engines:
            print(f"[bench_flower] K={k} engine={engine} ...", file=sys.stderr, flush=True)
            result, finals[engine] = run_case(engine, k, args)
            print(f"[bench_flower] {json.dumps(result)}", file=sys.stderr, flush=True)
            results.append(result)
        if len(finals) == 2:
            diff = max(float((finals["flower"][name] - finals["inprocess"][name]).abs().max())
                       for name in finals["flower"])
            for r in results:
                if r["clients"] == k:
                    r["final_max_abs_diff_vs_other_engine"] = diff
    meta["load_average_at_end"] = round(os.getloadavg()[0], 1)
    table = markdown(results, meta)
    payload = {"meta": meta, "results": results}
    print(table)
    print(json.dumps(payload, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)


if __name__ == "__main__":
    main()
