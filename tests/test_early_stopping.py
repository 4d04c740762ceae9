"""Early stopping on client validation (issue 24): the round is chosen on client-validation perplexity only, the
held-out value is read at the chosen round. Expected values are worked out by hand from a hand-made metrics file."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from hetlora_bench.seed_stats import early_stopped, early_stopping_markdown, heldout_at, horizon_table

# one seed, two arms; the held-out minimum (round 2 of "a": 30.0) is deliberately NOT where client validation is lowest
METRICS = {
    "seeds": [7],
    "metrics": [
        {
            "a": {"rounds": [
                {"round": 0, "heldout_ppl": 100.0},
                {"round": 1, "heldout_ppl": 50.0, "client_val_ppl": 60.0},
                {"round": 2, "heldout_ppl": 30.0, "client_val_ppl": 55.0},
                {"round": 3, "heldout_ppl": 45.0, "client_val_ppl": 40.0},
                {"round": 4, "heldout_ppl": 47.0, "client_val_ppl": 40.0},  # a tie: the earlier round (3) stays
                {"round": 5, "heldout_ppl": 52.0, "client_val_ppl": 44.0},
            ]},
            "b": {"rounds": [
                {"round": 0, "heldout_ppl": 100.0},
                {"round": 1, "heldout_ppl": 70.0, "client_val_ppl": 80.0},
                {"round": 2, "heldout_ppl": 65.0, "client_val_ppl": None},  # no validation: never chosen
                {"round": 3, "heldout_ppl": 60.0, "client_val_ppl": 81.0},
            ]},
        }
    ],
}


def _load(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(METRICS))
    payload = json.loads(path.read_text())
    return payload["metrics"], payload["seeds"]


def test_the_round_is_chosen_on_client_validation_and_read_on_held_out(tmp_path):
    metrics, seeds = _load(tmp_path)
    a, b = metrics[0]["a"], metrics[0]["b"]
    # horizon 2: rounds 1, 2 -> client-val 60, 55 -> round 2, held-out 30.0
    assert early_stopped(a, 2) == {"round": 2, "client_val_ppl": 55.0, "heldout_ppl": 30.0}
    # horizon 5: lowest client-val is 40.0 at rounds 3 and 4 -> the earlier, round 3, held-out 45.0 (not 30.0)
    assert early_stopped(a, 5) == {"round": 3, "client_val_ppl": 40.0, "heldout_ppl": 45.0}
    # b: round 2 has no client validation; round 1 (80) beats round 3 (81): held-out 70.0, not the later 60.0
    assert early_stopped(b, 3) == {"round": 1, "client_val_ppl": 80.0, "heldout_ppl": 70.0}
    # a horizon the run never reached is not reported; round 0 alone is never a choice
    assert early_stopped(b, 4) is None
    assert early_stopped(a, 0) is None
    assert heldout_at(a, 5) == 52.0 and heldout_at(b, 5) is None

    table = horizon_table(metrics, [2, 5], seeds=seeds)
    assert table["arms"]["a"][7][5] == {"at_round": 52.0,
                                        "early_stopped": {"round": 3, "client_val_ppl": 40.0, "heldout_ppl": 45.0}}
    assert table["arms"]["b"][7][5] == {"at_round": None, "early_stopped": None}
    md = early_stopping_markdown(table).splitlines()
    assert md[2] == "| a | 7 | 30.00 / 30.00 (r2) | 52.00 / 45.00 (r3) |"
    assert md[3] == "| b | 7 | 65.00 / 70.00 (r1) | — |"


@given(st.lists(st.tuples(st.floats(1.0, 1e6), st.floats(1.0, 1e6)), min_size=1, max_size=12),
       st.integers(1, 12))
def test_early_stopping_never_looks_at_held_out(values, horizon):
    """Changing every held-out value leaves the chosen round unchanged; the chosen round has the minimum client-val
    value among rounds <= horizon (by a plain scan)."""
    rows = [{"round": i + 1, "client_val_ppl": v, "heldout_ppl": h} for i, (v, h) in enumerate(values)]
    shuffled = [{**r, "heldout_ppl": 1.0 + 1e6 - r["heldout_ppl"]} for r in rows]
    got, other = early_stopped(rows, horizon), early_stopped(shuffled, horizon)
    if horizon > len(rows):
        assert got is None and other is None
        return
    assert got["round"] == other["round"]
    window = [r["client_val_ppl"] for r in rows if r["round"] <= horizon]
    first_min = 1 + window.index(min(window))
    assert got["round"] == first_min and got["heldout_ppl"] == rows[first_min - 1]["heldout_ppl"]


def test_every_simulate_report_has_the_early_stopped_table(tmp_path):
    from hetlora_bench.report import write_report

    metrics, seeds = _load(tmp_path)
    report = write_report(metrics, tmp_path / "out", seeds=seeds, plots=False)
    assert "[early_stopping.md](early_stopping.md)" in report.read_text()
    lines = (tmp_path / "out" / "early_stopping.md").read_text().splitlines()
    # the runs reach round 5: horizons 3 and 5 (hand-computed: a at 3 -> round 3, client-val 40, held-out 45)
    assert "| a | 7 | 45.00 / 45.00 (r3) | 52.00 / 45.00 (r3) |" in lines
    assert "| b | 7 | 60.00 / 70.00 (r1) | — |" in lines
    payload = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert payload["early_stopping"]["horizons"] == [3, 5]
