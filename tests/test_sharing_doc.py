"""docs/sharing.md runs in order against the Hub test double (a fresh process, so the Hub endpoint and token
come from the environment exactly as for a user)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.tiny_models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = """
import json, sys
from tests.doc_snippets import code_blocks, run_blocks
namespace = run_blocks(code_blocks(sys.argv[1]), {"smollm2-135m": sys.argv[2]})
store = namespace["store"]
report = {
    "latest_round": store.latest_global().round,
    "accepted": sorted(store.read_summary(0)["accepted"]),
    "latest_rank": namespace["latest"].base_model.get_rank(),
    "shared_type": type(namespace["shared"].peft_config["default"]).__name__,
    "hashed_modules": store.read_federation()["base_model_identity"]["modules"],
}
print("REPORT " + json.dumps(report))
"""


def test_sharing_page_runs_in_order_against_the_hub_double(hub_double, tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_ENDPOINT": hub_double.endpoint,
        "HF_TOKEN": hub_double.token,
        "HF_HOME": str(tmp_path / "hf-home"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(ROOT / "docs" / "sharing.md"), str(base)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1])
    assert report["latest_round"] == 1 and report["accepted"] == ["alice", "bob"]
    assert report["latest_rank"] == 16 and report["shared_type"] == "LoraConfig"
    assert report["hashed_modules"] == 4  # q_proj and v_proj of both layers: the base the clients were checked on
