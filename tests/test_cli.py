"""The `hetlora` command line: lazy imports, one-line errors, init, export."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_hetlora
from peft_hetlora.cli import main
from tests.tiny_models import randomize_adapter, tiny_llama, token_batch


def test_export_command_writes_a_plain_lora_with_the_same_outputs(tmp_path, capsys):
    model = get_peft_model(
        tiny_llama(), peft_hetlora.HetLoRAConfig(r=8, rank=5, lora_alpha=16, target_modules=["q_proj"])
    )
    randomize_adapter(model)
    model.set_rank(3)
    model.save_pretrained(str(tmp_path / "het"))
    ids = token_batch()
    expected = model(input_ids=ids).logits

    assert main(["export", str(tmp_path / "het"), str(tmp_path / "lora")]) == 0
    assert "Plain LoRA adapter written" in capsys.readouterr().out
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == pytest.approx(16 / 8 * 3)
    plain = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "lora"))
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_command_explains_a_missing_adapter(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "save_pretrained" in capsys.readouterr().err


def test_simulate_rejects_unknown_profile():
    with pytest.raises(SystemExit):
        main(["simulate", "--profile", "huge"])


# ----------------------------------------------------------------------------- lazy imports, one-line errors
def test_help_imports_neither_torch_nor_transformers_nor_peft():
    script = (
        "import sys, contextlib, io\n"
        "from peft_hetlora.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0\n"
        "assert 'init' in out.getvalue() and 'coordinate' in out.getvalue()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'flwr') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "import peft_hetlora\n"
        "assert 'peft' not in sys.modules\n"
        "from peft import PeftType\n"  # importing PEFT afterwards still registers HETLORA
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HETLORA].__name__ == 'HetLoRAConfig'\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture
def full_disk(monkeypatch):
    """export_lora's writer fails as on a full disk."""
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "out/adapter_model.safetensors")

    monkeypatch.setattr("peft_hetlora.export.save_file", no_space)


