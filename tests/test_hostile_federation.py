"""Issue 22 from outside: one participant tries to stop or poison a federation, exactly as an attacker does it.

Only the public surface is used: the ``hetlora coordinate`` command (`peft_hetlora.cli.main`), a `LocalStore`, and
uploads written the way `FederatedClientCallback.upload` writes them (the global of the open round truncated to the
rank, or gathered at the window, that ``round.json`` assigns; trained = seeded noise; ``client.json`` from
`ClientReport`; one `store.upload_client` call). Every expectation is computed here, independently, in numpy:

- (a) a finite but huge upload (factors x3e18 under the default method, x1e19 under ``hetlora`` / ``rankwise``,
  x1e13 under ``hetlora`` / ``component`` / ``rankwise``) never stops the round: the round closes, the published
  global is finite, the attacker is refused with a reason (the huge ones) and a restart does not fail;
- (b) under DP a participant reporting ``"components": [1, 0]`` cannot stop the round either;
- (c) with 6 honest clients at n=100 and 3 liars (1e9 examples, or 11x the median) every data weight in
  summary.json is exactly the capped share: ``min(n_k, 10 x median) / sum_j min(n_j, 10 x median)``;
- (d) a federation started with no flags bounds one client's influence: the published global moves (the product
  ``s B A`` over all modules, Frobenius) by at most ``c x median_k ||s (B_k A_k - B0_k A0_k)||`` of the round's
  uploads, ``c = BOUND_MULTIPLIER``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_bytes

from peft_hetlora import cli
from peft_hetlora.federated import LocalStore
from peft_hetlora.federated.round import ClientReport
from peft_hetlora.federated.upload import encode_message

R_MAX, ALPHA = 4, 8
SCALING = ALPHA / R_MAX  # the init adapter's rank_scaling="fixed": s = lora_alpha / r
MODULES = {  # name -> (d_in, d_out); a tiny adapter shaped like two attention layers
    "base_model.model.model.layers.0.self_attn.q_proj": (12, 10),
    "base_model.model.model.layers.0.self_attn.v_proj": (12, 6),
    "base_model.model.model.layers.1.self_attn.q_proj": (12, 10),
}
EXTRA = "base_model.model.score.modules_to_save.default.weight"
MAX_WEIGHT_RATIO = 10  # docs/aggregation.md "Weight cap": each data weight <= 10 x the round's median
# c of the default adaptive influence bound (docs/aggregation.md). Assumed 4 until the default bound lands on main;
# then the library's own constant is used.
try:
    from peft_hetlora.federated.aggregation import DEFAULT_BOUND_MULTIPLIER as BOUND_MULTIPLIER  # type: ignore
except ImportError:  # pragma: no cover - before issue 22's default bound is merged
    BOUND_MULTIPLIER = 4.0


# ------------------------------------------------------------------------------------------------ the attacker's kit
def hetlora(*args: str) -> int:
    """`hetlora ...` as a user types it (the CLI's own error handling: exit 2 and one line on stderr)."""
    return cli.main([str(a) for a in args])


def initial_adapter(folder: Path, *, seed: int = 0) -> Path:
    """A HETLORA adapter at r_max as `hetlora init` leaves it: random A, zero B."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (d_in, d_out) in MODULES.items():
        sd[f"{name}.lora_A.weight"] = torch.randn(R_MAX, d_in, generator=g) * 0.3
        sd[f"{name}.lora_B.weight"] = torch.zeros(d_out, R_MAX)
    sd[EXTRA] = torch.randn(3, 12, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "HETLORA", "r": R_MAX, "rank": R_MAX, "r_min": 1, "lora_alpha": ALPHA, "rank_scaling": "fixed",
        "base_model_name_or_path": "tiny/base", "target_modules": ["q_proj", "v_proj"]}))
    return folder


def start_federation(tmp_path: Path, clients: list[str], *flags: str) -> LocalStore:
    fed = tmp_path / "fed"
    assert hetlora("coordinate", "--store", fed, "--init-adapter", initial_adapter(tmp_path / "init"),
                   "--clients", ",".join(clients), "--rounds", 3, "--r-min", 1, "--no-progress",
                   "--log-level", "WARNING", *flags) == 0
    return LocalStore(fed)


def coordinate(store: LocalStore) -> int:
    return hetlora("coordinate", "--store", store.path, "--no-progress", "--log-level", "WARNING")


def open_round(store: LocalStore) -> tuple[int, dict, dict[str, torch.Tensor], str]:
    latest = store.latest_global()
    info = json.loads((Path(latest.path) / "round.json").read_text())
    return latest.round, info, load_file(str(Path(latest.path) / "adapter_model.safetensors")), latest.revision


def upload(store: LocalStore, tmp_path: Path, cid: str, *, seed: int, scale: float = 1.0, num_examples: int = 100,
           message_format: str | None = "fp32", **report: object) -> None:
    """What `FederatedClientCallback` uploads after a round, with the factors multiplied by `scale`.

    The weights are encoded with `encode_message` in `message_format` and declared so in client.json (None: plain
    float32 weights and no `message_format` field at all, as a client of an older version writes them)."""
    t, info, global_sd, revision = open_round(store)
    rank = info["ranks"][cid]
    window = (info.get("components") or {}).get(cid)
    rows = list(window) if window is not None else list(range(rank))
    gen = torch.Generator().manual_seed(1000 * t + seed)
    out = {}
    for key, value in sorted(global_sd.items()):
        if key.endswith(".lora_A.weight"):
            sent = value[rows]
            out[key] = (sent + 0.1 * torch.randn(sent.shape, generator=gen)) * scale
        elif key.endswith(".lora_B.weight"):
            sent = value[:, rows]
            out[key] = (sent + 0.1 * torch.randn(sent.shape, generator=gen)) * scale
        else:
            out[key] = value + 0.05 * torch.randn(value.shape, generator=gen)
    meta = ClientReport(client_id=cid, round=t, rank_in=rank, rank_out=rank, num_examples=num_examples,
                        train_loss=1.0, global_revision=revision, max_rank=R_MAX,
                        components=tuple(window) if window is not None else None,
                        message_format=message_format).to_json()
    meta.update(report)
    folder = tmp_path / "clients" / f"{cid}-{t}-{seed}"
    folder.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in out.items()}
    data = encode_message(state, message_format) if message_format is not None else save_bytes(state)
    (folder / "adapter_model.safetensors").write_bytes(data)
    (folder / "client.json").write_text(json.dumps(meta, indent=2) + "\n")
    store.upload_client(t, cid, folder)


def published(store: LocalStore, t: int) -> dict[str, np.ndarray]:
    return np_load_file(str(Path(store.get_global(t).path) / "adapter_model.safetensors"))


def products(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """s B A of every module, in float64 (the adapter's weight update)."""
    return {name: SCALING * sd[f"{name}.lora_B.weight"].astype(np.float64) @ sd[f"{name}.lora_A.weight"].astype(
        np.float64) for name in MODULES}


def distance(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(((x[k] - y[k]) ** 2).sum() for k in x)))


def assert_round_closed_and_finite(store: LocalStore, t: int) -> dict:
    """Round `t` is closed (summary.json) and whatever global stands after it is finite everywhere."""
    summary = store.read_summary(t)
    assert summary is not None, f"round {t} did not close"
    latest = store.latest_global()
    assert latest.round in (t, t + 1)  # a new global, or the previous one stands (the summary says why)
    for key, value in published(store, latest.round).items():
        assert np.isfinite(value).all(), f"{key} of the published global {latest.round} is not finite"
    return summary


# ------------------------------------------------------------------------------- (a) huge finite uploads
@pytest.mark.parametrize(
    "flags, scale, must_reject",
    [
        ((), 3e18, True),  # default method (flexlora_held), no clip_norm: a NaN/inf global is published
        ((), 1e19, True),  # the SVD fails ("linalg.svd: ..."): exit 2 on every restart until the upload is deleted
        (("--method", "hetlora"), 1e19, True),  # "value cannot be converted to type float without overflow"
        (("--method", "rankwise"), 1e19, True),
        (("--method", "hetlora"), 1e13, False),  # accepted; 232 of 496 entries of the published global NaN/inf
        (("--method", "component"), 1e13, False),
        (("--method", "rankwise"), 1e13, False),
    ],
    ids=["default-3e18", "default-1e19", "hetlora-1e19", "rankwise-1e19", "hetlora-1e13", "component-1e13",
         "rankwise-1e13"],
)
def test_a_huge_finite_upload_never_stops_or_poisons_the_round(tmp_path, flags, scale, must_reject, capsys):
    clients = ["a", "b", "c", "d"]
    store = start_federation(tmp_path, clients, *flags)
    for seed, cid in enumerate(clients[:-1]):
        upload(store, tmp_path, cid, seed=seed)
    upload(store, tmp_path, "d", seed=9, scale=scale)
    up = np_load_file(str(store.download_client(0, "d") / "adapter_model.safetensors"))
    assert all(np.isfinite(v).all() for v in up.values())  # what validation sees: every value finite
    assert coordinate(store) == 0, capsys.readouterr().err
    summary = assert_round_closed_and_finite(store, 0)
    assert set(summary["accepted"]) >= {"a", "b", "c"}  # the honest clients are never lost
    clipped = (summary.get("aggregation") or {}).get("clip_scales", {}).get("d", 1.0) < 1.0
    if must_reject:  # refused with a reason, or (a default influence bound) held to the bound, and recorded so
        assert ("d" in summary["rejected"] and summary["rejected"]["d"].strip()) or clipped, summary["rejected"]
    else:
        assert "d" in summary["rejected"] or "d" in summary["accepted"]
    if store.latest_global().round == 1:
        norm = summary["metrics"]["global_update_norm"]
        assert norm is not None and np.isfinite(norm)
    # the coordinator restarted (a new process, the same store) never fails on the same upload
    assert coordinate(store) == 0, capsys.readouterr().err
    assert coordinate(store) == 0, capsys.readouterr().err
    assert store.read_summary(0) == summary  # a closed round is not closed again


# ------------------------------------------------------------------------------- (b) DP and a permuted window
def test_a_permuted_component_report_cannot_stop_a_dp_federation(tmp_path, capsys):
    clients = ["a", "b", "c", "d"]
    store = start_federation(tmp_path, clients, "--dp-clip", 1.0, "--dp-noise-multiplier", 0.5,
                             "--rank-policy", "explicit", "--ranks", "a=4,b=4,c=4,d=4")
    t, info, _, _ = open_round(store)
    assert info["ranks"]["d"] == 4 and not (info.get("components") or {}).get("d")
    for seed, cid in enumerate(clients[:-1]):
        upload(store, tmp_path, cid, seed=seed)
    # rank_out 2 of 4, its two slots reported as global components 1 and 0 (validation accepts the permutation)
    _upload_window(store, tmp_path, "d", [1, 0])
    assert coordinate(store) == 0, capsys.readouterr().err
    summary = assert_round_closed_and_finite(store, 0)
    assert set(summary["accepted"]) >= {"a", "b", "c"}
    assert "d" in summary["accepted"] or summary["rejected"]["d"].strip()
    assert coordinate(store) == 0, capsys.readouterr().err  # restart OK
    assert store.read_summary(0) == summary


def _upload_window(store: LocalStore, tmp_path: Path, cid: str, components: list[int]) -> None:
    """An upload of the global's `components` (in that slot order), trained, reported with that `components`."""
    t, _, global_sd, revision = open_round(store)
    gen = torch.Generator().manual_seed(77)
    out = {}
    for key, value in sorted(global_sd.items()):
        if key.endswith(".lora_A.weight"):
            out[key] = value[components] + 0.1 * torch.randn(len(components), value.shape[1], generator=gen)
        elif key.endswith(".lora_B.weight"):
            out[key] = value[:, components] + 0.1 * torch.randn(value.shape[0], len(components), generator=gen)
        else:
            out[key] = value.clone()
    meta = ClientReport(client_id=cid, round=t, rank_in=R_MAX, rank_out=len(components), num_examples=100,
                        global_revision=revision, components=tuple(components), message_format="fp32").to_json()
    folder = tmp_path / "clients" / f"{cid}-{t}-window"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "adapter_model.safetensors"))
    (folder / "client.json").write_text(json.dumps(meta))
    store.upload_client(t, cid, folder)


