"""The rest of a round at K = 1,024 clients (issue 25), on small shapes: everything but the aggregation's size.

Measures, on a synthetic `LocalStore` federation (``bench_scale.py``'s cache, tiny shapes by default):

1. validation: ``validate_upload`` of the first K uploads (K = 128, 256, 512, 1024), time per upload; a quadratic
   step shows as a per-upload time growing with K;
2. a whole ``Coordinator.close_round`` at each K (in a fresh copy of the store, uploads restricted to the first K
   clients): wall time, and the sizes of ``rounds/0/summary.json``, the model card (``README.md``) and
   ``round.json`` of the next round; ``render_model_card`` timed on its own; the rank policy (``RankPolicy.assign``)
   and component selection (``select_components`` prefix / rolling / coverage) for K clients timed on their own;
3. resume after ``kill -9``: ``close_round`` in a subprocess killed at several points (fractions of the
   uninterrupted close's duration, measured from when the child has imported everything), then rerun to the end in
   a new subprocess; the published global 1 (``adapter_model.safetensors``) and the summary's decision (accepted,
   weights, next ranks) must be bit-identical to an uninterrupted run's.

Usage::

    python benchmarks/bench_round_scale.py                      # K = 128 .. 1024, tiny shapes
    python benchmarks/bench_round_scale.py --clients 16 32 --kill-at 0.5 --out /tmp/round   # seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import bench_scale  # noqa: E402
import torch  # noqa: E402

from peft_hetlora.federated import Coordinator, LocalStore, RankPolicy, validate_upload  # noqa: E402
from peft_hetlora.federated.policies import select_components  # noqa: E402
from peft_hetlora.federated.stores import render_model_card  # noqa: E402

DECISION_FIELDS = ("accepted", "rejected", "weights", "client_ranks")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def time_validation(store: LocalStore, coord: Coordinator, ids: list[str]) -> float:
    """Seconds to validate the uploads of ``ids`` (warm page cache)."""
    spec = coord.upload_spec(0)
    plan = coord.open_round(0)
    start = time.perf_counter()
    for cid in ids:
        validate_upload(store.download_client(0, cid), spec, client_id=cid, round_idx=0,
                        assigned_rank=plan.ranks.get(cid))
    return time.perf_counter() - start


def time_close(source: Path, ids: list[str], work: Path) -> dict:
    """A whole close_round with the uploads of ``ids``, in a fresh copy of the store."""
    target = work / f"close-{len(ids)}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, symlinks=True)
    store = LocalStore(target)
    coord = Coordinator(store, progress=False)
    seconds, summary = _timed(coord.close_round, 0, uploads=ids)
    if len(summary["accepted"]) != len(ids):
        raise RuntimeError(f"close_round accepted {len(summary['accepted'])} of {len(ids)}: {summary['rejected']}")
    summaries = {0: store.read_summary(0)}
    render_s, card = _timed(render_model_card, target.name, store.read_federation(), 1, summaries)
    out = {
        "close_round_s": seconds,
        "summary_bytes": (target / "rounds" / "0" / "summary.json").stat().st_size,
        "model_card_bytes": (target / "README.md").stat().st_size,
        "model_card_render_s": render_s,
        "rendered_card_bytes": len(card.encode()),
        "round_json_bytes": (Path(store.get_global(1).path) / "round.json").stat().st_size,
    }
    shutil.rmtree(target, ignore_errors=True)
    return out


def time_policies(ids: list[str], r_max: int) -> dict:
    ranks_s, ranks = _timed(RankPolicy.coerce("uniform").assign, ids, r_min=1, r_max=r_max, seed=0)
    out = {"rank_policy_uniform_s": ranks_s}
    for policy in ("prefix", "rolling", "coverage"):
        out[f"select_{policy}_s"], _ = _timed(select_components, policy, ranks, r_max=r_max, round_idx=3, seed=0)
    return out


# --------------------------------------------------------------------------------------------- kill -9
def close_child(folder: Path) -> None:
    """Subprocess: say 'ready' once imported, then close round 0 of the store."""
    torch.set_num_threads(1)
    store = LocalStore(folder)
    coord = Coordinator(store, progress=False)
    print("ready", flush=True)
    coord.close_round(0)
    print("done", flush=True)


def _start_child(folder: Path) -> tuple[subprocess.Popen, float]:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--close-child", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"close child did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, time.perf_counter()


def _run_child(folder: Path) -> float:
    """Run a close to the end; seconds from the child's 'ready' to its 'done' (interpreter exit not counted)."""
    proc, start = _start_child(folder)
    line = proc.stdout.readline()
    seconds = time.perf_counter() - start
    _, err = proc.communicate()
    if proc.returncode != 0 or line.strip() != "done":
        raise RuntimeError(f"close child failed:\n{err[-3000:]}")
    return seconds


