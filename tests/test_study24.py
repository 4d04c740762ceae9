"""benchmarks/study24*.py: pairing with the stored baselines, early-stopped targets, equal upload bytes, resuming.

Every expected number is worked out by hand from the hand-made run folders below."""

from __future__ import annotations

import doctest
import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("study24", Path(__file__).parents[1] / "benchmarks" / "study24.py")
study24 = importlib.util.module_from_spec(_SPEC)
sys.modules["study24"] = study24  # dataclasses resolve their module through sys.modules
_SPEC.loader.exec_module(study24)  # puts benchmarks/ on sys.path for the modules it imports
import study24_report  # noqa: E402


def _rows(heldout: list[float], val: list[float], upload: int) -> list[dict]:
    rows = [{"round": 0, "heldout_ppl": heldout[0], "upload_bytes": 0}]
    rows += [{"round": t, "heldout_ppl": heldout[t], "client_val_ppl": val[t - 1], "upload_bytes": upload}
             for t in range(1, len(heldout))]
    return rows


# seed 0: rounds 0..5. The candidate overfits after round 3 on client validation (its best round by client-val is 3)
CAND = _rows([100, 80, 70, 60, 58, 65], [90, 80, 70, 75, 72], upload=100)
CAPABLE = _rows([100, 75, 66, 62, 59, 61], [85, 76, 71, 69, 70], upload=400)  # client-val best: round 4 -> 59
RMIN = _rows([100, 85, 75, 68, 64, 62], [95, 85, 78, 74, 72], upload=50)  # best round 5 -> 62
RMAX = _rows([100, 70, 60, 55, 52, 50], [80, 70, 65, 60, 58], upload=800)


def _study(tmp_path: Path, arm: str = "newarm") -> tuple[Path, Path]:
    out, baselines = tmp_path / "runs", tmp_path / "stored"
    arm_dir = out / "chitchat" / arm / "s0" / "seed-0" / arm
    arm_dir.mkdir(parents=True)
    (arm_dir / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CAND))
    stored = {"seeds": [0, 1], "metrics": [
        {"homlora_rmax_capable": {"rounds": CAPABLE}, "homlora_rmin": {"rounds": RMIN},
         "homlora_rmax": {"rounds": RMAX}},
        {"homlora_rmin": {"rounds": RMIN}},  # a seed the candidate has not run
    ]}
    (baselines / "chitchat").mkdir(parents=True)
    (baselines / "chitchat" / "metrics.json").write_text(json.dumps(stored))
    return out, baselines


def test_targets_pairs_and_equal_bytes_by_hand(tmp_path):
    out, baselines = _study(tmp_path)
    runs = study24.load_runs(out, "chitchat", ["newarm"], [0], baselines, rerun=[])
    assert set(runs[0]) == {"newarm", "homlora_rmax_capable", "homlora_rmin", "homlora_rmax"}
    assert study24_report.available_horizons(runs, ["newarm"]) == [3, 5]
    targets = study24_report.target_rows(runs, ["newarm"], [3, 5])
    # round 3 is below 5: no target row; round 5: candidate early-stopped at round 3 (client-val 70) -> 60;
    # capable at round 4 (69) -> 59: not beaten; r_min at round 5 (72) -> 62: beaten
    assert targets == [{"candidate": "newarm", "seed": 0, "round": 5, "ppl": 60.0, "criterion": "client_val_ppl",
                        "capable": 59.0, "rmin": 62.0,
                        "rmax": None, "beats_capable": False, "beats_rmin": True, "within_1pct_rmax": None}]
    pairs = {(r["baseline"], r["round"]): r for r in study24_report.pair_rows(runs, ["newarm"], [3, 5])}
    cap5 = pairs[("homlora_rmax_capable", 5)]
    assert cap5["at_round"]["diffs"] == [65 - 61] and cap5["early_stopped"]["diffs"] == [60 - 59]
    # equal bytes at round 3: candidate 300 B, capable 1200 B -> budget 300 B; capable at 300 B is 3/4 of the way
    # from round 0 (0 B, 100) to round 1 (400 B, 75): 100 - 0.75 * 25 = 81.25; candidate at 300 B = round 3 = 60
    cap3 = pairs[("homlora_rmax_capable", 3)]
    assert cap3["equal_bytes"]["diffs"] == [pytest.approx(60 - 81.25)] and cap3["equal_bytes"]["wins"] == 1
    # r_min uploads less: budget 150 B = its round 3 (68); the candidate at 150 B: halfway 0 -> 1 of rounds 1 -> 2
    rmin3 = pairs[("homlora_rmin", 3)]
    assert rmin3["equal_bytes"]["diffs"] == [pytest.approx((80 + 70) / 2 - 68)]