# ------------------------------------------------------------------------------- (c) the weight cap, many liars
def _capped_shares(examples: dict[str, int]) -> dict[str, float]:
    """docs/aggregation.md: n_k counts at most MAX_WEIGHT_RATIO x median(n); the weights are the normalised counts."""
    cap = MAX_WEIGHT_RATIO * statistics.median(examples.values())
    counted = {cid: min(n, cap) for cid, n in examples.items()}
    return {cid: n / sum(counted.values()) for cid, n in counted.items()}


@pytest.mark.parametrize("method", ["flexlora_held", "zero_pad"])
@pytest.mark.parametrize("claim", [10**9, 1100], ids=["1e9", "11x-median"])
def test_the_weight_cap_holds_for_three_liars(tmp_path, method, claim, capsys):
    honest = [f"h{i}" for i in range(6)]
    liars = ["x0", "x1", "x2"]
    store = start_federation(tmp_path, honest + liars, "--method", method)
    examples = {**dict.fromkeys(honest, 100), **dict.fromkeys(liars, claim)}
    for seed, cid in enumerate(honest + liars):
        upload(store, tmp_path, cid, seed=seed, num_examples=examples[cid])
    assert coordinate(store) == 0, capsys.readouterr().err
    summary = assert_round_closed_and_finite(store, 0)
    assert sorted(summary["accepted"]) == sorted(honest + liars)
    weights = summary["weights"]
    expected = _capped_shares(examples)  # 1e9 and 11x: 1000 / 3600 = 0.278 each liar, 100 / 3600 each honest one
    assert weights == pytest.approx(expected, rel=1e-6)
    median_weight = statistics.median(weights.values())
    assert max(weights.values()) <= MAX_WEIGHT_RATIO * median_weight * (1 + 1e-9)
    assert sum(weights.values()) == pytest.approx(1.0)


