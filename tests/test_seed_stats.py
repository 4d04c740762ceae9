"""Multi-seed statistics and `hetlora report`: mean ± std and paired differences against hand computations."""

from __future__ import annotations

import json
import math

import pytest

from hetlora_bench.report import write_report
from hetlora_bench.seed_stats import ReportInputError, merge_run_folders, seed_statistics
from peft_hetlora.cli import main

# final held-out perplexities per seed (0, 1, 2)
REF = [10.0, 12.0, 11.0]
A = [9.0, 12.5, 10.0]
B = [11.0, 13.0, 12.5]


def run_metrics(finals: dict[str, float]) -> dict:
    """One seed's metrics: round 0 at 20, the final value at round 2 (round 1 somewhere between)."""
    return {
        m: {"rounds": [{"round": 0, "heldout_ppl": 20.0, "upload_bytes": 0},
                       {"round": 1, "heldout_ppl": 15.0, "upload_bytes": 10},
                       {"round": 2, "heldout_ppl": v, "upload_bytes": 10}]}
        for m, v in finals.items()
    }


def per_seed(i: int) -> dict:
    return run_metrics({"homlora_rmax": REF[i], "a": A[i], "b": B[i]})


def test_mean_std_and_paired_differences_by_hand():
    stats = seed_statistics([{"homlora_rmax": REF[i], "a": A[i], "b": B[i]} for i in range(3)], seeds=[0, 1, 2])
    assert stats["reference"] == "homlora_rmax"
    a = stats["methods"]["a"]
    assert a["final_ppl"]["mean"] == pytest.approx(10.5)
    assert a["final_ppl"]["std"] == pytest.approx(math.sqrt(((9 - 10.5) ** 2 + 2**2 + 0.5**2) / 2))
    assert a["paired"]["diffs"] == pytest.approx([-1.0, 0.5, -1.0])
    assert a["paired"]["mean"] == pytest.approx(-0.5)
    assert a["paired"]["std"] == pytest.approx(math.sqrt((0.25 + 1.0 + 0.25) / 2))
    assert a["paired"]["wins"] == 2 and a["paired"]["n"] == 3
    b = stats["methods"]["b"]
    assert b["paired"]["diffs"] == pytest.approx([1.0, 1.0, 1.5]) and b["paired"]["wins"] == 0
    # a chosen reference
    other = seed_statistics([{"homlora_rmax": REF[i], "a": A[i]} for i in range(3)], reference="a")
    assert other["methods"]["homlora_rmax"]["paired"]["diffs"] == pytest.approx([1.0, -0.5, 1.0])
    with pytest.raises(ReportInputError, match="not among"):
        seed_statistics([{"a": 1.0}], reference="zzz")


def test_missing_values_are_left_out_of_pairs():
    stats = seed_statistics([{"r": 1.0, "a": 2.0}, {"r": 1.0, "a": float("nan")}, {"r": 3.0}], reference="r")
    assert stats["methods"]["a"]["paired"]["diffs"] == [1.0]
    assert stats["methods"]["a"]["paired"]["seeds"] == [0]
    assert stats["methods"]["a"]["final_ppl"]["n"] == 1


def test_simulation_report_shows_paired_table(tmp_path):
    write_report([per_seed(i) for i in range(3)], tmp_path, seeds=[0, 1, 2])
    text = (tmp_path / "report.md").read_text()
    assert "Paired per seed (reference: homlora_rmax)" in text
    assert "| a | 10.50 ± 1.80 | -0.50 ± 0.87 | 2/3 | 0: -1.00, 1: +0.50, 2: -1.00 |" in text
    payload = json.loads((tmp_path / "metrics.json").read_text())
    assert payload["paired"]["methods"]["b"]["paired"]["mean"] == pytest.approx(7 / 6)
    assert (tmp_path / "paired.png").stat().st_size > 0


def test_merge_run_folders_pools_seeds_of_a_corpus_and_separates_corpora(tmp_path):
    for name, seeds, dataset in (("c01", [0, 1], "chitchat"), ("c2", [2], "chitchat"), ("py", [0, 1, 2], "pycode")):
        folder = tmp_path / name
        write_report([per_seed(i) for i in seeds] if len(seeds) > 1 else per_seed(seeds[0]), folder, seeds=seeds,
                     plots=False)
        (folder / "config.json").write_text(json.dumps({"settings": {"dataset": dataset, "seeds": seeds}}))
    report = merge_run_folders([tmp_path / "c01", tmp_path / "c2", tmp_path / "py"], tmp_path / "merged")
    merged = json.loads((tmp_path / "merged" / "report.json").read_text())
    assert set(merged["corpora"]) == {"chitchat", "pycode"}
    for corpus in ("chitchat", "pycode"):
        a = merged["corpora"][corpus]["methods"]["a"]["paired"]
        assert a["diffs"] == pytest.approx([-1.0, 0.5, -1.0]) and a["wins"] == 2
    text = report.read_text()
    assert "chitchat (n=3)" in text and "10.50 ± 1.80 (Δ -0.50, wins 2/3)" in text
    assert (tmp_path / "merged" / "paired.png").stat().st_size > 0
    with pytest.raises(ReportInputError, match="Seed 0"):
        merge_run_folders([tmp_path / "c01", tmp_path / "c01"], tmp_path / "again")


def test_report_command(tmp_path, capsys):
    write_report([per_seed(i) for i in range(3)], tmp_path / "run", seeds=[0, 1, 2], plots=False)
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--reference", "a"]) == 0
    assert "(reference)" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "m2")]) == 2
    assert "no metrics.json" in capsys.readouterr().err