def test_within_one_percent_at_round_20_by_hand():
    def run(final: float, val_final: float) -> dict:
        return {"rounds": [{"round": 19, "heldout_ppl": 99.0, "client_val_ppl": 50.0},
                           {"round": 20, "heldout_ppl": final, "client_val_ppl": val_final}]}

    runs = {0: {"c": run(50.4, 10.0), "homlora_rmax": run(50.0, 10.0)},  # 50.4 <= 1.01 * 50 = 50.5
            1: {"c": run(50.6, 10.0), "homlora_rmax": run(50.0, 10.0)},  # 50.6 > 50.5
            2: {"c": run(50.4, 60.0), "homlora_rmax": run(50.0, 10.0)}}  # c early-stops at 19 -> 99.0
    got = [r["within_1pct_rmax"] for r in study24_report.target_rows(runs, ["c"], [20])]
    assert got == [True, False, False]


def test_finished_pieces_are_skipped_and_rates_come_from_the_chosen_table(tmp_path, monkeypatch):
    out, _ = _study(tmp_path)
    chosen = tmp_path / "study.json"
    chosen.write_text(json.dumps({"chosen": {"flexlora_held": {"learning_rate": 0.004},
                                             "homlora_rmin": {"learning_rate": 0.002}}}))
    rates = study24.learning_rates(["newarm", "homlora_rmin", "other"], chosen, {"other": 0.001})
    assert rates["newarm"][0] == 0.004 and "untuned" in rates["newarm"][1]
    assert rates["homlora_rmin"] == (0.002, "chosen on client validation (previous study)")
    assert rates["other"] == (0.001, "--lr")
    calls = []
    monkeypatch.setattr(study24, "run_piece", lambda piece, *a, **k: calls.append(piece))
    done = study24.Piece24("chitchat", "newarm", 0, 5, 0.004)
    more = study24.Piece24("chitchat", "newarm", 0, 10, 0.004)  # extending to more rounds is not done yet
    assert done.done(out) and not more.done(out)
    assert study24.run_all([done, more], out, "cpu", None, 1) == []
    assert calls == [more]


def test_the_report_is_written_from_stored_and_new_runs(tmp_path):
    out, baselines = _study(tmp_path, "raflora")
    report = tmp_path / "report"
    study24.main(["--arms", "raflora", "--corpora", "chitchat", "--seeds", "0",
                  "--out", str(out), "--baselines", str(baselines), "--report-only", "--report", str(report),
                  "--chosen", str(tmp_path / "none.json"), "--lr", "raflora=0.004"])
    text = (report / "report.md").read_text()
    assert "raflora`: 0.004 (--lr)" in text
    assert "| raflora | chitchat | 0 | 5 | 60.00 (client_val) | **no** (59.00) | yes (62.00) | — |" in text
    assert (report / "curves.png").stat().st_size > 0 and (report / "targets.png").stat().st_size > 0
    assert json.loads((report / "report.json").read_text())["learning_rates"]["raflora"][0] == 0.004


def test_docstring_examples_run():
    for module in (study24_report, study24):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0


def test_stored_baselines_on_other_data_are_not_paired(tmp_path):
    """A corpus built from the environment (pycode) changes with it: a stored baseline whose round 0 differs (other
    held-out perplexity or other clients) must not be paired with this study's runs."""
    out, baselines = _study(tmp_path)
    stored = json.loads((baselines / "chitchat" / "metrics.json").read_text())
    other = [dict(r) for r in CAPABLE]
    other[0] = {**other[0], "heldout_ppl": 120.0}  # the base model scored other held-out data
    renamed = [dict(r) for r in RMIN]
    renamed[0] = {**renamed[0], "ranks": {"someone-else": 2}}  # same ppl, clients neither among ours nor holding ours
    stored["metrics"][0]["homlora_rmax_capable"] = {"rounds": other}
    stored["metrics"][0]["homlora_rmin"] = {"rounds": renamed}
    cand = [dict(r) for r in CAND]
    cand[0] = {**cand[0], "ranks": {"a": 2, "b": 16}}
    arm_dir = out / "chitchat" / "newarm" / "s0" / "seed-0" / "newarm"
    (arm_dir / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cand))
    subset = [dict(r) for r in RMAX]
    subset[0] = {**subset[0], "ranks": {"b": 16}}  # capable-only style: a subset of our clients, same data
    stored["metrics"][0]["homlora_rmax"] = {"rounds": subset}
    (baselines / "chitchat" / "metrics.json").write_text(json.dumps(stored))
    dropped: list[str] = []
    runs = study24.load_runs(out, "chitchat", ["newarm"], [0], baselines, rerun=[], dropped=dropped)
    assert set(runs[0]) == {"newarm", "homlora_rmax"}
    assert len(dropped) == 2 and any("120" in d for d in dropped)
    assert study24.same_data((100.0, ()), (100.0 * (1 + 1e-9), ()))
    assert not study24.same_data((100.0, ()), None)