# ------------------------------------------------------------------------------- (d) bounded influence by default
def _global_move_and_bound(store: LocalStore, t: int) -> tuple[float, float]:
    """||s B A (global t+1) - s B A (global t)|| and c x the median of the accepted uploads' product steps."""
    previous, new = products(published(store, t)), products(published(store, t + 1))
    summary = store.read_summary(t)
    prev_sd = published(store, t)
    steps = []
    for cid in summary["participants"]:
        folder = store.download_client(t, cid)
        sd = np_load_file(str(folder / "adapter_model.safetensors"))
        meta = json.loads((folder / "client.json").read_text())
        rows = meta.get("components") or list(range(meta["rank_out"]))
        sent = {}
        for name in MODULES:
            sent[f"{name}.lora_A.weight"] = prev_sd[f"{name}.lora_A.weight"][rows]
            sent[f"{name}.lora_B.weight"] = prev_sd[f"{name}.lora_B.weight"][:, rows]
        steps.append(distance(products(sd), products(sent)))
    return distance(new, previous), BOUND_MULTIPLIER * statistics.median(steps)


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e6])
def test_a_federation_started_with_no_flags_bounds_one_clients_influence(tmp_path, scale, capsys):
    clients = ["a", "b", "c", "d", "e"]
    store = start_federation(tmp_path, clients)
    for seed, cid in enumerate(clients[:-1]):
        upload(store, tmp_path, cid, seed=seed)
    upload(store, tmp_path, "e", seed=9, scale=scale)  # scale 1: an honest round, the bound must not bind
    assert coordinate(store) == 0, capsys.readouterr().err
    summary = assert_round_closed_and_finite(store, 0)
    assert set(summary["accepted"]) >= {"a", "b", "c", "d"}
    assert store.latest_global().round == 1
    move, bound = _global_move_and_bound(store, 0)
    assert move <= bound, f"one client moved the global by {move:.3g}, above {BOUND_MULTIPLIER} x median = {bound:.3g}"


# ------------------------------------------------------------------------------- smaller: an omitted message_format
def test_an_omitted_message_format_is_refused_where_fp32_is(tmp_path, capsys):
    """In a bf16-only federation, leaving `message_format` out of client.json (= fp32) is refused exactly as declaring
    "fp32" is; the honest bf16 client's round closes."""
    store = start_federation(tmp_path, ["a", "b", "c"], "--message-formats", "bf16")
    upload(store, tmp_path, "a", seed=1, message_format="fp32")
    upload(store, tmp_path, "b", seed=2, message_format=None)
    upload(store, tmp_path, "c", seed=3, message_format="bf16")
    assert "message_format" not in json.loads((store.download_client(0, "b") / "client.json").read_text())
    assert coordinate(store) == 0, capsys.readouterr().err
    summary = assert_round_closed_and_finite(store, 0)
    assert summary["accepted"] == ["c"]
    declared, omitted = summary["rejected"]["a"], summary["rejected"]["b"]
    sentence = "client.json message_format 'fp32' is not allowed by this federation (allowed: ['bf16'])"
    assert declared.startswith(sentence) and omitted.startswith(sentence), (declared, omitted)
