"""Tokenisation of client corpora for causal-LM training: `tokenize_for_clm`, its cache and the batch collator.

Split out of [`data`][hetlora_bench.data], which re-exports every name here.

Example:
    >>> ds = datasets.Dataset.from_dict({"text": ["B: hello there"]})
    >>> train = tokenize_for_clm(ds, tokenizer, block_size=128)  # doctest: +SKIP
    >>> batch = CausalLMCollator(pad_token_id=pad_token_id(tokenizer))([train[0]])  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch

__all__ = ["CausalLMCollator", "clear_tokenization_cache", "corpus_token_stats", "pad_token_id", "tokenize_for_clm"]


# ----------------------------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------------------------

_TOKENIZED_CACHE: dict[tuple, datasets.Dataset] = {}
_CLM_FEATURES = datasets.Features(
    {name: datasets.List(datasets.Value("int64")) for name in ("input_ids", "attention_mask", "labels")}
)


_VOCAB_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_key(tokenizer: Any) -> str:
    try:
        digest = _VOCAB_DIGESTS[tokenizer]
    except (KeyError, TypeError):
        vocab = sorted(tokenizer.get_vocab().items())
        digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
        try:
            _VOCAB_DIGESTS[tokenizer] = digest
        except TypeError:
            pass
    name = getattr(tokenizer, "name_or_path", "") or ""
    specials = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer))
    return f"{type(tokenizer).__name__}:{name}:{digest}:{specials}"


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS token, else 0 (always masked anyway)."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def tokenize_for_clm(
    dataset: datasets.Dataset,
    tokenizer: Any,
    block_size: int,
    *,
    text_column: str = "text",
    packing: bool = False,
    pad_to_block_size: bool = True,
    add_eos: bool = True,
) -> datasets.Dataset:
    """Token blocks for causal language modelling: ``input_ids``, ``attention_mask``, ``labels``.

    Without ``packing`` every example is one row, truncated to ``block_size`` tokens (an EOS token ends it when
    ``add_eos``); with ``pad_to_block_size`` rows are right-padded to ``block_size`` (so any collator works),
    otherwise they keep their length (batch them with :class:`CausalLMCollator`, which pads per batch and
    saves compute on short examples). With ``packing`` all examples are concatenated (EOS-separated) and cut
    into ``block_size`` blocks; the last, partial block is padded. ``labels`` equal ``input_ids`` with padding
    set to -100; the model shifts them (position t predicts token t+1). Rows with fewer than 2 real tokens
    (nothing to predict) are dropped. Results are cached for the process per (dataset fingerprint, tokenizer,
    arguments), so a simulation tokenises each client once, not every round.

    Example:
        >>> import datasets
        >>> from transformers import AutoTokenizer
        >>> from peft_hetlora.model_source import resolve_tokenizer
        >>> tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer())
        >>> texts = datasets.Dataset.from_dict({"text": ["hello there, how are you?", "fine, thanks"]})
        >>> blocks = tokenize_for_clm(texts, tokenizer, block_size=128)
        >>> blocks.column_names
        ['input_ids', 'attention_mask', 'labels']
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}.")
    if text_column not in dataset.column_names:
        raise KeyError(f"text_column={text_column!r} is not a column; available columns: {dataset.column_names}.")
    options = (block_size, text_column, packing, pad_to_block_size, add_eos)
    key = (dataset._fingerprint, _tokenizer_key(tokenizer), options)
    cached = _TOKENIZED_CACHE.get(key)
    if cached is not None:
        return cached

    pad_id = pad_token_id(tokenizer)
    eos_id = tokenizer.eos_token_id if add_eos else None

    def encode(texts: list[str]) -> list[list[int]]:
        encoded = tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        if eos_id is not None:
            encoded = [ids + [eos_id] if not ids or ids[-1] != eos_id else ids for ids in encoded]
        return encoded

    def finish(rows: list[list[int]]) -> dict[str, list[list[int]]]:
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids in rows:
            ids = ids[:block_size]
            if len(ids) < 2:
                continue
            n_pad = block_size - len(ids) if pad_to_block_size else 0
            out["input_ids"].append(ids + [pad_id] * n_pad)
            out["attention_mask"].append([1] * len(ids) + [0] * n_pad)
            out["labels"].append(list(ids) + [-100] * n_pad)
        return out

    def per_example(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        return finish(encode(batch[text_column]))

    def packed(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        stream = [token for ids in encode(batch[text_column]) for token in ids]
        return finish([stream[i : i + block_size] for i in range(0, len(stream), block_size)])

    if len(dataset) == 0:
        empty = datasets.Dataset.from_dict({name: [] for name in _CLM_FEATURES}, features=_CLM_FEATURES)
        _TOKENIZED_CACHE[key] = empty
        return empty
    fingerprint = hashlib.sha256(f"{key}".encode()).hexdigest()[:16]
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        result = dataset.map(
            packed if packing else per_example,
            batched=True,
            batch_size=None if packing else 1000,
            remove_columns=dataset.column_names,
            new_fingerprint=fingerprint,
            features=_CLM_FEATURES,
            desc="tokenizing",
        )
    finally:
        if bars:
            datasets.enable_progress_bars()
    _TOKENIZED_CACHE[key] = result
    return result


def clear_tokenization_cache() -> None:
    """Forget the tokenised datasets kept by :func:`tokenize_for_clm` (e.g. between independent runs)."""
    _TOKENIZED_CACHE.clear()


@dataclass
class CausalLMCollator:
    """Batch rows of :func:`tokenize_for_clm`: pad to the longest row, ``labels`` padded with -100.

    Works for fixed-length rows too (nothing to pad). Returns ``torch.long`` tensors.

    Example:
        >>> collate = CausalLMCollator(pad_token_id=2)
        >>> batch = collate([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]},
        ...                  {"input_ids": [8, 9], "attention_mask": [1, 1], "labels": [8, 9]}])
        >>> batch["labels"].tolist()
        [[5, 6, 7], [8, 9, -100]]
    """

    pad_token_id: int = 0

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        def as_list(value: Any) -> list[int]:
            return value.tolist() if isinstance(value, torch.Tensor) else list(value)

        width = max(len(as_list(r["input_ids"])) for r in rows)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for row in rows:
            ids = as_list(row["input_ids"])
            mask = as_list(row["attention_mask"]) if "attention_mask" in row else [1] * len(ids)
            labels = as_list(row["labels"]) if "labels" in row else list(ids)
            n_pad = width - len(ids)
            batch["input_ids"].append(ids + [self.pad_token_id] * n_pad)
            batch["attention_mask"].append(mask + [0] * n_pad)
            batch["labels"].append(labels + [-100] * n_pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def corpus_token_stats(dataset: datasets.Dataset, tokenizer: Any, text_column: str = "text") -> dict[str, float]:
    """Token counts of a text dataset (no truncation): ``examples``, ``tokens``, ``mean``, ``p50``, ``p95``, ``max``.

    Example:
        >>> corpus_token_stats(corpus.eval, tokenizer)["tokens"]  # doctest: +SKIP
        61234
    """
    lengths = sorted(len(ids) for ids in tokenizer(list(dataset[text_column]), add_special_tokens=True)["input_ids"])
    if not lengths:
        return {"examples": 0, "tokens": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    return {
        "examples": len(lengths),
        "tokens": sum(lengths),
        "mean": sum(lengths) / len(lengths),
        "p50": lengths[len(lengths) // 2],
        "p95": lengths[min(len(lengths) - 1, math.ceil(0.95 * len(lengths)) - 1)],
        "max": lengths[-1],
    }
