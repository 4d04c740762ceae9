"""`hetlora coordinate --client-training core`: recorded in federation.json, planned in round.json, refused where the
method cannot take cores, and never changed on a resume."""

from __future__ import annotations

import json

from peft_hetlora.commands.coordinate import main
from tests.coordinator_fakes import init_dir_fixture  # noqa: F401  (the fixture registers by import)


def _args(fed, init_dir, *extra):
    return ["--store", str(fed), "--init-adapter", str(init_dir), "--rounds", "2", "--clients", "a,b,c",
            "--r-min", "1", "--rank-policy", "explicit", "--ranks", "a=1,b=2,c=4", "--no-progress",
            "--log-level", "WARNING", *extra]


def test_cli_records_core_training_and_plans_cores_for_the_clients_below_r_max(tmp_path, init_dir, capsys):
    fed = tmp_path / "fed"
    assert main(_args(fed, init_dir, "--method", "flexlora_held", "--client-training", "core")) == 0
    assert json.loads((fed / "federation.json").read_text())["client_training"] == "core"
    plan = json.loads((fed / "rounds" / "0" / "global" / "round.json").read_text())
    # r_max = 4: the rank-1 and rank-2 clients train cores, the rank-4 client trains factors
    assert set(plan["cores"]) == {"a", "b"}
    assert all(isinstance(r, int) and 1 <= r <= 4 for r in plan["cores"].values())
    capsys.readouterr()
    assert main(["--store", str(fed), "--client-training", "factors", "--no-progress"]) == 2
    assert "client_training" in capsys.readouterr().err


def test_cli_refuses_core_training_for_a_method_that_cannot_take_cores(tmp_path, init_dir, capsys):
    assert main(_args(tmp_path / "fed", init_dir, "--method", "rankwise", "--client-training", "core")) == 2
    err = capsys.readouterr().err
    assert "client_training='core'" in err and "flexlora_held" in err