def _kill_when_summary(proc: subprocess.Popen, summary: Path, start: float, limit_s: float) -> float | None:
    """Kill the child as soon as summary.json exists (between the decision and the publication)."""
    while time.perf_counter() - start < limit_s and proc.poll() is None:
        if summary.exists():
            os.kill(proc.pid, signal.SIGKILL)
            return time.perf_counter() - start
        time.sleep(0.001)
    return None


def _published(folder: Path) -> tuple[str, dict]:
    store = LocalStore(folder)
    glob = store.get_global(1)
    summary = store.read_summary(0)
    return sha256(Path(glob.path) / "adapter_model.safetensors"), {k: summary.get(k) for k in DECISION_FIELDS}


def kill_resume(source: Path, work: Path, fractions: list[float]) -> dict:
    """Uninterrupted close vs close killed (SIGKILL) at each fraction of its duration, then rerun."""
    ref_dir = work / "ref"
    shutil.copytree(source, ref_dir, symlinks=True)
    ref_s = _run_child(ref_dir)
    ref_sha, ref_decision = _published(ref_dir)
    trials = []
    for frac in [*fractions, "summary"]:
        trial = work / f"kill-{frac}"
        shutil.copytree(source, trial, symlinks=True)
        proc, start = _start_child(trial)
        if frac == "summary":
            killed_after = _kill_when_summary(proc, trial / "rounds" / "0" / "summary.json", start, 3 * ref_s)
        else:
            time.sleep(max(0.0, frac * ref_s - (time.perf_counter() - start)))
            killed_after = time.perf_counter() - start
        finished_first = proc.poll() is not None
        if not finished_first:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        store = LocalStore(trial)
        latest = store.latest_global()
        state = ("summary written" if store.read_summary(0) is not None else "no summary") + (
            ", global 1 published" if latest is not None and latest.round == 1 else "")
        _run_child(trial)
        sha, decision = _published(trial)
        trials.append({"kill_at": frac, "killed_after_s": killed_after, "state_at_kill": state,
                       "finished_before_kill": finished_first, "global_identical": sha == ref_sha,
                       "decision_identical": decision == ref_decision})
        shutil.rmtree(trial, ignore_errors=True)
    shutil.rmtree(ref_dir, ignore_errors=True)
    return {"reference_close_s": ref_s, "global_sha256": ref_sha, "trials": trials}


