"""benchmarks/feasibility24.py: best-so-far held-out, the oracle-vs-capable flag and the percentage gaps.

Every expected number is worked out by hand from the curves below."""

from __future__ import annotations

import doctest
import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("feasibility24",
                                               Path(__file__).parents[1] / "benchmarks" / "feasibility24.py")
feasibility24 = importlib.util.module_from_spec(_SPEC)
sys.modules["feasibility24"] = feasibility24
_SPEC.loader.exec_module(feasibility24)


def _curve(values: list[float]) -> dict:
    return {"rounds": [{"round": t, "heldout_ppl": v} for t, v in enumerate(values)]}


def _seeds() -> dict:
    # round:              0     1     2     3     4     5
    return {0: {"homlora_rmax": _curve([99, 60, 50, 45, 44, 43]),           # best to 3: 45, to 5: 43
                "homlora_rmax_capable": _curve([99, 55, 46, 47, 48, 49]),   # best to 3: 46, to 5: 46
                "homlora_rmin": _curve([99, 70, 60, 55, 52, 50]),
                "flexlora_held": _curve([99, 65, 52, 48, 47, 46])},
            1: {"homlora_rmax": _curve([99, 60, 50, 47, 46, 45]),
                "homlora_rmax_capable": _curve([99, 50, 45, 44, 43, 42]),
                "flexlora_held": _curve([99, 61, 51, 49, 48, 44])}}


def test_best_up_to_is_the_minimum_over_rounds_1_to_h_and_needs_round_h() -> None:
    curve = _curve([1.0, 9.0, 7.0, 8.0])  # round 0 (the start) never counts
    assert feasibility24.best_up_to(curve, 3) == 7.0
    assert feasibility24.best_up_to(curve, 1) == 9.0
    assert feasibility24.best_up_to(curve, 4) is None


def test_rows_by_hand() -> None:
    rows = {(r["seed"], r["round"]): r for r in feasibility24.feasibility_rows(_seeds(), [3, 5])}
    r = rows[(0, 3)]
    assert (r["oracle_best"], r["capable_best"], r["default_best"], r["rmin_best"]) == (45, 46, 48, 55)
    assert r["oracle_beats_capable"] is True
    assert r["default_vs_capable_pct"] == pytest.approx(100 * (48 - 46) / 46)
    assert r["default_vs_rmin_pct"] == pytest.approx(100 * (48 - 55) / 55)
    assert r["default_vs_oracle_pct"] == pytest.approx(100 * (48 - 45) / 45)
    assert r["oracle_beats_rmin"] is True and r["oracle_vs_rmin_pct"] == pytest.approx(100 * (45 - 55) / 55)
    assert rows[(0, 5)]["oracle_best"] == 43 and rows[(0, 5)]["capable_best"] == 46
    r = rows[(1, 5)]
    assert r["oracle_beats_capable"] is False  # 45 against 42
    assert r["rmin_best"] is None and r["default_vs_rmin_pct"] is None and r["oracle_beats_rmin"] is None
    assert r["oracle_vs_capable_pct"] == pytest.approx(100 * (45 - 42) / 42)


def test_overlay_and_outputs(tmp_path: Path) -> None:
    chosen = tmp_path / "chosen" / "c"
    chosen.mkdir(parents=True)
    seeds = _seeds()
    (chosen / "metrics.json").write_text(json.dumps({"seeds": list(seeds), "metrics": list(seeds.values())}))
    arm_dir = tmp_path / "runs" / "c" / "homlora_rmax_capable" / "s0" / "seed-0" / "homlora_rmax_capable"
    arm_dir.mkdir(parents=True)
    (arm_dir / "rounds.jsonl").write_text("\n".join(json.dumps(r) for r in _curve([99, 80, 70, 60, 50, 40])["rounds"]))
    out = tmp_path / "out"
    assert feasibility24.main(["--chosen", str(tmp_path / "chosen"), "--corpora", "c", "--runs",
                               str(tmp_path / "runs"), "--out", str(out), "--name", "f"]) == 0
    data = json.loads((out / "f.json").read_text())
    seed0_r5 = next(r for r in data["c"] if r["seed"] == 0 and r["round"] == 5)
    assert seed0_r5["capable_best"] == 40  # the overlaid rerun replaced the stored curve for seed 0
    seed1_r5 = next(r for r in data["c"] if r["seed"] == 1 and r["round"] == 5)
    assert seed1_r5["capable_best"] == 42  # seed 1 has no rerun: the stored curve stays
    assert (out / "f.png").stat().st_size > 0 and "| c | 5 |" in (out / "f.md").read_text()


def test_docstring_examples() -> None:
    assert doctest.testmod(feasibility24).failed == 0


def test_the_oracle_need_not_beat_r_min_and_runs_alone_need_no_stored_baselines(tmp_path: Path) -> None:
    # round:                   0    1   2   3
    curves = {"homlora_rmax": [99, 50, 47, 46], "homlora_rmax_capable": [99, 49, 48, 52],
              "homlora_rmin": [99, 60, 48, 45], "flexlora_held": [99, 55, 47, 46]}
    for arm, values in curves.items():
        for seed in (0, 2):
            folder = tmp_path / "runs" / "c" / arm / f"s{seed}" / f"seed-{seed}" / arm
            folder.mkdir(parents=True)
            (folder / "rounds.jsonl").write_text("\n".join(json.dumps(r) for r in _curve(values)["rounds"]))
    out = tmp_path / "out"
    assert feasibility24.main(["--chosen", "", "--corpora", "c", "--runs", str(tmp_path / "runs"), "--out", str(out),
                               "--name", "f"]) == 0
    rows = {(r["seed"], r["round"]): r for r in json.loads((out / "f.json").read_text())["c"]}
    assert sorted({seed for seed, _ in rows}) == [0, 2]  # the seeds the run folders hold
    # round 3: oracle best 46, r_min best 45: full rank buys nothing over r_min at this horizon
    assert rows[(0, 3)]["oracle_beats_rmin"] is False
    assert rows[(0, 3)]["oracle_vs_rmin_pct"] == pytest.approx(100 * (46 - 45) / 45)
    assert rows[(0, 3)]["oracle_beats_capable"] is True  # 46 against 48
    assert "| c | 3 | 46.00 / 46.00 | 48.00 / 48.00 | 2 of 2 | 45.00 / 45.00 | 0 of 2 |" in (out / "f.md").read_text()
