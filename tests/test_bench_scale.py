"""Smoke tests of the scale benchmarks (issue 25) on tiny shapes: inputs, references, resume, Hub call counts."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

BENCH = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_scale = _load("bench_scale")
TINY1 = {**bench_scale.TINY, "layers": 1}


@settings(max_examples=60, deadline=None)
@given(num=st.integers(1, 3000), r_max=st.sampled_from([8, 16, 32, 64]))
def test_every_prefix_has_the_tiers_mix(num, r_max):
    ranks = bench_scale.client_ranks(num, r_max)
    tiers = bench_scale.tier_ranks(r_max)
    assert set(ranks) <= set(tiers)
    for tier, share in zip(tiers, bench_scale.TIER_SHARES):
        # largest remainder: each tier within one client of its exact share, for every prefix length
        assert abs(ranks.count(tier) - share * num / 20) < 1.0 + 1e-9


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale") / "tiny-L1-r8-K12"
    bench_scale.build_cache(folder, TINY1, 1, 8, 12)
    return folder


def test_cache_is_a_federation_the_coordinator_reads(cache):
    from peft_hetlora.federated import Coordinator, LocalStore, validate_upload

    store = LocalStore(cache)
    ids = store.list_client_uploads(0)
    assert len(ids) == 12
    coord = Coordinator(store, progress=False)
    spec, plan = coord.upload_spec(0), coord.open_round(0)
    ranks = bench_scale.client_ranks(12, 8)
    for k, cid in enumerate(ids):
        update = validate_upload(store.download_client(0, cid), spec, client_id=cid, round_idx=0,
                                 assigned_rank=plan.ranks[cid])
        assert update.rank == ranks[k] == plan.ranks[cid]
    assert bench_scale.build_cache(cache, TINY1, 1, 8, 12).list_client_uploads(0) == ids  # reused, not rewritten


def _numpy_flexlora_held(cache: Path, num: int, name: str, r_max: int) -> np.ndarray:
    """Independent reference: data-weighted held products, numpy float64 SVD, top r_max."""
    root = cache / "rounds" / "0"
    prev = {k: v.double().numpy() for k, v in load_file(str(root / "global" / "adapter_model.safetensors")).items()}
    ids = sorted(p.name for p in (root / "clients").iterdir())[:num]
    metas = [json.loads((root / "clients" / c / "client.json").read_text()) for c in ids]
    total = sum(m["num_examples"] for m in metas)
    w = 0.0
    for cid, meta in zip(ids, metas):
        sd = load_file(str(root / "clients" / cid / "adapter_model.safetensors"))
        a, b = sd[f"{name}.lora_A.weight"].double().numpy(), sd[f"{name}.lora_B.weight"].double().numpy()
        r = meta["rank_out"]
        held = b @ a + prev[f"{name}.lora_B.weight"][:, r:] @ prev[f"{name}.lora_A.weight"][r:]
        w = w + meta["num_examples"] / total * held
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    return (u[:, :r_max] * s[:r_max]) @ vh[:r_max]


@pytest.mark.parametrize("method", bench_scale.METHODS)
def test_cell_matches_exact(cache, method):
    cell = bench_scale.run_cell(cache, method, 12, exact_max_k=64, exact_max_elems=1 << 30)
    assert cell["clients"] == 12 and cell["r_max"] == 8
    assert cell["read_cold_s"] > 0 and cell["aggregate_cold_s"] > 0 and cell["peak_rss_mb"] >= 0
    assert cell["error"]["max_rel_error"] < 1e-5, cell["error"]
    if method.startswith("flexlora"):
        ratio = cell["error"]["max_residual_ratio"]
        assert ratio is None or 1 - 1e-6 <= ratio < 1 + 1e-4  # Eckart-Young: never below the optimum


def test_default_method_against_numpy(cache):
    """The library's flexlora_held (through the benchmark's aggregation loop) against a numpy SVD of W."""
    from peft_hetlora.federated import Coordinator, LocalStore

    store = LocalStore(cache)
    coord = Coordinator(store, progress=False)
    ids = store.list_client_uploads(0)
    folders = [Path(store.download_client(0, c)) for c in ids]
    metas = [json.loads((f / "client.json").read_text()) for f in folders]
    previous = load_file(str(Path(store.get_global(0).path) / "adapter_model.safetensors"))
    res = bench_scale.aggregate_files("flexlora_held", [f / "adapter_model.safetensors" for f in folders], metas,
                                      coord.r_max, coord.scaling, previous)
    name = "base_model.model.model.layers.0.mlp.down_proj"
    got = (res.state_dict[f"{name}.lora_B.weight"] @ res.state_dict[f"{name}.lora_A.weight"]).double().numpy()
    want = _numpy_flexlora_held(cache, len(ids), name, coord.r_max)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_main_writes_outputs_and_resumes(cache, tmp_path, monkeypatch):
    calls = []

    def in_process(folder, method, num, args):
        calls.append((method, num))
        return bench_scale.run_cell(folder, method, num, args.exact_max_k, args.exact_max_elems)

    monkeypatch.setattr(bench_scale, "spawn_cell", in_process)
    monkeypatch.setattr(bench_scale, "TINY", TINY1)
    args = ["--quick", "--layers", "1", "--r-max", "8", "--clients", "4", "12", "--methods", "hetlora",
            "flexlora_held", "--cache", str(cache.parent), "--out", str(tmp_path)]
    bench_scale.main(args)
    assert sorted(calls) == [("flexlora_held", 4), ("flexlora_held", 12), ("hetlora", 4), ("hetlora", 12)]
    report = json.loads((tmp_path / "scale.json").read_text())
    assert len(report["cells"]) == 4
    table = (tmp_path / "scale.md").read_text()
    assert table.count("| tiny | 1 | 8 |") == 4 and (tmp_path / "scale.png").stat().st_size > 0
    calls.clear()
    bench_scale.main(args)  # every cell is in the JSON: nothing runs again
    assert calls == []


def test_hub_calls_are_counted_per_phase(tmp_path):
    bench_hub = _load("bench_hub_calls")
    import huggingface_hub.constants

    old = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = False
    try:
        one, two = (bench_hub.count_round(k, tmp_path / str(k)) for k in (1, 2))
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = old
    # uploads are per client: two clients make exactly twice the calls of one
    for kind in ("api", "resolvers"):
        assert two["phases"]["client uploads"][kind] == 2 * one["phases"]["client uploads"][kind] > 0
    assert all(p["errors"] == 0 for row in (one, two) for p in row["phases"].values())
    assert two["phases"]["close round"]["routes"].get("POST commit", 0) >= 1  # the summary / publication commits
    assert math.isfinite(sum(p["seconds"] for p in two["phases"].values()))


@pytest.mark.slow  # ~4 fresh interpreters importing torch: ~25 s, over the smoke budget (run with -m slow)
def test_round_scale_kill_resume_is_bit_identical(cache, tmp_path):
    """Kill -9 of close_round in a subprocess when summary.json appears and at mid-run, then rerun: same global."""
    round_scale = _load("bench_round_scale")
    import shutil

    source = tmp_path / "source"
    shutil.copytree(cache, source)
    out = round_scale.kill_resume(source, tmp_path / "work", [0.5])
    assert [t["global_identical"] for t in out["trials"]] == [True, True]
    assert all(t["decision_identical"] for t in out["trials"])
    assert torch.is_tensor(load_file(str(source / "rounds" / "0" / "global" / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])


@pytest.mark.slow  # ~6 fresh interpreters importing torch: ~25 s, over the smoke budget (run with -m slow)
def test_gpu_check_script(tmp_path):
    """bash -n, then --dry-run here (prints the commands, writes the summary); without CUDA a real run exits 2."""
    import os
    import subprocess
    import sys

    script = BENCH / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path / "gpu")}
    dry = subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    for command in ("bench_layer.py", "bench_memory.py", "simulate --profile gpu"):
        assert command in dry.stdout + dry.stderr
    assert "| layer step time |" in (tmp_path / "gpu" / "gpu_check.md").read_text()
    if not torch.cuda.is_available():
        real = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
        assert real.returncode == 2 and "no CUDA device" in real.stderr
