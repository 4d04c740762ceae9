"""`hetlora coordinate` on folders and Hub stores, the published global in PEFT, and the coordinator's
hardening against hostile or overflowing client reports, killed publishes and stale temp files."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file, save_file

from peft_hetlora.commands.coordinate import add_coordinate_parser, main
from peft_hetlora.federated.coordinator import Coordinator
from peft_hetlora.federated.policies import RankPolicy
from peft_hetlora.federated.stores import LocalStore
from peft_hetlora.utils.errors import FederationMismatch
from tests.coordinator_fakes import (  # noqa: F401  (the two fixtures register by import)
    ALPHA,
    Clock,
    FakeClients,
    Killed,
    _no_sleep,
    expected_aggregate,
    init_dir_fixture,
    initial_adapter,
    local_store_fixture,
    make_coordinator,
    np_upload,
    round_info,
)


@pytest.mark.parametrize("mode", ["client_repo", "pr"])
def test_rounds_on_a_hub_store(hub_double, tmp_path, init_dir, mode):
    """The same state machine on HubStore (Hub test double): clients write with their own tokens."""
    from peft_hetlora.federated.stores import HubStore

    store = HubStore("hetlora/fed", endpoint=hub_double.endpoint, token=hub_double.token, client_mode=mode,
                     cache_dir=tmp_path / "hf-coordinator")

    def store_for(cid):
        write = [store.client_repo_for(cid)] if mode == "client_repo" else []
        hub_double.add_token(f"tok-{cid}", f"user-{cid}", write=write)
        return HubStore(store.repo_id, endpoint=store.endpoint, token=f"tok-{cid}", client_mode=mode,
                        cache_dir=tmp_path / f"hf-{cid}")

    fake = FakeClients(store, tmp_path / "work", prune={"b"}, poison={"c": "nan"}, store_for=store_for)
    coord = make_coordinator(store, fake, rounds=2, clients_per_round=4, min_clients=3)
    coord.init(init_dir)
    final = coord.run()
    assert final.round == 2
    for t in range(2):
        summary = store.read_summary(t)
        assert summary["accepted"] == ["a", "b", "d"] and "non-finite" in summary["rejected"]["c"]
        uploads = {cid: np_upload(store, t, cid) for cid in summary["accepted"]}
        expected, weights = expected_aggregate("hetlora", uploads, {}, 4, ALPHA / 4)
        assert summary["weights"] == pytest.approx(weights, rel=1e-6)
        got = np_load_file(str(Path(store.get_global(t + 1).path) / "adapter_model.safetensors"))
        for key, value in expected.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6)
    assert round_info(store, 1)["ranks"]["b"] == 1  # b pruned 2 -> 1 in round 0


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_runs_and_resumes(tmp_path, init_dir, capsys):
    fed = tmp_path / "fed"
    args = ["--store", str(fed), "--init-adapter", str(init_dir), "--rounds", "2", "--clients", "a,b,c",
            "--r-min", "1", "--rank-policy", "explicit", "--ranks", "a=1,b=2,c=4", "--no-progress",
            "--log-level", "WARNING"]
    assert main(args) == 0
    assert "Round 0 waits for uploads: 0/3" in capsys.readouterr().out
    store = LocalStore(fed)
    clients = FakeClients(store, tmp_path / "work")
    clients.upload_open_round()
    assert main(["--store", str(fed), "--no-progress"]) == 0  # resume with settings from federation.json
    assert "Round 1 waits" in capsys.readouterr().out
    clients.upload_open_round()
    assert main(["--store", str(fed), "--no-progress"]) == 0
    assert "Federation done: global 2" in capsys.readouterr().out
    assert main(["--store", str(fed), "--method", "fedavg", "--no-progress"]) == 2  # settings: a usage error
    assert "different federation" in capsys.readouterr().err
    assert main(["--store", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "init" in capsys.readouterr().err


def test_cli_parser_wiring_and_num_clients(tmp_path, init_dir):
    parser = argparse.ArgumentParser(prog="hetlora")
    sub = parser.add_subparsers(dest="command")
    add_coordinate_parser(sub)
    args = parser.parse_args(["coordinate", "--store", str(tmp_path / "fed"), "--init-adapter", str(init_dir),
                              "--num-clients", "12", "--clients-per-round", "4", "--rank-policy", "budget",
                              "--budgets", ",".join(f"client-{i:03d}=1MB" for i in range(12)), "--no-progress",
                              "--max-upload-bytes", "1MiB"])
    assert args.func(args) == 0
    fed = LocalStore(tmp_path / "fed").read_federation()
    assert fed["clients"][0] == "client-000" and len(fed["clients"]) == 12
    assert set(fed["initial_ranks"].values()) == {4} and fed["max_upload_bytes"] == 2**20


# ------------------------------------------------------------------------------------------------ real PEFT side
def test_global_is_a_hetlora_adapter_that_peft_loads(tmp_path):
    """A real HETLORA adapter goes through a round: clients load global 0 with PeftModel.from_pretrained, train
    (here: randomise) at their rank, upload what get_peft_model_state_dict gives; global 1 loads again."""
    peft = pytest.importorskip("peft")
    from tiny_models import randomize_adapter, tiny_llama

    import peft_hetlora

    base_config = dict(r=4, rank=4, r_min=1, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(tiny_llama(), peft_hetlora.HetLoRAConfig(**base_config))
    randomize_adapter(model, seed=1)
    model.save_pretrained(tmp_path / "init")
    store = LocalStore(tmp_path / "fed", create=True)
    # a plain PEFT client trains the prefix of its rank: the paper's rule (the default assigns windows)
    coord = Coordinator(store, method="hetlora", r_min=1, clients=["a", "b"], rank_policy={"a": 2, "b": 4}, rounds=1,
                        progress=False, clock=Clock(), sleep=_no_sleep)
    g0 = coord.init(tmp_path / "init")
    for seed, cid in enumerate(["a", "b"]):
        client = peft.PeftModel.from_pretrained(tiny_llama(), g0.path, is_trainable=True)
        rank = round_info(store, 0)["ranks"][cid]
        client.base_model.set_rank(rank)
        randomize_adapter(client, seed=10 + seed)
        state = {k: v.detach().contiguous() for k, v in peft.get_peft_model_state_dict(client).items()}
        folder = tmp_path / f"up-{cid}"
        folder.mkdir()
        save_file(state, str(folder / "adapter_model.safetensors"))
        (folder / "client.json").write_text(json.dumps({
            "client_id": cid, "round": 0, "rank_in": rank, "rank_out": rank, "num_examples": 8,
            "train_loss": 1.0, "global_revision": g0.revision}))
        store.upload_client(0, cid, folder)
    summary = coord.close_round(0)
    assert summary["accepted"] == ["a", "b"] and summary["clients"]["a"]["rank_out"] == 2
    g1 = store.get_global(1)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), g1.path)
    assert loaded.base_model.get_rank() == 4
    on_disk = load_file(str(Path(g1.path) / "adapter_model.safetensors"))
    in_model = peft.get_peft_model_state_dict(loaded)
    assert set(in_model) == set(on_disk)
    assert all(torch.equal(in_model[k].float(), on_disk[k]) for k in on_disk)
    # the store root holds the same latest adapter
    assert peft.PeftModel.from_pretrained(tiny_llama(), str(store.path)).base_model.get_rank() == 4


def test_cli_on_a_hub_store(hub_double, tmp_path, init_dir, capsys):
    from peft_hetlora.federated.stores import HubStore

    hub = ["--store", "hf://hetlora/cli-fed", "--hub-endpoint", hub_double.endpoint, "--hub-token",
           hub_double.token, "--no-progress", "--log-level", "WARNING"]
    assert main([*hub, "--init-adapter", str(init_dir), "--clients", "a,b", "--rounds", "1", "--rank", "2"]) == 0
    assert "Round 0 waits for uploads: 0/2" in capsys.readouterr().out
    store = HubStore("hetlora/cli-fed", endpoint=hub_double.endpoint, token=hub_double.token,
                     cache_dir=tmp_path / "c")
    assert store.read_federation()["initial_ranks"] == {"a": 2, "b": 2}
    FakeClients(store, tmp_path / "work").upload_open_round()
    assert main(hub) == 0
    assert "Federation done: global 1" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ issue 10 defects
def _strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_changed_settings_on_an_existing_store_are_refused_naming_each(store, init_dir, tmp_path, capsys):
    # issue 10 item 3: rerunning with another --rank-policy printed "nothing to do"
    make_coordinator(store, None).init(init_dir)
    with pytest.raises(FederationMismatch) as err:
        make_coordinator(store, None, rank_policy=RankPolicy("tiers"), r_min=2, clip_norm=5.0, seed=8,
                         clients_per_round=2).init(init_dir)
    message = str(err.value)
    for name, stored, given in (("rank_policy", "'explicit'", "'tiers'"), ("r_min", "1", "2"),
                                ("clip_norm", "None", "5.0"), ("seed", "7", "8"), ("clients_per_round", "3", "2")):
        assert f"{name}: store has" in message, name
        part = message.split(f"{name}: store has", 1)[1].split(";")[0]
        assert stored in part.split("this coordinator")[0] and given in part.split("this coordinator")[1], name
    with pytest.raises(FederationMismatch, match="next_rank"):
        make_coordinator(store, None, next_rank="initial").step(wait=False)
    with pytest.raises(FederationMismatch, match="lora_alpha"):
        other = initial_adapter(tmp_path / "alpha", r_max=4)
        config = json.loads((other / "adapter_config.json").read_text())
        (other / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 32}))
        make_coordinator(store, None).init(other)
    reordered = initial_adapter(tmp_path / "reordered", r_max=4)  # same set of target modules, other order
    config = json.loads((reordered / "adapter_config.json").read_text())
    (reordered / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["v_proj", "q_proj"]}))
    make_coordinator(store, None).init(reordered)
    with pytest.raises(FederationMismatch, match="rounds can only be extended"):
        make_coordinator(store, None, rounds=2).step(wait=False)
    # extending rounds stays allowed and is recorded
    assert make_coordinator(store, None, rounds=5).step(wait=False) == "waiting"
    assert store.read_federation()["rounds"] == 5
    if isinstance(store, LocalStore):  # the CLI says it in one line and exits 2 (a usage error)
        code = main(["--store", str(store.path), "--rank-policy", "uniform", "--no-progress"])
        assert code == 2 and "rank_policy: store has" in capsys.readouterr().err


def test_summary_is_strict_json_when_reported_losses_overflow(store, init_dir, tmp_path):
    # issue 10 item 9: finite train_loss 1.7e308 x num_examples 1e9 overflowed the weighted mean to Infinity
    losses = {"a": (1.7e308, 10**9), "b": (1.0e308, 10**9), "c": (1.5e308, 3)}
    clients = FakeClients(store, tmp_path / "work",
                          meta={c: {"train_loss": x, "num_examples": n} for c, (x, n) in losses.items()})
    coord = make_coordinator(store, clients, rounds=1)
    coord.init(init_dir)
    info = round_info(store, 0)
    for cid in info["participants"]:
        clients.upload(0, cid)
    summary = coord.close_round(0)
    used = {c: losses[c] for c in summary["accepted"]}
    total = sum(n for _, n in used.values())
    expected = sum(x / total * n for x, n in used.values())  # each term <= max loss: no overflow here either
    assert summary["metrics"]["train_loss"] == pytest.approx(expected, rel=1e-12)
    if isinstance(store, LocalStore):
        text = (store.path / "rounds" / "0" / "summary.json").read_text()
        assert _strict_loads(text)["metrics"]["train_loss"] == pytest.approx(expected, rel=1e-12)


def test_weighted_mean_is_overflow_safe_and_non_finite_becomes_null_with_a_reason():
    from peft_hetlora.federated.round import finite_or_null as _finite_or_null
    from peft_hetlora.federated.round import weighted_mean

    assert weighted_mean([(1.7e308, 10**9), (1.7e308, 1)]) == pytest.approx(1.7e308, rel=1e-15)
    assert weighted_mean([(2.0, 1), (5.0, 3)]) == pytest.approx((2.0 + 15.0) / 4)
    assert weighted_mean([]) is None
    found = {}
    out = _finite_or_null({"metrics": {"norm": float("inf"), "ok": 1.0}, "w": [float("nan")]}, "", found)
    assert out == {"metrics": {"norm": None, "ok": 1.0}, "w": [None]}
    assert set(found) == {"metrics.norm", "w[0]"} and all("null" in r for r in found.values())


def _kill_root_refresh_of(monkeypatch, round_idx: int) -> None:
    from peft_hetlora.federated.stores import local as local_store

    real = local_store.LocalStore._refresh_root

    def dies(self, global_dir):
        if global_dir.parent.name == str(round_idx):
            raise Killed("refresh root")
        return real(self, global_dir)

    monkeypatch.setattr(local_store.LocalStore, "_refresh_root", dies)


def test_final_publish_interrupted_before_the_root_is_finished_on_restart(tmp_path, init_dir, monkeypatch, capsys):
    # issue 10 item 10: a kill between rounds/T/global and the root left the root at T-1 and the restart
    # printed "Federation done" over it
    fed = tmp_path / "fed"
    assert main(["--store", str(fed), "--init-adapter", str(init_dir), "--rounds", "1", "--clients", "a,b",
                 "--rank-policy", "explicit", "--ranks", "a=1,b=4", "--no-progress", "--log-level", "WARNING"]) == 0
    store = LocalStore(fed)
    FakeClients(store, tmp_path / "work").upload_open_round()
    with monkeypatch.context() as patch:
        _kill_root_refresh_of(patch, 1)
        with pytest.raises(Killed):
            main(["--store", str(fed), "--no-progress", "--log-level", "WARNING"])
    assert store.latest_global().round == 1
    assert json.loads((fed / "round.json").read_text())["round"] == 0  # the root is stale
    capsys.readouterr()
    assert main(["--store", str(fed), "--no-progress", "--log-level", "WARNING"]) == 0
    assert "Federation done: global 1" in capsys.readouterr().out
    assert json.loads((fed / "round.json").read_text())["round"] == 1
    final = store.get_global(1)
    assert (fed / "adapter_model.safetensors").read_bytes() == (final.path / "adapter_model.safetensors").read_bytes()
    assert "Latest published round: **1**" in (fed / "README.md").read_text()


def test_restart_removes_temp_files_of_killed_coordinators_only(store, init_dir, tmp_path, monkeypatch):
    # issue 10 item 12: hetlora-global-* leaked in the temp folder (and .tmp-* in the store) after kill -9
    import subprocess
    import sys

    from peft_hetlora.federated.stores.temp_files import _HOST, temp_prefix

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = tmp / f"hetlora-global-p{proc.pid}@{_HOST}~r3-abc"
    dead.mkdir()
    (dead / "adapter_model.safetensors").write_bytes(b"x" * 10)
    live = tmp / (temp_prefix("hetlora-global-", "r4") + "def")
    live.mkdir()
    unrelated = tmp / "hetlora-globalish"
    unrelated.mkdir()
    coord = make_coordinator(store, None)
    coord.init(init_dir)
    assert coord.step(wait=False) == "waiting"
    assert not dead.exists() and live.is_dir() and unrelated.is_dir()
    assert not [p for p in tmp.iterdir() if p.name.startswith("hetlora-global-") and p != live]


def test_ranks_never_exceed_a_clients_reported_max_rank(store, init_dir, tmp_path):
    # issue 10 item 2 (server side): a client declares the largest rank it can train; every policy respects it
    for policy in ("uniform", RankPolicy("constant", rank=4), RankPolicy("tiers"), {"a": 4, "b": 4, "c": 4, "d": 4}):
        sub = tmp_path / f"p{abs(hash(str(policy)))}"
        own = LocalStore(sub / "fed", create=True) if isinstance(store, LocalStore) else store
        if own is store and store.read_federation() is not None:
            continue  # the Hub store of this test holds one federation: the first policy is enough there
        clients = FakeClients(own, sub / "work", rank_cap={"a": 2, "c": 1})
        coord = make_coordinator(own, clients, rank_policy=policy, clients_per_round=4, rounds=3)
        coord.init(init_dir)
        coord.run()
        for t in range(1, 4):
            ranks = round_info(own, t)["ranks"]
            assert ranks["a"] <= 2 and ranks["c"] == 1, (policy, t, ranks)
        summary = own.read_summary(0)
        assert sorted(summary["accepted"]) == ["a", "b", "c", "d"]  # rank below the assignment is accepted
        assert summary["client_max_ranks"] == {"a": 2, "c": 1}
        assert all(own.read_summary(t)["client_max_ranks"] == {"a": 2, "c": 1} for t in range(3))


def test_hostile_client_text_reaches_neither_card_nor_logs_verbatim(tmp_path, init_dir, caplog):
    # issue 10 item 8: a 60 kB client id in client.json made a 61 kB card
    store = LocalStore(tmp_path / "fed", create=True)
    hostile = "<img src=x onerror=alert(1)>\n[x](http://evil)" + "Z" * 60_000
    clients = FakeClients(store, tmp_path / "work", meta={"a": {"client_id": hostile}})
    coord = make_coordinator(store, clients, rounds=1, clients_per_round=4)
    coord.init(init_dir)
    with caplog.at_level("WARNING"):
        coord.run()
    reason = store.read_summary(0)["rejected"]["a"]
    assert len(reason) <= 500 and "\n" not in reason
    card = (store.path / "README.md").read_text()
    assert len(card) < 4000 and "<img" not in card and "](http" not in card.split("## Rounds")[1]
    assert all(len(r.getMessage()) < 1000 and "\n" not in r.getMessage() for r in caplog.records)
