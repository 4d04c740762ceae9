"""A client trained by two processes (torchrun, gloo, CPU) uploads once per round, from the main process, on the
folder store and on the Hub test double (one commit); the other process waits for the upload and holds the same
adapter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

import peft_hetlora
from peft_hetlora.federated.stores import HubStore, LocalStore
from tests.test_callbacks import TARGETS, make_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("multiprocess_client.py")


def global_folder(path: Path, client_id: str) -> Path:
    path.mkdir(parents=True)
    peft_hetlora.HetLoRAConfig(r=8, lora_alpha=16, target_modules=TARGETS).save_pretrained(str(path))
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(make_model(rank=8, seed=4)).items()}
    save_file(state, str(path / "adapter_model.safetensors"))
    (path / "round.json").write_text(json.dumps({"round": 0, "participants": [client_id], "ranks": {client_id: 3}}))
    return path


def commits(api: HfApi, repo_id: str) -> list[str]:
    """The titles of the commits on `repo_id` that carry files (not the repo's creation)."""
    try:
        return [c.title for c in api.list_repo_commits(repo_id) if c.title != "initial commit"]
    except Exception:  # noqa: BLE001 - the client repo does not exist before its first upload
        return []


@pytest.mark.skipif(not torch.distributed.is_available() or shutil.which("torchrun") is None
                    and not (Path(sys.executable).parent / "torchrun").exists(), reason="needs torch.distributed")
def test_two_process_client_uploads_once_per_round(tmp_path, hub_double):
    folder = LocalStore(tmp_path / "fed", create=True)
    folder.publish_global(0, global_folder(tmp_path / "g-local", "alice"))
    hub = HubStore("hetlora/fed", endpoint=hub_double.endpoint, token=hub_double.token, cache_dir=tmp_path / "c")
    hub.publish_global(0, global_folder(tmp_path / "g-hub", "bob"))
    hub_double.add_token("tok-bob", "user-bob", write=[hub.client_repo_for("bob")])
    api = HfApi(endpoint=hub_double.endpoint, token=hub_double.token)
    before = commits(api, hub.client_repo_for("bob"))

    out = tmp_path / "out"
    out.mkdir()
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    command = [torchrun, "--standalone", "--nproc_per_node", "2", str(SCRIPT), "--folder", str(folder.path),
               "--out", str(out), "--hub-endpoint", hub_double.endpoint, "--hub-repo", "hetlora/fed",
               "--hub-token", "tok-bob"]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    reports = [json.loads((out / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    for client_id, store in (("alice", folder), ("bob", hub)):
        main, other = reports[0][client_id], reports[1][client_id]
        assert main["trained"] == other["trained"] == [0]
        assert (main["upload_calls"], other["upload_calls"]) == (1, 0)  # one upload, from the main process
        assert main["uploaded_rounds"] == other["uploaded_rounds"] == [0]
        assert other["uploads_seen_after_train"] == [client_id]  # the other process waited for the upload
        assert main["adapter_sha256"] == other["adapter_sha256"]  # and holds the same adapter
        assert store.list_client_uploads(0) == [client_id]
    after = commits(api, hub.client_repo_for("bob"))
    assert len(after) - len(before) == 1, after  # one Hub commit for the round
