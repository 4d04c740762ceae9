"""Perplexity: the local evaluate module and the shared evaluation loop, against hand computations."""

import math

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hetlora_bench.metrics import PERPLEXITY_METRIC_PATH, evaluate_perplexity, load_perplexity_metric
from hetlora_bench.metrics.loss_eval import perplexity_from_nll


def test_evaluate_load_local_module_offline(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(PERPLEXITY_METRIC_PATH)
    nll, counts = [12.5, 3.25, 0.0], [5, 2, 0]
    out = metric.compute(nll_sum=nll, num_tokens=counts)
    assert out["num_tokens"] == 7
    assert out["loss"] == pytest.approx(15.75 / 7)
    assert out["perplexity"] == pytest.approx(math.exp(15.75 / 7))
    # batched use, as in an evaluation loop
    metric = load_perplexity_metric()
    for s, n in zip(nll, counts):
        metric.add_batch(nll_sum=[s], num_tokens=[n])
    assert metric.compute()["perplexity"] == pytest.approx(out["perplexity"])
    assert math.isnan(metric.compute(nll_sum=[0.0], num_tokens=[0])["perplexity"])
    assert perplexity_from_nll(15.75, 7) == pytest.approx(out)


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits depend only on the token id (a lookup table): easy to compute by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def numpy_nll(table: np.ndarray, rows: list[list[int]]) -> tuple[float, int]:
    total, count = 0.0, 0
    for ids in rows:
        for t in range(len(ids) - 1):
            logits = table[ids[t]].astype(np.float64)
            log_z = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
            total += log_z - logits[ids[t + 1]]
            count += 1
    return total, count


def test_fixed_logits_against_numpy():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(11, 11, generator=gen)
    rows = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [3, 3, 3, 3, 3, 3, 3]]
    ds = datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    total, count = numpy_nll(table.numpy(), rows)
    for batch_size, sort in [(1, False), (3, True), (4, False)]:
        out = evaluate_perplexity(FixedLogits(table), ds, batch_size=batch_size, sort_by_length=sort, progress=False)
        assert out["num_tokens"] == count == 13
        assert out["loss"] == pytest.approx(total / count, rel=1e-6)
        assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6)
    # max_batches: the first max_batches * batch_size rows, in dataset order
    head = evaluate_perplexity(FixedLogits(table), ds, batch_size=2, max_batches=1, progress=False)
    h_total, h_count = numpy_nll(table.numpy(), rows[:2])
    assert head["num_tokens"] == h_count and head["loss"] == pytest.approx(h_total / h_count, rel=1e-6)


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(config)


def test_tiny_llama_matches_cross_entropy_per_example(tiny_model):
    gen = torch.Generator().manual_seed(1)
    lengths = [9, 3, 12, 5, 7, 2, 12]
    block = 12
    rows = []
    for n in lengths:  # padded to the block with -100 labels, as tokenize_for_clm does
        ids = torch.randint(1, 40, (n,), generator=gen).tolist()
        rows.append({
            "input_ids": ids + [0] * (block - n),
            "attention_mask": [1] * n + [0] * (block - n),
            "labels": ids + [-100] * (block - n),
        })
    ds = datasets.Dataset.from_list(rows)

    # independent: one unpadded example at a time, mean of per-token cross-entropy over all tokens
    nll, count = 0.0, 0
    with torch.no_grad():
        for row, n in zip(rows, lengths):
            ids = torch.tensor([row["input_ids"][:n]])
            logits = tiny_model(input_ids=ids).logits[0]
            nll += F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
            count += n - 1
    tiny_model.train()
    out = evaluate_perplexity(tiny_model, ds, batch_size=3, progress=False)
    assert tiny_model.training  # mode restored
    assert out["num_tokens"] == count == sum(lengths) - len(lengths)
    assert out["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert out["num_examples"] == len(rows) and out["num_batches"] == 3
    # same answer from a plain list of rows without labels (labels derived from the attention mask)
    no_labels = [{k: v for k, v in r.items() if k != "labels"} for r in rows]
    assert evaluate_perplexity(tiny_model, no_labels, batch_size=4, progress=False)["loss"] == pytest.approx(
        out["loss"], rel=1e-5
    )
    # and the evaluate module agrees with the loop's sums
    metric = load_perplexity_metric()
    assert metric.compute(nll_sum=[out["loss"] * out["num_tokens"]], num_tokens=[out["num_tokens"]])[
        "perplexity"
    ] == pytest.approx(out["perplexity"], rel=1e-9)
