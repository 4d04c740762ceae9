"""The multi-seed study behind issues 12 and 13: resumable, parallel workers, one report per corpus and horizon.

Every piece is a `hetlora simulate` call (`--profile cpu`: SmolLM2-135M, 20 clients, 4 a round, `tiers` ranks
2/6/16) into its own run folder ``OUT/<corpus>/<setting>/s<seed>``, so a killed study resumes where it stopped
(finished folders are skipped without loading the model; unfinished ones resume inside `hetlora simulate`).

Phases (``--phase all`` runs them in this order):

1. ``seeds``: the default arms plus ``window_coverage`` at the cpu profile's 5 rounds, on every corpus and seed
   (and ``window_rolling`` on the tuning corpus and seed, to pick the better window rule);
   ``tune``: on the tuning corpus and seed, the core arms at the other learning rates, and the
   self-pruning arms (``hetlora``, ``rankwise``) at other HetLoRA ``prune_lambda`` / ``prune_gamma`` values.
   Both run together on the worker pool.
2. ``long``: the core arms, each at the setting it won on *client validation* data (mean client-validation
   perplexity over the last two tuning rounds; held-out data is never used to choose), extended to
   ``--long-rounds`` on the long corpora and every seed. Rounds are result-neutral in a run folder, so the
   5-round runs are extended, not redone.
3. ``report``: ``OUT/report/r<R>/<corpus>/`` (report.md, metrics.json, plots with ±1 std bands, paired wins per
   seed) for the 5-round and long horizons, a merged table over corpora, the tuning table and the per-component
   norms of the long runs' final global adapters (``OUT/report/study.md``).

Run (about 1.5 h with two workers on an idle 2-core machine; see benchmarks/README.md):

    PYTHONPATH=$PWD python benchmarks/study.py --out runs/study --workers 2

Example with a smaller study (a smoke test of the machinery on the tiny model):

    PYTHONPATH=$PWD python benchmarks/study.py --profile quick --corpora chitchat --seeds 0,1 \
        --long-corpora chitchat --long-rounds 3 --tune-rounds 2 --lrs 1e-3 --prune-variants '' --out runs/study-quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from study_plan import (  # noqa: E402
    BASE_ARMS,
    BASE_SETTING,
    WINDOW_ARMS,
    Piece,
    best_window,
    choose_settings,
    horizons,
    is_done,
    long_pieces,
    plan,
    plateau_arms,
    read_rows,
)
from study_report import report  # noqa: E402

from hetlora_bench.arms import PROFILES, SimulationConfig  # noqa: E402


def run_piece(piece: Piece, out: Path, profile: str, threads: int) -> Piece:
    """Run (or resume) one piece in a child process with `threads` math threads; raise if it fails."""
    folder = piece.folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "peft_hetlora.cli",
        "simulate",
        "--profile",
        profile,
        "--out",
        str(folder),
        "--dataset",
        piece.corpus,
        "--seeds",
        str(piece.seed),
        "--methods",
        ",".join(piece.methods),
        "--rounds",
        str(piece.rounds),
    ]
    for key, value in sorted({**BASE_SETTING, **dict(piece.setting)}.items()):
        command += [f"--{key.replace('_', '-')}", f"{value:g}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    with open(folder / "study.log", "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {code}); see {folder / 'study.log'}")
    return piece


def run_pieces(pieces: list[Piece], out: Path, profile: str, workers: int, desc: str) -> None:
    todo = [p for p in pieces if not is_done(p, out)]
    if not todo:
        return
    threads = max(1, (os.cpu_count() or 2) // workers)
    todo.sort(key=lambda p: -p.cost)  # longest first: the pool finishes together
    failures = []
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(todo), desc=desc, unit="run") as bar:
        futures = {pool.submit(run_piece, p, out, profile, threads): p for p in todo}
        for future in as_completed(futures):
            try:
                future.result()
            except RuntimeError as err:
                failures.append(str(err))
            bar.update()
    if failures:
        raise SystemExit("\n".join(failures))


def revalidate(out: Path, settings: list[str] | None = None, corpora: list[str] | None = None) -> int:
    """Redo the client validation of every window arm under `out` (a study folder or one `hetlora simulate` run
    folder) with the model its clients hold (the whole global; `hetlora_bench.runner.
    refresh_window_rows`), for folders written before that rule. Only for folders no process is writing.
    Returns how many rows changed."""
    from hetlora_bench.runner import refresh_window_rows
    from hetlora_bench.workbench import prepare

    changed = 0
    for config_path in sorted([*out.glob("config.json"), *out.glob("*/*/s*/config.json")]):
        folder = config_path.parent
        if (settings and folder.parent.name not in settings) or (corpora and folder.parent.parent.name not in corpora):
            continue
        stored = json.loads(config_path.read_text())["settings"]
        for seed_dir in sorted(folder.glob("seed-*")):
            arm_dirs = [seed_dir / arm for arm in WINDOW_ARMS]
            arm_dirs = [d for d in arm_dirs if any(r["round"] and "client_val_model" not in r for r in read_rows(d))]
            if not arm_dirs:
                continue
            # validation sets are tiny: the uncached model is faster than rebuilding the activation cache
            config = SimulationConfig(**{**stored, "activation_cache": False})
            wb = prepare(config, int(seed_dir.name.split("-")[1]))
            for arm_dir in arm_dirs:
                changed += refresh_window_rows(wb, arm_dir.name, arm_dir)
    return changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    floats = lambda text: [float(v) for v in text.split(",") if v]  # noqa: E731
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument("--profile", default="cpu", choices=list(PROFILES))
    parser.add_argument("--phase", default="all", choices=("all", "seeds", "long", "report", "revalidate"))
    parser.add_argument(
        "--settings",
        type=lambda t: [c for c in t.split(",") if c],
        default=None,
        help="revalidate only these setting folders (e.g. 'default'); default: all",
    )
    parser.add_argument("--workers", type=int, default=2, help="parallel `hetlora simulate` processes")
    parser.add_argument("--corpora", type=lambda t: t.split(","), default=["chitchat", "pycode"])
    parser.add_argument("--long-corpora", type=lambda t: [c for c in t.split(",") if c], default=["chitchat"])
    parser.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")], default=[0, 1, 2])
    parser.add_argument("--methods", type=lambda t: t.split(","), default=list(BASE_ARMS))
    parser.add_argument(
        "--extra-long-arms",
        type=lambda t: [a for a in t.split(",") if a],
        default=[],
        help="arms tuned like the core arms and run and reported in the long phase beside the chosen window rule "
        "and the core arms (each at its chosen setting), e.g. 'window_coverage' when another window rule won",
    )
    parser.add_argument("--long-rounds", type=int, default=20)
    parser.add_argument("--long-step", type=int, default=5, help="extend the long runs this many rounds at a time")
    parser.add_argument(
        "--long-from",
        type=int,
        default=None,
        help="the round the long runs already reached (default: the profile's rounds, run by the seeds phase); 0 for "
        "a corpus whose chosen settings never ran",
    )
    parser.add_argument(
        "--plateau-rounds",
        type=int,
        default=0,
        help="run --plateau-arms on past --long-rounds to this round, to see where HomLoRA(r_max) levels off",
    )
    parser.add_argument(
        "--plateau-arms",
        type=lambda t: [a for a in t.split(",") if a],
        default=["window", "homlora_rmax"],
        help="'window' = the window rule chosen on validation; must include homlora_rmax (the reference)",
    )
    parser.add_argument("--plateau-corpora", type=lambda t: [c for c in t.split(",") if c], default=["chitchat"])
    parser.add_argument("--tune-corpus", default="chitchat")
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument("--tune-rounds", type=int, default=None, help="default: the profile's rounds")
    parser.add_argument("--lrs", type=floats, default=[1e-4, 1e-3], help="learning rates tried besides the profile's")
    parser.add_argument(
        "--prune-variants",
        type=lambda t: [v for v in t.split(",") if v],
        default=["lam=0.5", "gam=0.9"],
        help="HetLoRA self-pruning variants, e.g. 'lam=0.5,gam=0.9' (one each) or 'lam=0.5:gam=0.9'",
    )
    parser.add_argument("--results", type=Path, default=None, help="also copy the report's md/json/png here")
    parser.add_argument("--report-dir", type=Path, default=None, help="where the report goes (default: OUT/report)")
    args = parser.parse_args(argv)
    if args.plateau_rounds and "homlora_rmax" not in args.plateau_arms:
        parser.error("--plateau-arms must include homlora_rmax: the gap is measured against it")
    args.rounds = SimulationConfig.from_sources(profile=args.profile).rounds
    args.tune_rounds = args.tune_rounds or args.rounds
    out = args.out
    if args.phase in ("all", "seeds"):
        seeds, tune = plan(args)
        run_pieces(seeds + tune, out, args.profile, args.workers, "study: seeds + tuning")
    if args.phase in ("all", "long"):
        chosen, table = choose_settings(args, out)
        window = best_window(table)
        # every arm reaches each horizon before any goes further: a study stopped early is still a fair comparison
        start = args.rounds if args.long_from is None else args.long_from
        for horizon in horizons(start, args.long_rounds, args.long_step):
            pieces = long_pieces(args, chosen, window, horizon)
            run_pieces(pieces, out, args.profile, args.workers, f"study: long runs to round {horizon}")
        for horizon in horizons(args.long_rounds, args.plateau_rounds, args.long_step):
            pieces = long_pieces(args, chosen, window, horizon, plateau_arms(args, window), args.plateau_corpora)
            run_pieces(pieces, out, args.profile, args.workers, f"study: towards the plateau, round {horizon}")
    if args.phase == "revalidate":
        print(f"{revalidate(out, args.settings, args.corpora)} rows re-measured")
        return
    if args.phase in ("all", "report"):
        print(report(args, out))


if __name__ == "__main__":
    main()
