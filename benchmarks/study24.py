"""The issue-24 study: new arms at the cpu profile, paired per seed with the stored baselines; resumable.

One piece is one `hetlora simulate` call for one corpus, arm and seed into ``OUT/<corpus>/<arm>/s<seed>`` (finished
folders are skipped without loading the model, unfinished ones resume inside `hetlora simulate`; a later call with
more ``--rounds`` extends them). The children share one persisted activation cache per model / corpus / seed
(``--cache-dir``, :data:`hetlora_bench.activation_cache.PERSIST_ENV`), so the pieces of a seed stop refilling it.

Learning rates: every arm at the rate chosen on client validation by the previous study (``--chosen``, its
``chosen`` table); an arm it never tuned at ``flexlora_held``'s chosen rate, unless ``--lr ARM=RATE`` says
otherwise. The report says which rate each arm ran at.

Baselines are read from the stored study (``--baselines``: ``<corpus>/metrics.json`` of
``benchmarks/results/study/chosen/r20``); an arm named in ``--rerun`` is run like a candidate instead, and its new
runs replace the stored ones in the report.

The report (``--report`` folder, default ``OUT/report``; ``--results`` copies it): per corpus, held-out perplexity
at rounds 3, 5, 10, 15, 20 (those reached) and early-stopped on client validation, paired differences to
HomLoRA(r_max) capable-only, HomLoRA(r_min), HomLoRA(r_max) and flexlora_held at the round, early-stopped and at equal
upload bytes, and the targets table (:mod:`study24_report`); ``report.md``, ``report.json``, ``curves.png``,
``targets.png``.

Early stopping reads the fixed federation validation set (``fixed_val_ppl``, every client's validation examples)
where both sides of a comparison have it; ``--fill-fixed-val`` adds it to run folders written before it, from their
stored per-round globals (no training; a resumed piece gets it inside `hetlora simulate` too).

Run (raFLoRA, chitchat, 3 seeds, 10 rounds; one worker):

    PYTHONPATH=$PWD nice -n 10 python benchmarks/study24.py --arms raflora --corpora chitchat --rounds 10 \
        --out runs/study24 --results benchmarks/results/study24
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from study24_report import (  # noqa: E402
    PAIRED_WITH,
    available_horizons,
    corpus_sections,
    plot_corpus,
    plot_targets,
)
from study_plan import read_rows  # noqa: E402

from hetlora_bench.activation_cache import PERSIST_ENV  # noqa: E402
from hetlora_bench.arms import ARMS, PROFILES  # noqa: E402
from hetlora_bench.seed_stats import data_signature, json_safe, same_data  # noqa: E402

BASELINES = REPO / "benchmarks" / "results" / "study" / "chosen" / "r20"
CHOSEN = REPO / "benchmarks" / "results" / "study" / "chosen" / "study.json"
#: the arm whose chosen rate an untuned arm runs at
RATE_OF_UNTUNED = "flexlora_held"


@dataclass(frozen=True)
class Piece24:
    """One `hetlora simulate` call: corpus, arm, seed, rounds and learning rate."""

    corpus: str
    arm: str
    seed: int
    rounds: int
    learning_rate: float

    def folder(self, out: Path) -> Path:
        return out / self.corpus / self.arm / f"s{self.seed}"

    def done(self, out: Path) -> bool:
        """Whether the run folder has reached ``rounds`` (read from its ``rounds.jsonl``, the model never loaded).

        Example:
            >>> Piece24("c", "a", 0, 3, 1e-3).done(Path("/nonexistent"))
            False
        """
        rows = read_rows(self.folder(out) / f"seed-{self.seed}" / self.arm)
        return any(r.get("round") == self.rounds for r in rows)


def learning_rates(arms: list[str], chosen_file: Path, overrides: dict[str, float]) -> dict[str, tuple[float, str]]:
    """Each arm's rate and where it comes from: ``--lr``, the study's choice, or ``flexlora_held``'s choice.

    Example:
        >>> learning_rates(["x"], Path("/nonexistent"), {"x": 0.002})
        {'x': (0.002, '--lr')}
    """
    chosen: dict[str, Any] = {}
    if chosen_file.is_file():
        chosen = json.loads(chosen_file.read_text(encoding="utf-8")).get("chosen", {})
    out = {}
    for arm in arms:
        if arm in overrides:
            out[arm] = (overrides[arm], "--lr")
        elif "learning_rate" in chosen.get(arm, {}):
            out[arm] = (float(chosen[arm]["learning_rate"]), "chosen on client validation (previous study)")
        elif "learning_rate" in chosen.get(RATE_OF_UNTUNED, {}):
            out[arm] = (float(chosen[RATE_OF_UNTUNED]["learning_rate"]), f"{RATE_OF_UNTUNED}'s chosen rate (untuned)")
        else:
            raise SystemExit(f"study24: no learning rate for {arm!r}: pass --lr {arm}=RATE")
    return out


def run_piece(piece: Piece24, out: Path, profile: str, cache_dir: Path | None, threads: int) -> None:
    """Run (or resume) one piece in a child process; raise if it fails."""
    folder = piece.folder(out)
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "peft_hetlora.cli", "simulate", "--profile", profile, "--out", str(folder),
               "--dataset", piece.corpus, "--seeds", str(piece.seed), "--methods", piece.arm,
               "--rounds", str(piece.rounds), "--learning-rate", f"{piece.learning_rate:g}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    if cache_dir is not None:
        env[PERSIST_ENV] = str(cache_dir)
    with open(folder / "study.log", "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {code}); see {folder / 'study.log'}")


def run_all(pieces: list[Piece24], out: Path, profile: str, cache_dir: Path | None, threads: int) -> list[str]:
    """Run the unfinished pieces one after another, printing progress and an ETA from the finished ones."""
    todo = [p for p in pieces if not p.done(out)]
    print(f"study24: {len(pieces) - len(todo)} of {len(pieces)} pieces finished, {len(todo)} to run", flush=True)
    failures, start = [], time.monotonic()
    for i, piece in enumerate(todo):
        print(f"study24: [{i + 1}/{len(todo)}] {piece.corpus} / {piece.arm} / seed {piece.seed} "
              f"({piece.rounds} rounds, lr {piece.learning_rate:g})", flush=True)
        try:
            run_piece(piece, out, profile, cache_dir, threads)
        except RuntimeError as err:
            failures.append(str(err))
        elapsed = time.monotonic() - start
        eta = elapsed / (i + 1) * (len(todo) - i - 1)
        print(f"study24: elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min", flush=True)
    return failures


def fill_fixed_val(pieces: list[Piece24], out: Path, cache_dir: Path | None) -> dict[str, Any]:
    """Add ``fixed_val_ppl`` to the existing run folders of ``pieces`` whose rows lack it, from their stored
    per-round globals (:func:`hetlora_bench.runner.fill_fixed_val_folder`; nothing is retrained), printing the
    seconds per round. Only for folders no process is writing. Returns ``{"rows", "seconds", "folders"}``.

    Example:
        >>> fill_fixed_val([], Path("/nonexistent"), None)
        {'rows': 0, 'seconds': 0.0, 'folders': 0}
    """
    from hetlora_bench.runner import fill_fixed_val_folder

    if cache_dir is not None:
        os.environ[PERSIST_ENV] = str(cache_dir)
    total: dict[str, Any] = {"rows": 0, "seconds": 0.0, "folders": 0}
    for folder in dict.fromkeys(p.folder(out) for p in pieces):
        if not (folder / "config.json").is_file():
            continue
        got = fill_fixed_val_folder(folder)
        if got["rows"]:
            total["folders"] += 1
            print(f"study24: {folder}: fixed_val_ppl for {got['rows']} rounds in {got['seconds']:.1f} s "
                  f"({got['seconds'] / got['rows']:.2f} s a round)", flush=True)
        total["rows"] += got["rows"]
        total["seconds"] += got["seconds"]
    return total


def load_runs(out: Path, corpus: str, arms: list[str], seeds: list[int], baselines: Path,
              rerun: list[str], dropped: list[str] | None = None) -> dict[int, dict[str, dict[str, Any]]]:
    """``{seed: {arm: {"rounds": rows}}}``: the stored baselines, then this study's runs (which replace them).

    A stored baseline is kept only if it saw the same data as this study's runs of that seed (`same_data`): a corpus
    built from the environment (``pycode`` reads the installed packages) changes when the environment does, and a
    pairing across two corpora would be silently wrong. What is dropped is appended to ``dropped``.
    """
    runs: dict[int, dict[str, dict[str, Any]]] = {s: {} for s in seeds}
    stored = baselines / corpus / "metrics.json"
    if stored.is_file():
        payload = json.loads(stored.read_text(encoding="utf-8"))
        for seed, per in zip(payload.get("seeds", []), payload.get("metrics", [])):
            if seed in runs:
                for arm, metrics in per.items():
                    if arm not in rerun:
                        runs[seed][arm] = {"rounds": metrics.get("rounds", [])}
    ours: dict[int, dict[str, dict[str, Any]]] = {s: {} for s in seeds}
    for arm in [*arms, *rerun]:
        for seed in seeds:
            rows = read_rows(out / corpus / arm / f"s{seed}" / f"seed-{seed}" / arm)
            if rows:
                ours[seed][arm] = {"rounds": rows}
    for seed in seeds:
        signatures = [data_signature(m["rounds"]) for m in ours[seed].values()]
        if not signatures:
            continue
        for arm in [a for a in runs[seed] if a not in ours[seed]]:
            theirs = data_signature(runs[seed][arm]["rounds"])
            if not same_data(theirs, signatures[0]):
                del runs[seed][arm]
                if dropped is not None:
                    dropped.append(f"{corpus} seed {seed}: stored `{arm}` saw other data (round-0 held-out "
                                   f"{theirs[0] if theirs else float('nan'):.4g} against {signatures[0][0]:.4g})")
        runs[seed].update(ours[seed])
    return runs


def write_report(args: argparse.Namespace, rates: dict[str, tuple[float, str]]) -> Path:
    report_dir = args.report or args.out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    dropped: list[str] = []
    runs_by_corpus = {c: load_runs(args.out, c, args.arms, args.seeds, args.baselines, args.rerun, dropped)
                      for c in args.corpora}
    lines = ["# Issue 24 study: new arms paired per seed with the stored baselines", "",
             f"Profile `{args.profile}`, seeds {args.seeds}, candidates {args.arms}"
             + (f", rerun baselines {args.rerun}" if args.rerun else "")
             + f"; baselines from `{_rel(args.baselines)}`.",
             "", "Learning rates:", ""]
    lines += [f"- `{arm}`: {rate:g} ({why})" for arm, (rate, why) in rates.items()]
    if dropped:
        print("study24: stored baselines not paired (other data):\n  " + "\n  ".join(dropped), file=sys.stderr)
        lines += ["", "**Stored baselines not paired: they saw other data** (a corpus built from the environment "
                  "changes with it; rerun them with `--rerun`):", ""] + [f"- {d}" for d in dropped]
    lines += ["- stored baselines: their rates chosen on client validation by the previous study "
              f"(`{_rel(CHOSEN)}`)", "",
              "Every value is held-out perplexity. *Early-stopped*: at the round up to the horizon with the lowest "
              "validation perplexity (held-out data never chooses): on the fixed federation validation set "
              "(`fixed_val_ppl`: every client's validation examples, the same for every arm and round of a seed) "
              "when both sides of a comparison have it, else on the round's sampled clients' validation "
              "(`client_val_ppl`, marked `client_val`; the stored baselines have no fixed set). "
              "*Equal upload bytes*: both sides at the "
              "smaller cumulative upload of the two at that round, each interpolated between its evaluated rounds.",
              ""]
    record: dict[str, Any] = {"arms": args.arms, "seeds": args.seeds, "learning_rates": rates, "corpora": {}}
    targets_by_corpus = {}
    for corpus, runs in runs_by_corpus.items():
        horizons = available_horizons(runs, args.arms)
        section, rec = corpus_sections(corpus, runs, args.arms, horizons)
        lines += section
        record["corpora"][corpus] = rec
        targets_by_corpus[corpus] = rec["targets"]
    shown = [a for a in (*args.arms, *PAIRED_WITH) if any(a in per for r in runs_by_corpus.values()
                                                          for per in r.values())]
    curves = plot_corpus(runs_by_corpus, shown, report_dir / "curves.png")
    targets = plot_targets(targets_by_corpus, report_dir / "targets.png")
    lines += [f"![held-out ppl per round and per upload byte]({curves.name})", "",
              f"![targets]({targets.name})", ""]
    (report_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
    (report_dir / "report.json").write_text(json.dumps(json_safe(record), indent=1), encoding="utf-8")
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        for name in ("report.md", "report.json", "curves.png", "targets.png"):
            shutil.copy2(report_dir / name, args.results / name)
    return report_dir / "report.md"


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> None:
    names = lambda text: [v for v in text.split(",") if v]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", type=names, required=True, help="candidate arms (any name in hetlora_bench ARMS)")
    parser.add_argument("--corpora", type=names, default=["chitchat", "pycode"])
    parser.add_argument("--seeds", type=lambda t: [int(v) for v in names(t)], default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--profile", default="cpu", choices=list(PROFILES))
    parser.add_argument("--out", type=Path, default=Path("runs/study24"))
    parser.add_argument("--baselines", type=Path, default=BASELINES)
    parser.add_argument("--chosen", type=Path, default=CHOSEN)
    parser.add_argument("--rerun", type=names, default=[], help="baseline arms to run anew instead of reading them")
    parser.add_argument("--lr", action="append", default=[], help="ARM=RATE, overrides the chosen rate")
    parser.add_argument("--cache-dir", default="runs/activation-cache",
                        help="the persisted activation cache shared by the pieces ('' to turn it off)")
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--fill-fixed-val", action="store_true",
                        help="first add fixed_val_ppl to existing run folders that lack it (from their stored "
                             "globals, no training), then run / report")
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=None, help="also copy the report here")
    args = parser.parse_args(argv)
    unknown = [a for a in [*args.arms, *args.rerun] if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    overrides = {}
    for item in args.lr:
        arm, _, rate = item.partition("=")
        try:
            overrides[arm] = float(rate)
        except ValueError:
            parser.error(f"--lr {item!r}: expected ARM=RATE, e.g. raflora=0.004")
    rates = learning_rates([*args.arms, *args.rerun], args.chosen, overrides)
    pieces = [Piece24(c, arm, s, args.rounds, rates[arm][0])
              for c in args.corpora for s in args.seeds for arm in [*args.arms, *args.rerun]]
    cache = Path(args.cache_dir).resolve() if args.cache_dir else None
    if args.fill_fixed_val:
        fill_fixed_val(pieces, args.out, cache)
    if not args.report_only:
        failures = run_all(pieces, args.out, args.profile, cache, args.threads)
        if failures:
            print("\n".join(failures), file=sys.stderr)
    print(write_report(args, rates).read_text())


if __name__ == "__main__":
    main()
