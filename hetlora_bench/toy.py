"""A tokenizer-free toy task for quick Flower runs, tests and benchmarks: a tiny random Llama, per-client tokens.

Each client's sequences follow its own random sparse bigram table (natural non-IID data with something to learn),
so losses fall during local rounds and clients differ. Nothing is downloaded.

Example:
    ```py
    >>> task = ToyTask(num_examples=8, seq_len=16)(partition_id=3, node_config={})
    >>> len(task.train_dataset), task.train_dataset[0]["input_ids"].shape
    (8, torch.Size([16]))
    ```
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peft_hetlora.flower.local_round import ClientTask

TOY_TARGET_MODULES = ["q_proj", "v_proj"]


def tiny_llama(seed: int = 0, vocab_size: int = 96, hidden_size: int = 32, num_hidden_layers: int = 2) -> nn.Module:
    """A freshly initialised tiny Llama (2 layers, hidden size 32, GQA, tied embeddings); same seed, same weights.

    Example:
        ```py
        >>> tiny_llama().config.num_hidden_layers
        2
        ```
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 3 // 2,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True, use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


class TokenDataset(torch.utils.data.Dataset):
    """Fixed token sequences as causal-LM examples (``input_ids``, ``attention_mask``, ``labels``)."""

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.tokens[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def bigram_tokens(num_examples: int, seq_len: int, vocab_size: int, seed: int, branching: int = 4) -> torch.Tensor:
    """``(num_examples, seq_len)`` token ids from a random sparse bigram table seeded by `seed`.

    Example:
        ```py
        >>> bigram_tokens(2, 5, 96, seed=0).shape
        torch.Size([2, 5])
        ```
    """
    gen = torch.Generator().manual_seed(int(seed))
    table = torch.randint(0, vocab_size, (vocab_size, branching), generator=gen)
    out = torch.empty(num_examples, seq_len, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab_size, (num_examples,), generator=gen)
    for j in range(1, seq_len):
        pick = torch.randint(0, branching, (num_examples,), generator=gen)
        out[:, j] = table[out[:, j - 1], pick]
    return out


@dataclass
class ToyTask:
    """``task_fn(partition_id, node_config) -> ClientTask`` on the tiny Llama with per-client bigram data.

    Args:
        num_examples: training sequences per client.
        eval_examples: held-out sequences per client (0: none).
        seq_len, vocab_size: sequence length and vocabulary (must match the model's).
        model_seed: seed of the base model weights (all clients share the base model).
        data_seed: salt of the clients' data seeds.
        model_fn: builds the base model (default: `tiny_llama` with ``model_seed`` and ``vocab_size``).
        fail_partitions: partitions whose task raises (simulated device failures, for demos and tests).

    Example:
        ```py
        >>> ToyTask(num_examples=4)(0, {}).num_examples is None
        True
        ```
    """

    num_examples: int = 16
    eval_examples: int = 0
    seq_len: int = 32
    vocab_size: int = 96
    model_seed: int = 0
    data_seed: int = 0
    model_fn: Callable[[], nn.Module] | None = None
    fail_partitions: tuple[int, ...] = ()

    def dataset(self, partition_id: int, split: str = "train") -> TokenDataset:
        """The client's examples; ``split="eval"`` gives held-out ones from the same bigram table."""
        seed = 1_000_003 * (self.data_seed + 1) + int(partition_id)
        n = self.num_examples + self.eval_examples
        tokens = bigram_tokens(n, self.seq_len, self.vocab_size, seed)
        return TokenDataset(tokens[: self.num_examples] if split == "train" else tokens[self.num_examples :])

    def __call__(self, partition_id: int, node_config: Mapping[str, Any]) -> ClientTask:
        if partition_id in self.fail_partitions:
            raise RuntimeError(f"simulated device failure on partition {partition_id}")
        model = self.model_fn() if self.model_fn is not None else tiny_llama(self.model_seed, self.vocab_size)
        return ClientTask(
            model=model,
            train_dataset=self.dataset(partition_id, "train"),
            eval_dataset=self.dataset(partition_id, "eval") if self.eval_examples else None,
        )