# ---------------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"Shapes: {cfg['shapes']}, {cfg['layers']} layers, r_max {cfg['r_max']}, method {cfg['method']} (the "
        f"federation's), tiers mix 10:6:4; load average {cfg['loadavg_start']} at the start.",
        "",
        "| K | validate (s) | per upload (ms) | close_round (s) | per client (ms) | summary.json (KB) "
        "| model card (KB) | card render (ms) | round.json (KB) | rank policy (ms) | select prefix / rolling / "
        "coverage (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['clients']} | {row['validate_s']:.2f} | {1e3 * row['validate_s'] / row['clients']:.2f} "
            f"| {row['close_round_s']:.2f} | {1e3 * row['close_round_s'] / row['clients']:.2f} "
            f"| {row['summary_bytes'] / 1e3:.0f} | {row['model_card_bytes'] / 1e3:.1f} "
            f"| {1e3 * row['model_card_render_s']:.1f} | {row['round_json_bytes'] / 1e3:.1f} "
            f"| {1e3 * row['rank_policy_uniform_s']:.1f} | {1e3 * row['select_prefix_s']:.1f} / "
            f"{1e3 * row['select_rolling_s']:.1f} / {1e3 * row['select_coverage_s']:.1f} |"
        )
    kill = report.get("kill_resume")
    if kill:
        lines += ["", f"Resume after kill -9 at K = {kill['clients']}: uninterrupted close "
                      f"{kill['reference_close_s']:.1f} s (from the child's 'ready' to its return); each trial kills "
                      "`close_round` at a fraction of that, then reruns it to the end in a new process.", "",
                  "| killed at | state at the kill | global 1 bit-identical | decision identical |",
                  "|---:|---|---|---|"]
        for t in kill["trials"]:
            state = t["state_at_kill"] + (" (had finished)" if t["finished_before_kill"] else "")
            when = "when summary.json appeared" if t["kill_at"] == "summary" else f"{t['kill_at']:.2f}"
            after = "-" if t["killed_after_s"] is None else f"{t['killed_after_s']:.2f} s"
            lines.append(f"| {when} ({after}) | {state} "
                         f"| {'yes' if t['global_identical'] else '**no**'} "
                         f"| {'yes' if t['decision_identical'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--r-max", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--kill-at", type=float, nargs="*", default=[0.1, 0.3, 0.5, 0.7, 0.9, 0.99],
                        help="fractions of the uninterrupted close at which to kill (none: skip)")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "scale_cache")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", default="round_scale")
    parser.add_argument("--close-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.close_child is not None:
        close_child(args.close_child)
        return
    torch.set_num_threads(1)
    arch = bench_scale.TINY
    k_max = max(args.clients)
    folder = bench_scale.cache_dir(args.cache, arch, args.layers, args.r_max, k_max)
    bench_scale.build_cache(folder, arch, args.layers, args.r_max, max(k_max, bench_scale._cached_size(folder)))
    store = LocalStore(folder)
    coord = Coordinator(store, progress=False)
    all_ids = sorted(store.list_client_uploads(0))
    report = {"config": {"shapes": arch["name"], "layers": args.layers, "r_max": args.r_max, "method": coord.method,
                         "loadavg_start": " / ".join(f"{x:.1f}" for x in os.getloadavg())}, "rows": []}
    time_validation(store, coord, all_ids[:k_max])  # warm the page cache once
    with tempfile.TemporaryDirectory(prefix="round_scale_") as tmp:
        work = Path(tmp)
        for num in sorted(args.clients):
            ids = all_ids[:num]
            row = {"clients": num, "validate_s": time_validation(store, coord, ids)}
            row.update(time_close(folder, ids, work))
            row.update(time_policies(ids, args.r_max))
            report["rows"].append(row)
            print(f"K={num}: validate {row['validate_s']:.2f} s, close {row['close_round_s']:.2f} s",
                  file=sys.stderr, flush=True)
        if args.kill_at:
            # the kill test closes the round with every upload the cache holds beyond k_max too: use a k_max store
            source = work / "source"
            shutil.copytree(folder, source, symlinks=True)
            for cid in all_ids[k_max:]:
                shutil.rmtree(source / "rounds" / "0" / "clients" / cid)
            report["kill_resume"] = {"clients": k_max, **kill_resume(source, work, args.kill_at)}
    report["config"]["loadavg_end"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    table = markdown(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{args.name}.md").write_text(
        f"Command: `python benchmarks/bench_round_scale.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
        f"{table}")
    print(table)


if __name__ == "__main__":
    main()
