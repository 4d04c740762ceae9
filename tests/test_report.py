"""Simulation report: table numbers, target / equal-upload logic, seeds, files and plots."""

import json
import math

import numpy as np
import pytest

from hetlora_bench.report import (
    default_target_method,
    format_bytes,
    homogeneous_rank,
    ppl_at_upload,
    summarize,
    write_report,
)

MB = 1_000_000


def method_rounds(ppls, upload_per_round, ranks_per_round, start_ppl=64.0, val_offset=-2.0):
    rounds = [{"round": 0, "heldout_ppl": start_ppl, "upload_bytes": 0, "download_bytes": 0, "cum_upload_bytes": 0,
               "ranks": {}, "wall_s": 0.0}]
    cum = 0
    for t, (ppl, up, ranks) in enumerate(zip(ppls, upload_per_round, ranks_per_round), start=1):
        cum += up
        rounds.append({
            "round": t,
            "heldout_ppl": ppl,
            "client_val_ppl": ppl + val_offset,
            "upload_bytes": up,
            "download_bytes": 2 * up,
            "cum_upload_bytes": cum,
            "ranks": ranks,
            "wall_s": 10.0,
        })
    return {"rounds": rounds}


def example_metrics(shift=0.0):
    return {
        "homlora_r16": {**method_rounds([60 + shift, 57 + shift, 55 + shift], [8 * MB] * 3,
                                        [{"a": 16, "b": 16}] * 3), "label": "HomLoRA r=16"},
        "hetlora": {**method_rounds([62 + shift, 60 + shift, 59 + shift], [4 * MB] * 3,
                                    [{"a": 16, "b": 4}, {"a": 12, "b": 3}, {"a": 11, "b": 2}]), "label": "HetLoRA"},
        "homlora_r2": {**method_rounds([63 + shift, 61.5 + shift, 60.5 + shift], [1 * MB] * 3,
                                       [{"a": 2, "b": 2}] * 3), "label": "HomLoRA r=2"},
    }


def test_homogeneous_detection_and_default_target():
    metrics = example_metrics()
    assert homogeneous_rank(metrics["homlora_r16"]) == 16
    assert homogeneous_rank(metrics["hetlora"]) is None
    assert default_target_method(metrics) == "homlora_r2"
    assert default_target_method({**metrics, "hetlora": {**metrics["hetlora"], "reference": True}}) == "hetlora"
    assert homogeneous_rank({"homogeneous_rank": 4, "rounds": []}) == 4


def test_summary_numbers():
    summary = summarize(example_metrics())
    assert summary["target_method"] == "homlora_r2" and summary["target_ppl"] == 60.5
    assert summary["equal_upload_bytes"] == 3 * MB  # the smallest total upload among the methods
    hom16, het, hom2 = (summary["methods"][m] for m in ["homlora_r16", "hetlora", "homlora_r2"])
    assert hom16["final_ppl"] == 55 and hom16["best_round"] == 3 and hom16["total_upload_bytes"] == 24 * MB
    assert hom16["rounds_to_target"] == 1 and hom16["upload_to_target"] == 8 * MB  # 60 <= 60.5 at round 1
    assert het["rounds_to_target"] == 2 and het["upload_to_target"] == 8 * MB
    assert hom2["rounds_to_target"] == 3
    # equal upload (3 MB): hom16 between round 0 (0 B, 64) and round 1 (8 MB, 60): 64 - 4 * 3/8 = 62.5
    assert hom16["ppl_at_equal_upload"] == pytest.approx(62.5)
    assert het["ppl_at_equal_upload"] == pytest.approx(64 - 2 * 3 / 4)
    assert hom2["ppl_at_equal_upload"] == pytest.approx(60.5)
    assert het["final_rank_mean"] == 6.5 and (het["final_rank_min"], het["final_rank_max"]) == (2, 11)
    assert het["final_client_val_ppl"] == 57 and het["wall_s"] == 30.0
    assert het["total_download_bytes"] == 24 * MB
    given = summarize(example_metrics(), target_ppl=58.0)
    assert given["target_method"] is None and given["methods"]["hetlora"]["rounds_to_target"] is None
    assert given["methods"]["homlora_r16"]["rounds_to_target"] == 2


