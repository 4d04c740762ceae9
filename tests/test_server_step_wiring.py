"""The server step's settings travel (issue 24): the CLI, federation.json (a resumed coordinator may not change
them), the simulator's arms and its --config hyper-parameters."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hetlora_bench.arm_setup import arm_coordinator_settings
from hetlora_bench.arms import _RESULT_NEUTRAL, ARMS, SimulationConfig
from peft_hetlora.commands.coordinate import main
from peft_hetlora.federated.round import SERVER_OPTIMIZERS
from peft_hetlora.federated.stores import LocalStore
from peft_hetlora.utils.constants import SERVER_STATE_FILE
from tests.coordinator_fakes import FakeClients, init_dir_fixture  # noqa: F401  (the fixture registers by import)


def test_cli_records_the_server_step_runs_it_and_refuses_to_change_it(tmp_path, init_dir, capsys):
    fed = tmp_path / "fed"
    args = ["--store", str(fed), "--init-adapter", str(init_dir), "--rounds", "2", "--clients", "a,b,c",
            "--r-min", "1", "--rank-policy", "explicit", "--ranks", "a=1,b=2,c=4", "--no-progress",
            "--method", "flexlora_held", "--server-optimizer", "fedadam:lr=0.02", "--error-feedback",
            "--log-level", "WARNING"]
    assert main(args) == 0
    record = json.loads((fed / "federation.json").read_text())
    assert record["server_optimizer"] == {"name": "fedadam", "lr": 0.02, "beta1": 0.9, "beta2": 0.99, "tau": 0.001}
    assert record["error_feedback"] is True
    store = LocalStore(fed)
    clients = FakeClients(store, tmp_path / "work")
    clients.upload_open_round()
    assert main(["--store", str(fed), "--no-progress"]) == 0  # resumed: the server step from federation.json
    folder = Path(store.get_global(1).path)
    assert (folder / SERVER_STATE_FILE).is_file()
    assert store.read_summary(0)["server_step"]["optimizer"]["name"] == "fedadam"
    capsys.readouterr()
    assert main(["--store", str(fed), "--server-optimizer", "fedavgm", "--no-progress"]) == 2
    assert "server_optimizer" in capsys.readouterr().err
    assert main(["--store", str(fed), "--no-error-feedback", "--no-progress"]) == 2
    assert "error_feedback" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["adam", "fedavgm:lr=nan", "fedadam:beta2=-1", "fedavgm:momentum", "fedavgm:x=1"])
def test_cli_refuses_a_bad_server_optimizer_with_the_reason(tmp_path, text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--store", str(tmp_path / "fed"), "--server-optimizer", text])
    assert exit_info.value.code == 2 and "server_optimizer" in capsys.readouterr().err


def test_every_server_step_arm_gets_its_optimizer_and_the_config_sets_its_hyper_parameters(tmp_path):
    config_file = tmp_path / "sim.yaml"
    config_file.write_text("server_optimizers:\n  fedavgm: {lr: 0.5, momentum: 0.8}\n")
    config = SimulationConfig.from_sources(profile="quick", config_file=config_file)
    ranks = {"a": 2, "b": 8}
    arms = [arm for arm, spec in ARMS.items() if "server_optimizer" in spec or "error_feedback" in spec]
    assert {"flexlora_held_fedavgm", "flexlora_held_fedadam", "flexlora_held_ef", "homlora_rmin_fedavgm",
            "homlora_rmax_fedavgm", "homlora_rmax_capable_fedavgm"} <= set(arms)
    for arm in arms:
        spec = ARMS[arm]
        settings = arm_coordinator_settings(config, arm, 8, ranks, 0)
        if "server_optimizer" not in spec:
            assert settings.server_optimizer is None and settings.error_feedback is True
            continue
        want = {"name": spec["server_optimizer"], **SERVER_OPTIMIZERS[spec["server_optimizer"]]}
        if spec["server_optimizer"] == "fedavgm":
            want.update(lr=0.5, momentum=0.8)
        assert dict(settings.server_optimizer) == want, arm
        # the same arm without the server step is the baseline it is compared with
        base = arm.removesuffix("_ef").removesuffix(f"_{spec['server_optimizer']}")
        assert ARMS[base]["aggregation"] == spec["aggregation"] and ARMS[base]["ranks"] == spec["ranks"]


def test_bad_simulator_hyper_parameters_are_refused_before_a_run():
    with pytest.raises(ValueError, match="server_optimizer"):
        SimulationConfig.from_sources(profile="quick", overrides={"server_optimizers": {"fedavgm": {"lr": -1}}})
    with pytest.raises(ValueError, match="server_optimizer"):
        SimulationConfig.from_sources(profile="quick", overrides={"server_optimizers": {"sgd": {}}})


def test_an_unset_server_optimizers_keeps_the_fingerprints_of_earlier_runs():
    # the fingerprint as it was computed before the field existed (a run folder of an earlier version resumes)
    config = SimulationConfig.from_sources(profile="quick")
    earlier = {k: v for k, v in config.to_dict().items() if k not in _RESULT_NEUTRAL and k != "server_optimizers"}
    digest = hashlib.sha256(json.dumps(earlier, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert config.fingerprint() == digest
    tuned = SimulationConfig.from_sources(profile="quick", overrides={"server_optimizers": {"fedavgm": {"lr": 0.5}}})
    assert tuned.fingerprint() != config.fingerprint()