def _saved_adapter(folder):
    model = get_peft_model(tiny_llama(), peft_hetlora.HetLoRAConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(str(folder))
    return folder


def test_full_disk_is_one_line_and_a_non_zero_exit(tmp_path, capsys, full_disk, monkeypatch):
    monkeypatch.delenv("HETLORA_DEBUG", raising=False)
    adapter = _saved_adapter(tmp_path / "het")
    assert main(["export", str(adapter), str(tmp_path / "lora")]) == 1  # a runtime failure: rerun after freeing
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("hetlora: error: export: no space left on device while writing out/adapter_model")
    assert "free some space" in err
    with pytest.raises(OSError):  # --debug shows the traceback
        main(["--debug", "export", str(adapter), str(tmp_path / "lora")])
    monkeypatch.setenv("HETLORA_DEBUG", "1")
    with pytest.raises(OSError):
        main(["export", str(adapter), str(tmp_path / "lora")])


def test_project_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from peft_hetlora.utils.errors import ConfigMismatchError

    monkeypatch.delenv("HETLORA_DEBUG", raising=False)

    def mismatch(*args, **kwargs):
        raise ConfigMismatchError("lora_alpha: this client has 8.0\nbut the federation has 32.0")

    monkeypatch.setattr("peft_hetlora.export.export_lora", mismatch)
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == "hetlora: error: export: lora_alpha: this client has 8.0 but the federation has 32.0\n"
    # a missing store through `coordinate` says how to create one
    assert main(["coordinate", "--store", str(tmp_path / "nothing"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetlora: error: coordinate: ") and "hetlora init" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- hetlora init
@pytest.fixture
def base_dir(tmp_path):
    folder = tmp_path / "base"
    tiny_llama().save_pretrained(folder)
    return folder


def _init(store, base, *extra):
    return main(["init", "--store", str(store), "--base-model", str(base), "--r-max", "8", "--r-min", "2",
                 "--lora-alpha", "16", "--target-modules", "q_proj,v_proj", "--layers", "1",
                 "--clients", "alice,bob", "--rounds", "2", *extra])


def test_init_creates_a_ready_federation(tmp_path, base_dir, capsys):
    from safetensors.torch import load_file

    from peft_hetlora.federated import LocalStore

    fed = tmp_path / "fed"
    assert _init(fed, base_dir) == 0
    assert "Federation ready" in capsys.readouterr().out
    store = LocalStore(fed)
    federation = store.read_federation()
    assert (federation["r_max"], federation["r_min"], federation["rounds"]) == (8, 2, 2)
    assert federation["clients"] == ["alice", "bob"]
    config = federation["adapter_config"]
    assert config["peft_type"] == "HETLORA" and config["lora_alpha"] == 16 and config["layers_to_transform"] == [1]
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(base_dir) and config["task_type"] == "CAUSAL_LM"
    ranks = federation["initial_ranks"]
    assert set(ranks) == {"alice", "bob"} and all(2 <= r <= 8 for r in ranks.values())
    weights = load_file(str(store.latest_global().path / "adapter_model.safetensors"))
    a_keys = sorted(k for k in weights if k.endswith("lora_A.weight"))
    assert len(a_keys) == 2 and all(".layers.1." in k for k in a_keys)  # q and v of layer 1 only
    for key in a_keys:  # LoRA's start: A random at rank r_max, B zero (the global's delta W is 0)
        b = weights[key.replace("lora_A", "lora_B")]
        assert weights[key].shape[0] == 8 and weights[key].abs().sum() > 0 and b.shape[1] == 8 and not b.any()
    # the same command again is a no-op; other adapter settings are refused
    assert _init(fed, base_dir) == 0
    capsys.readouterr()
    assert main(["init", "--store", str(fed), "--base-model", str(base_dir), "--r-max", "4",
                 "--clients", "alice,bob"]) != 0
    assert capsys.readouterr().err.startswith("hetlora: error:")


def test_init_with_component_selection_and_a_measured_memory_budget(tmp_path, base_dir, capsys):
    import json

    from peft_hetlora.federated import LocalStore

    fed = tmp_path / "fed"
    assert _init(fed, base_dir, "--method", "component", "--component-selection", "coverage", "--anchor", "1",
                 "--rank-policy", "budget", "--budgets", "alice=2GB,bob=4GB", "--memory-model", "smollm2-135m",
                 "--memory-quantize", "8bit") == 0
    store = LocalStore(fed)
    federation = store.read_federation()
    assert federation["component_selection"] == "coverage" and federation["anchor"] == 1
    assert federation["rank_policy"]["memory_model"] == "smollm2-135m"
    assert federation["initial_ranks"]["bob"] == 8  # 4 GB fits every rank of the 8-bit table
    info = json.loads((store.latest_global().path / "round.json").read_text())
    assert all(w[0] == 0 for w in info["components"].values())  # the anchor is in every window
    capsys.readouterr()
    # a window policy with a prefix-only method is refused in one line
    assert _init(tmp_path / "fed2", base_dir, "--method", "fedavg", "--component-selection", "rolling") != 0
    assert "cannot aggregate" in capsys.readouterr().err
    # resuming with another selection is refused
    assert main(["coordinate", "--store", str(fed), "--component-selection", "rolling", "--no-progress"]) != 0
    assert "component_selection" in capsys.readouterr().err


def test_init_restricts_upload_formats(tmp_path, base_dir, capsys):
    from peft_hetlora.federated import LocalStore

    fed = tmp_path / "fed"
    assert _init(fed, base_dir, "--message-formats", "bf16,int8-block64") == 0
    assert LocalStore(fed).read_federation()["message_formats"] == ["bf16", "int8-block64"]
    capsys.readouterr()
    assert _init(tmp_path / "fed2", base_dir, "--message-formats", "fp8") != 0
    assert "fp8" in capsys.readouterr().err


def test_init_needs_clients_and_a_model(tmp_path, base_dir, capsys):
    assert main(["init", "--store", str(tmp_path / "f"), "--base-model", str(base_dir)]) == 2
    assert "--clients" in capsys.readouterr().err
    assert main(["init", "--store", str(tmp_path / "f"), "--base-model", str(tmp_path / "nope"),
                 "--clients", "a"]) == 2
    assert "neither a built-in model" in capsys.readouterr().err


def test_init_on_a_hub_store(hub_double, tmp_path, base_dir, capsys):
    from peft_hetlora.federated.stores import HubStore

    hub = ["--hub-endpoint", hub_double.endpoint, "--hub-token", hub_double.token]
    assert _init("hf://hetlora/init-fed", base_dir, *hub) == 0
    store = HubStore("hetlora/init-fed", endpoint=hub_double.endpoint, token=hub_double.token,
                     cache_dir=tmp_path / "c")
    assert store.read_federation()["r_max"] == 8 and store.latest_global().round == 0


@pytest.mark.parametrize(
    "imports",
    [
        "import peft_hetlora.config",  # a submodule that pulls PEFT in while the package is mid-import
        "import peft; import peft_hetlora",  # PEFT first: registers at once
        "import peft_hetlora.federated; from peft import PeftModel",  # PEFT imported later by the user
    ],
)
def test_any_import_order_registers_hetlora_with_peft(imports):
    script = (
        f"{imports}\n"
        "import sys\n"
        "from peft import PeftType\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING\n"
        "assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HETLORA].__name__ == 'HetLoRAConfig'\n"
        "assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HETLORA].__name__ == 'HetLoRAModel'\n"
        "assert not [f for f in sys.meta_path if 'RegisterAfter' in type(f).__name__], 'hook left installed'\n"
        "assert type(sys.modules['peft'].__loader__).__name__ != '_RegisterAfterLoad'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- one exit status per kind of error
def _raise(err):
    def runner(args):
        raise err
    return runner


def _store_full():
    from peft_hetlora.utils.errors import StoreFullError

    err = StoreFullError("The disk of store runs/fed is full while writing rounds/3: free some space there and run "
                         "the same command again to resume.")
    err.errno = errno.ENOSPC
    return err


def _kinds():
    from peft_hetlora.utils.errors import (
        ConfigMismatchError,
        CoordinatorError,
        FederationMismatch,
        RankError,
        StoreError,
    )

    usage = [ValueError("bad"), RankError("rank 9 > r_max"), ConfigMismatchError("lora_alpha differs"),
             FederationMismatch("another federation"), FileNotFoundError("no such adapter"), KeyError("x")]
    failure = [StoreError("store broken"), _store_full(), OSError(errno.ENOSPC, "No space left on device", "f"),
               CoordinatorError("impossible round"), ModuleNotFoundError("no gguf"), RuntimeError("boom"),
               ConnectionRefusedError(111, "Connection refused")]
    return [(err, 2) for err in usage] + [(err, 1) for err in failure]


@pytest.mark.parametrize("err,status", _kinds(), ids=lambda v: type(v).__name__ if isinstance(v, BaseException)
                         else str(v))
def test_each_kind_of_error_has_one_exit_status_from_every_layer(err, status, tmp_path, capsys, monkeypatch):
    """2: change the command (usage, settings, input); 1: the command could not finish (network, disk, store)."""
    from peft_hetlora.commands import coordinate

    monkeypatch.delenv("HETLORA_DEBUG", raising=False)
    monkeypatch.setattr("peft_hetlora.commands.export.run", _raise(err))
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == status
    assert capsys.readouterr().err.startswith("hetlora: error: export: ")
    # `python -m peft_hetlora.commands.coordinate` (the second layer) answers the same
    monkeypatch.setattr(coordinate, "build_coordinator", _raise(err))
    assert coordinate.main(["--store", str(tmp_path)]) == status
    assert main(["coordinate", "--store", str(tmp_path)]) == status
    assert capsys.readouterr().err.count("\n") == 2


def test_interrupt_and_bad_command_line_statuses(tmp_path, capsys, monkeypatch):
    from peft_hetlora.cli import EXIT_STATUS

    monkeypatch.setattr("peft_hetlora.commands.export.run", _raise(KeyboardInterrupt()))
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 130
    with pytest.raises(SystemExit) as usage:  # argparse's own usage error
        main(["coordinate", "--no-such-option"])
    assert usage.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert sorted(EXIT_STATUS) == [0, 1, 2, 130]
    for code in EXIT_STATUS:
        assert f"\n  {code:<4}" in help_text, code


def test_store_full_prints_the_stores_own_sentence(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HETLORA_DEBUG", raising=False)
    monkeypatch.setattr("peft_hetlora.commands.coordinate.build_coordinator", _raise(_store_full()))
    assert main(["coordinate", "--store", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == f"hetlora: error: coordinate: {_store_full()}\n"
    assert "no space left on device" not in err


# ----------------------------------------------------------------------------- network failures are one line
@pytest.fixture
def refused_endpoint():
    """A loopback port that refuses connections (bound, not listening): the Hub, unreachable."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_an_unreachable_hub_is_one_line_naming_the_store(refused_endpoint, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HETLORA_DEBUG", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert main(["coordinate", "--store", "hf://org/fed", "--hub-endpoint", refused_endpoint,
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"hetlora: error: coordinate: cannot reach the Hub at {refused_endpoint} for store "
                          "hf://org/fed")
    assert "check the network" in err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["coordinate", "--store", "hf://org/fed", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offline mode is on" in err and "hf://org/fed" in err


def test_an_unreachable_hub_from_the_environment_is_one_line(refused_endpoint, tmp_path):
    """As a user runs it: HF_ENDPOINT in the environment, a fresh process, the installed entry point's main."""
    env = {**os.environ, "HF_ENDPOINT": refused_endpoint, "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for name in ("HF_HUB_OFFLINE", "HETLORA_DEBUG"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "peft_hetlora.cli", "coordinate", "--store", "hf://org/name",
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert f"cannot reach the Hub at {refused_endpoint} for store hf://org/name" in proc.stderr


# ----------------------------------------------------------------------------- logging, configured once
@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("", "peft_hetlora.federated.coordinator")}
    yield
    root.setLevel(levels[""])
    logging.getLogger("peft_hetlora.federated.coordinator").setLevel(levels["peft_hetlora.federated.coordinator"])


_COMMAND_ARGS = {
    "init": ["--store", "s", "--base-model", "m", "--clients", "a"],
    "coordinate": ["--store", "s"],
    "simulate": ["--profile", "quick"],
    "export": ["a", "b"],
    "report": ["r"],
}


@pytest.mark.parametrize("command", sorted(_COMMAND_ARGS))
def test_log_level_and_verbose_work_under_every_subcommand(command, monkeypatch, restore_logging):
    from peft_hetlora.cli import BENCH_COMMANDS, COMMANDS

    module, _, runner, _ = COMMANDS[command]
    package = "hetlora_bench.commands" if command in BENCH_COMMANDS else "peft_hetlora.commands"
    seen = []

    def record(args):
        seen.append((logging.getLogger().level,
                     logging.getLogger("peft_hetlora.federated.coordinator").getEffectiveLevel()))
        return 0

    monkeypatch.setattr(f"{package}.{module}.{runner}", record)
    rest = _COMMAND_ARGS[command]
    for argv, root_level, coordinator_level in [
        ([command, *rest], logging.WARNING, logging.INFO),  # default: warnings, plus the round lines
        ([command, *rest, "--log-level", "error"], logging.ERROR, logging.ERROR),  # explicit: every logger
        ([command, *rest, "--log-level", "DEBUG"], logging.DEBUG, logging.DEBUG),
        (["--log-level", "WARNING", command, *rest], logging.WARNING, logging.WARNING),
        ([command, *rest, "-v"], logging.INFO, logging.INFO),
        (["-vv", command, *rest], logging.DEBUG, logging.DEBUG),
    ]:
        assert main(argv) == 0
        assert seen.pop() == (root_level, coordinator_level), argv


def test_coordinate_log_level_takes_effect_in_a_fresh_process(tmp_path):
    """`hetlora coordinate --log-level WARNING` hides the coordinator's INFO lines (it had no effect before)."""
    adapter = _saved_adapter(tmp_path / "het")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    lines = {}
    for level in ("INFO", "WARNING"):
        proc = subprocess.run([sys.executable, "-m", "peft_hetlora.cli", "coordinate", "--store",
                               str(tmp_path / f"fed-{level}"), "--init-adapter", str(adapter), "--clients", "a,b",
                               "--no-progress", "--log-level", level],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines[level] = [line for line in proc.stderr.splitlines() if " INFO " in line]
    assert any("Created federation" in line for line in lines["INFO"])
    assert lines["WARNING"] == []


# ----------------------------------------------------------------------------- no noise that looks like an error
NOISE = ("is_gradient_checkpointing", "Unable to fetch remote file", "base_model_name_or_path` was renamed",
         "gemm_4bit_forward", "Enum subclass", "Traceback")

_CLIENT = """
import sys
import peft_hetlora
from transformers import AutoModelForCausalLM
from transformers.utils import logging as transformers_logging
from peft_hetlora.federated import LocalStore
transformers_logging.disable_progress_bar()
model = peft_hetlora.get_federated_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), LocalStore(sys.argv[2]),
                                         max_rank=2)
assert model.get_rank() == 2
print("CLIENT OK")
"""


def test_init_export_and_a_model_load_print_no_noise(tmp_path, refused_endpoint):
    """The notices of issue 26 item 6, offline (the Hub unreachable, HF_HUB_OFFLINE unset) as a user meets them.

    (Loading the export with `AutoPeftModelForCausalLM` is PEFT's own call, so transformers' FutureWarning is
    PEFT's to fix there; that it needs no Hub lookup is tested in test_base_identity.py.)"""
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_ENDPOINT": refused_endpoint,
           "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HF_HUB_OFFLINE", None)
    cli = [sys.executable, "-m", "peft_hetlora.cli"]
    runs = [
        # a Hub-style name for the base: PEFT would ask the Hub about its vocabulary on save
        [*cli, "init", "--store", "fed", "--base-model", str(base), "--base-model-id", "my-org/my-base",
         "--r-max", "4", "--target-modules", "q_proj,v_proj", "--clients", "a,b"],
        [*cli, "export", "fed", "lora", "--base-model-name-or-path", str(base)],
        [sys.executable, "-c", _CLIENT, str(base), "fed"],
    ]
    for command in runs:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = [noise for noise in NOISE if noise in proc.stderr]
        assert not found, (command[2:4], found, proc.stderr[-3000:])
    assert "CLIENT OK" in proc.stdout


@pytest.mark.parametrize("value, expected", [("adaptive", "adaptive"), ("off", "off"), ("2.5", 2.5)])
def test_clip_norm_takes_the_named_bounds_and_a_number(tmp_path, value, expected):
    """`--clip-norm off` is the operator's explicit opt-out of the default adaptive bound (issue 22)."""
    import json

    from peft_hetlora.cli import main as cli_main
    from tests.tiny_models import saved_lora_llama

    saved_lora_llama(tmp_path / "adapter")
    assert cli_main(["coordinate", "--store", str(tmp_path / "fed"), "--init-adapter", str(tmp_path / "adapter"),
                     "--clients", "a,b", "--rounds", "1", "--clip-norm", value]) == 0
    assert json.loads((tmp_path / "fed" / "federation.json").read_text())["clip_norm"] == expected


def test_clip_norm_refuses_anything_else_with_the_choices(capsys):
    from peft_hetlora.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["coordinate", "--store", "x", "--clip-norm", "-1"])
    assert exit_info.value.code == 2 and "adaptive" in capsys.readouterr().err
