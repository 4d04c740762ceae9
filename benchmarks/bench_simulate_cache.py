"""`hetlora simulate` with the activation cache on vs off, side by side in one process.

Arms run interleaved (arm 1 off, arm 1 on, arm 2 off, ...) into two run folders, so machine load hits both
alike; each call includes its own setup (model load, tokenisation, and for "on" building the cache). Phase
timers (Trainer construction, local training, evaluation, aggregation, setup) say where the time goes.
Wall and process CPU time are both recorded (CPU time is less sensitive to other processes on a shared
machine). Per-round held-out and client-validation perplexities of the two runs are compared.

Run (reduced cpu profile: the same model and data, fewer arms / rounds):
    PYTHONPATH=$PWD nice -n 5 python benchmarks/bench_simulate_cache.py \
        --methods hetlora,homlora_rmax,centralized --rounds 2 --out runs/bench-cache
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import time
from pathlib import Path

import transformers

from hetlora_bench import runner
from hetlora_bench.arms import SimulationConfig
from peft_hetlora.federated import coordinator as coordinator_module

PHASES: collections.Counter = collections.Counter()
CPU: collections.Counter = collections.Counter()


def _timed(phase: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            PHASES[phase] += time.perf_counter() - started
            CPU[phase] += time.process_time() - cpu

    return wrapper


@contextlib.contextmanager
def phase_timers():
    """Wrap the simulation's phases with timers (restored afterwards)."""
    patches = [
        (transformers.Trainer, "__init__", "trainer construction"),
        (transformers.Trainer, "train", "local training (Trainer.train)"),
        (runner.Workbench, "heldout_ppl", "held-out evaluation"),
        (runner.Workbench, "validation_ppl", "client validation evaluation"),
        (coordinator_module.Coordinator, "step", "aggregation (Coordinator.step)"),
        (runner, "prepare", "setup (data, model, cache)"),
        (runner, "write_report", "report and plots"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, phase in patches:
        setattr(owner, name, _timed(phase, getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _rows(folder: Path, arm: str) -> list[dict]:
    path = folder / "seed-0" / arm / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--methods", default="hetlora,homlora_rmax,centralized")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-cache"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/simulate_speed.json"))
    parser.add_argument(
        "--together", action="store_true", help="one call per setting with all arms (the cache is shared across arms)"
    )
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    seconds = {True: 0.0, False: 0.0, "cpu-True": 0.0, "cpu-False": 0.0}
    phases = {key: collections.Counter() for key in (True, False, "cpu-True", "cpu-False")}
    # warm-up outside the timings: model conversion (first use), chitchat parsing and tokenisation are cached
    runner.prepare(SimulationConfig.from_sources(profile=args.profile, overrides={"activation_cache": False}), 0)
    with phase_timers():
        for arm in [methods] if args.together else methods:
            for cache in (False, True):
                config = SimulationConfig.from_sources(
                    profile=args.profile,
                    overrides={
                        "methods": arm if args.together else [arm],
                        "rounds": args.rounds,
                        "activation_cache": cache,
                    },
                )
                PHASES.clear()
                CPU.clear()
                started, cpu = time.perf_counter(), time.process_time()
                runner.run_simulation(config, args.out / ("on" if cache else "off"))
                seconds[cache] += time.perf_counter() - started
                seconds[f"cpu-{cache}"] += time.process_time() - cpu
                phases[cache].update(PHASES)
                phases[f"cpu-{cache}"].update(CPU)
                print(f"{arm} cache={cache}: {time.perf_counter() - started:.1f} s {dict(PHASES)}", flush=True)
            _write(args, methods if args.together else methods[: methods.index(arm) + 1], seconds, phases)


def _write(args, methods, seconds, phases) -> None:
    worst = 0.0
    for arm in methods:
        off, on = _rows(args.out / "off", arm), _rows(args.out / "on", arm)
        assert [r["round"] for r in off] == [r["round"] for r in on]
        for a, b in zip(off, on):
            for key in ("heldout_ppl", "client_val_ppl"):
                if a.get(key) is not None:
                    worst = max(worst, abs(a[key] - b[key]))
    result = {
        "profile": args.profile,
        "methods": methods,
        "rounds": args.rounds,
        "seconds_off": seconds[False],
        "seconds_on": seconds[True],
        "speedup": seconds[False] / seconds[True],
        "cpu_seconds_off": seconds["cpu-False"],
        "cpu_seconds_on": seconds["cpu-True"],
        "cpu_speedup": seconds["cpu-False"] / seconds["cpu-True"],
        "max_abs_ppl_difference": worst,
        "phases_off": dict(phases[False]),
        "phases_on": dict(phases[True]),
        "cpu_phases_off": dict(phases["cpu-False"]),
        "cpu_phases_on": dict(phases["cpu-True"]),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
