"""Token-weighted perplexity of a causal LM on tokenised data: the one evaluation loop every method shares.

Perplexity = exp(sum over all predicted tokens of -log p(token) / number of predicted tokens), pooled over the
whole dataset (not averaged per batch or per example). Position t predicts token t+1 (labels shifted by one);
label -100 marks tokens that are not predicted (padding).

Example:
    >>> from hetlora_bench.data import tokenize_for_clm
    >>> blocks = tokenize_for_clm(corpus.eval, tokenizer, block_size=128)  # doctest: +SKIP
    >>> evaluate_perplexity(model, blocks, batch_size=8)  # doctest: +SKIP
    {'perplexity': 63.8, 'loss': 4.156, 'num_tokens': 81480, 'num_examples': 2000, 'num_batches': 250}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

IGNORE_INDEX = -100


def perplexity_from_nll(nll_sum: float, num_tokens: int) -> dict[str, float]:
    """``{"perplexity", "loss", "num_tokens"}`` from a summed token NLL (natural log) and a token count.

    Example:
        >>> perplexity_from_nll(20.0, 10)["loss"]
        2.0
    """
    if num_tokens <= 0:
        return {"perplexity": float("nan"), "loss": float("nan"), "num_tokens": 0}
    loss = float(nll_sum) / int(num_tokens)
    try:
        perplexity = math.exp(loss)
    except OverflowError:
        perplexity = float("inf")
    return {"perplexity": perplexity, "loss": loss, "num_tokens": int(num_tokens)}


def _as_list(value: Any) -> list[int]:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


def _default_collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    width = max(len(_as_list(r["input_ids"])) for r in rows)
    ids, mask, labels = [], [], []
    for row in rows:
        r_ids = _as_list(row["input_ids"])
        r_mask = _as_list(row["attention_mask"]) if "attention_mask" in row else [1] * len(r_ids)
        if "labels" in row:
            r_labels = _as_list(row["labels"])
        else:
            r_labels = [t if m else IGNORE_INDEX for t, m in zip(r_ids, r_mask)]
        pad = width - len(r_ids)
        ids.append(r_ids + [0] * pad)
        mask.append(r_mask + [0] * pad)
        labels.append(r_labels + [IGNORE_INDEX] * pad)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def _row_lengths(dataset: Any, indices: list[int]) -> list[int]:
    column = "attention_mask"
    try:
        names = dataset.column_names
    except AttributeError:
        names = list(dataset[0].keys()) if len(dataset) else []
    if column not in names:
        column = "input_ids"
    if hasattr(dataset, "select"):
        values = dataset.select(indices)[column]
    else:
        values = [dataset[i][column] for i in indices]
    if column == "attention_mask":
        return [int(sum(_as_list(v))) for v in values]
    return [len(_as_list(v)) for v in values]


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def shifted_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of `logits` (batch, seq, vocab) against `labels` (batch, seq), and the tokens counted.

    Position ``t`` predicts label ``t + 1``; labels equal to ``IGNORE_INDEX`` (-100) are left out. Logits are
    upcast to float32 first.

    Example:
        >>> nll, n = shifted_nll(torch.zeros(1, 3, 4), torch.tensor([[0, 1, -100]]))
        >>> n, round(nll, 4)  # one counted token, uniform over 4 classes: log 4
        (1, 1.3863)
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return float(nll.item()), int((shift_labels != IGNORE_INDEX).sum().item())


def evaluate_perplexity(
    model: torch.nn.Module,
    dataset: Any,
    batch_size: int = 8,
    max_batches: int | None = None,
    *,
    collator: Callable[[Sequence[Mapping[str, Any]]], Mapping[str, torch.Tensor]] | None = None,
    sort_by_length: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> dict[str, float]:
    """Token-weighted perplexity of ``model`` on tokenised rows (``input_ids``, ``attention_mask``, ``labels``).

    The loss comes from the model's logits with shifted labels (``cross_entropy`` summed over tokens whose label is
    not -100), computed in float32 under ``torch.no_grad()`` with the model in eval mode (its previous mode is
    restored). Right padding beyond a batch's longest row is trimmed, and rows are batched by length
    (``sort_by_length``) so little compute goes to padding; neither changes the result, since each row's tokens
    only see their own left context. ``max_batches`` evaluates the first ``max_batches * batch_size`` rows in
    dataset order (a deterministic subset: make the dataset's order random if the subset must be).

    Args:
        model: a causal LM (a ``PeftModel`` too) whose forward takes ``input_ids`` and ``attention_mask`` and
            returns ``logits``.
        dataset: a ``datasets.Dataset`` from :func:`hetlora_bench.data.tokenize_for_clm`, or any sequence
            of such row dicts. Rows without ``labels`` use ``input_ids`` where ``attention_mask`` is 1.
        collator: turns a list of rows into tensors (default: pads to the longest row, labels -100).

    Returns:
        ``{"perplexity", "loss", "num_tokens", "num_examples", "num_batches"}``; ``loss`` is the mean token NLL.

    Example:
        >>> evaluate_perplexity(model, blocks, batch_size=8, max_batches=10)["perplexity"]  # doctest: +SKIP
        61.2
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    collate = collator or _default_collate
    n_rows = len(dataset)
    if max_batches is not None:
        n_rows = min(n_rows, max(0, max_batches) * batch_size)
    indices = list(range(n_rows))
    if sort_by_length and n_rows > batch_size:
        lengths = _row_lengths(dataset, indices)
        indices = sorted(indices, key=lambda i: lengths[i])
    batches = [indices[i : i + batch_size] for i in range(0, n_rows, batch_size)]
    target = torch.device(device) if device is not None else _model_device(model)

    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        with torch.no_grad():
            for batch_indices in tqdm(batches, desc=desc, disable=not progress, leave=False):
                if hasattr(dataset, "select"):
                    rows = list(dataset.select(batch_indices))
                else:
                    rows = [dataset[i] for i in batch_indices]
                batch = collate(rows)
                mask = batch.get("attention_mask")
                labels = batch.get("labels")
                input_ids = batch["input_ids"]
                if mask is None:
                    mask = torch.ones_like(input_ids)
                if labels is None:
                    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
                # trim right padding shared by the whole batch
                keep = torch.nonzero(mask.sum(dim=0) > 0).max().item() + 1 if mask.any() else 0
                if keep < 2:
                    continue
                input_ids, mask, labels = input_ids[:, :keep], mask[:, :keep], labels[:, :keep]
                kwargs = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) else {}
                logits = model(input_ids=input_ids.to(target), attention_mask=mask.to(target), **kwargs).logits
                nll, tokens = shifted_nll(logits, labels)
                total_nll += nll
                total_tokens += tokens
    finally:
        model.train(was_training)
    result: dict[str, float] = perplexity_from_nll(total_nll, total_tokens)
    result["num_examples"] = n_rows
    result["num_batches"] = len(batches)
    return result