def test_ppl_at_upload_interpolates_without_extrapolating():
    rounds = [{"heldout_ppl": 10.0, "cum_upload_bytes": 100}, {"heldout_ppl": 6.0, "cum_upload_bytes": 300}]
    assert ppl_at_upload(rounds, 200) == pytest.approx(8.0)
    assert math.isnan(ppl_at_upload(rounds, 50)) and math.isnan(ppl_at_upload(rounds, 301))
    # cumulative bytes derived from upload_bytes when absent
    derived = summarize({"m": {"rounds": [{"round": 1, "heldout_ppl": 5.0, "upload_bytes": 7},
                                          {"round": 2, "heldout_ppl": 4.0, "upload_bytes": 5}]}})
    assert derived["methods"]["m"]["total_upload_bytes"] == 12


def table_rows(report_text: str) -> dict[str, list[str]]:
    rows = {}
    for line in report_text.splitlines():
        if line.startswith("| ") and not line.startswith("| Method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_write_report_single_seed(tmp_path):
    path = write_report(example_metrics(), tmp_path / "out", notes="Config: quick profile.")
    out = path.parent
    assert path.name == "report.md"
    for name in ["metrics.json", "ppl_vs_round.png", "ppl_vs_upload.png", "ranks.png"]:
        assert (out / name).stat().st_size > 1000 or name == "metrics.json"
    assert (out / "ppl_vs_round.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = path.read_text()
    assert "Rounds to ppl ≤ 60.50" in text and "Ppl at 3.00 MB uploaded" in text and "Config: quick profile." in text
    rows = table_rows(text)
    assert set(rows) == {"HomLoRA r=16", "HetLoRA", "HomLoRA r=2 (target)"}
    het = rows["HetLoRA"]
    assert het[1:8] == ["59.00", "59.00", "3", "2", "8.00 MB", "12.0 MB", "62.50"]
    assert het[8] == "57.00" and het[9] == "6.50 [2–11]" and het[10] == "30"
    assert rows["HomLoRA r=16"][6] == "24.0 MB" and rows["HomLoRA r=16"][7] == "62.50"
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["summary"]["methods"]["hetlora"]["final_ppl"] == 59.0
    assert payload["metrics"]["hetlora"]["rounds"][1]["ranks"] == {"a": 16, "b": 4}
    assert payload["target_method"] == "homlora_r2"


def test_write_report_seeds_mean_std(tmp_path):
    seeds = [example_metrics(0.0), example_metrics(2.0)]
    path = write_report(seeds, tmp_path, seeds=[11, 12])
    rows = table_rows(path.read_text())
    expected_std = np.std([59.0, 61.0], ddof=1)
    assert rows["HetLoRA"][1] == f"60.00 ± {expected_std:.2f}"
    assert "2 seeds (11, 12)" in path.read_text()
    payload = json.loads((tmp_path / "metrics.json").read_text())
    agg = payload["aggregate"]["hetlora"]["final_ppl"]
    assert agg["mean"] == pytest.approx(60.0) and agg["std"] == pytest.approx(expected_std) and agg["n"] == 2
    assert payload["seeds"] == [11, 12] and len(payload["summaries"]) == 2


def test_homogeneous_only_has_no_rank_plot_and_handles_missing_values(tmp_path):
    metrics = {"fedavg": {"rounds": [{"round": 1, "heldout_ppl": None, "upload_bytes": 5, "ranks": {"a": 4}},
                                     {"round": 2, "heldout_ppl": 30.0, "upload_bytes": 5, "ranks": {"a": 4}}]}}
    path = write_report(metrics, tmp_path)
    assert not (tmp_path / "ranks.png").exists()
    row = table_rows(path.read_text())["fedavg (target)"]
    assert row[1] == "30.00" and row[8] == "—"
    assert format_bytes(float("nan")) == "—" and format_bytes(1_234_567) == "1.23 MB"
    with pytest.raises(ValueError, match="No metrics"):
        write_report([], tmp_path)


def read_metrics(path):
    """The input metrics stored in a `metrics.json` written by `write_report` (a folder or the file)."""
    file = path / "metrics.json" if path.is_dir() else path
    return json.loads(file.read_text(encoding="utf-8"))["metrics"]


def test_read_metrics_roundtrip(tmp_path):
    write_report(example_metrics(), tmp_path / "s0", plots=False)
    write_report(example_metrics(1.0), tmp_path / "s1", plots=False)
    runs = [read_metrics(tmp_path / "s0"), read_metrics(tmp_path / "s1" / "metrics.json")]
    assert runs[0] == json.loads(json.dumps(example_metrics()))
    path = write_report(runs, tmp_path / "all", plots=False)
    assert table_rows(path.read_text())["HetLoRA"][1] == f"59.50 ± {np.std([59.0, 60.0], ddof=1):.2f}"
    assert not (tmp_path / "all" / "ppl_vs_round.png").exists()
