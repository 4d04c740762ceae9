"""The main job's overall progress (arm k of N, ETA), its CPU time, and plots that tell every method apart."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from hetlora_bench.arms import DEFAULT_METHODS
from hetlora_bench.figures import new_figure
from hetlora_bench.report import _legend_below, method_styles, write_report
from hetlora_bench.runner import RunProgress, cpu_seconds, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_counts_arms_and_projects_the_rounds_left_from_this_invocations_rounds():
    clock, out = FakeClock(), io.StringIO()
    progress = RunProgress(arms=3, rounds_per_arm=4, stream=out, clock=clock)
    clock.now = 30.0  # data and model preparation: in the elapsed time, not in the per-round mean
    progress.start_arm("rankwise (seed 0)", done_rounds=2)  # a killed run had finished 2 rounds of this arm
    assert progress.eta_s() is None
    for _ in range(2):
        clock.now += 10.0
        progress.round_done()
    # 12 rounds in all, 2 resumed, 2 trained in 20 s: 8 left at 10 s each
    assert progress.eta_s() == 80.0
    assert progress.status() == "arm 1 of 3, elapsed 50s, ETA 1m20s"
    progress.start_arm("hetlora (seed 0)")
    lines = out.getvalue().splitlines()
    assert lines == [
        "hetlora simulate: rankwise (seed 0): arm 1 of 3, elapsed 30s, ETA after the first round",
        "hetlora simulate: hetlora (seed 0): arm 2 of 3, elapsed 50s, ETA 1m20s",
    ]


@settings(max_examples=50, deadline=None)
@given(
    arms=st.integers(1, 30), rounds=st.integers(1, 50), data=st.data(),
    seconds=st.floats(0.01, 1e4, allow_nan=False, allow_infinity=False),
)
def test_eta_is_the_mean_round_time_times_the_rounds_left(arms, rounds, data, seconds):
    total = arms * rounds
    resumed = data.draw(st.integers(0, total - 1))
    trained = data.draw(st.integers(1, total - resumed))
    clock = FakeClock()
    progress = RunProgress(arms=arms, rounds_per_arm=rounds, stream=io.StringIO(), clock=clock)
    progress.start_arm("arm", done_rounds=resumed)
    for _ in range(trained):
        progress.round_done()
    clock.now = seconds
    left = total - resumed - trained
    assert abs(progress.eta_s() - seconds / trained * left) <= 1e-9 * max(1.0, seconds * left)


def test_format_duration_by_hand():
    assert [format_duration(s) for s in (0, 59.4, 60, 3599, 3600, 4500)] == ["0s", "59s", "1m00s", "59m59s",
                                                                                "1h00m", "1h15m"]


def test_cpu_seconds_include_finished_children():
    before = cpu_seconds()
    child = subprocess.run(
        [sys.executable, "-c", "import time\nwhile time.process_time() < 0.3: pass\nprint(time.process_time())"],
        capture_output=True, text=True, check=True,
    )
    assert cpu_seconds() - before >= 0.9 * float(child.stdout)


def test_every_method_of_the_main_job_has_its_own_colour_and_line_style():
    styles = method_styles(DEFAULT_METHODS)
    assert len(DEFAULT_METHODS) >= 11
    assert len({s["color"] for s in styles.values()}) == len(DEFAULT_METHODS)
    assert styles["centralized"]["color"] != styles["flexlora_held"]["color"]
    many = method_styles([f"m{i}" for i in range(52)])
    assert len({(s["color"], s["linestyle"]) for s in many.values()}) == 52


def test_the_legend_sits_below_the_axes_not_over_the_data():
    fig, axes = new_figure(ncols=2)
    styles = method_styles(DEFAULT_METHODS)
    for ax in axes[0]:
        for i, method in enumerate(DEFAULT_METHODS):
            ax.plot([0, 1, 2], [100 - i, 90 - i, 80 - i], label=method, **styles[method])
    _legend_below(fig, axes[0], ncols=6)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert len(legend.get_texts()) == len(DEFAULT_METHODS)  # each method once, though two axes drew it
    for ax in axes[0]:
        assert box.y1 <= ax.get_window_extent(renderer).y0  # wholly below every axes


def test_metrics_json_and_report_state_the_runs_cost(tmp_path):
    metrics = {
        "hetlora": {"rounds": [{"round": 0, "heldout_ppl": 100.0, "upload_bytes": 0, "ranks": {"a": 4, "b": 8}},
                               {"round": 1, "heldout_ppl": 90.0, "upload_bytes": 10, "ranks": {"a": 3, "b": 8}}]},
    }
    resources = {"wall_s": 120.0, "cpu_s": 200.0, "cpu_count": 2, "torch_threads": 2}
    path = write_report(metrics, tmp_path, resources=resources, plots=True)
    assert json.loads((tmp_path / "metrics.json").read_text())["resources"] == resources
    assert (tmp_path / "ranks.png").is_file() and path.is_file()
