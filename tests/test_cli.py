"""The `hetlora` command line: lazy imports, one-line errors, init, export."""

from __future__ import annotations

import errno
import json
import os
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
    assert main(["export", str(adapter), str(tmp_path / "lora")]) == 2
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
    from peft_hetlora.federated.errors import ConfigMismatchError

    monkeypatch.delenv("HETLORA_DEBUG", raising=False)

    def mismatch(*args, **kwargs):
        raise ConfigMismatchError("lora_alpha: this client has 8.0\nbut the federation has 32.0")

    monkeypatch.setattr("peft_hetlora.export.export_lora", mismatch)
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == "hetlora: error: export: lora_alpha: this client has 8.0 but the federation has 32.0\n"
    # a missing store through `coordinate` says how to create one
    assert main(["coordinate", "--store", str(tmp_path / "nothing"), "--no-progress"]) == 1
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
    from peft_hetlora.federated.hub_store import HubStore

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
