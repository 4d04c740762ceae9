"""What a Flower deployment needs besides the strategy and the client app: the first global, node -> client id.

Example:
    ```py
    >>> PartitionClientIds(["alice", "bob"])({"partition-id": 1})
    'bob'
    ```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..known_noise import peft_model_warnings
from .local_round import hetlora_config
from .records import CLIENT_ID, PARTITION_ID, federation_adapter_config

__all__ = ["PartitionClientIds", "initial_global_state"]


@dataclass
class PartitionClientIds:
    """``client_id_fn`` mapping a node's ``partition-id`` to ``client_ids[partition-id]`` (a ``client-id`` wins).

    Example:
        ```py
        >>> ids = PartitionClientIds(["alice", "bob"])
        >>> ids({"partition-id": 0}), ids({"partition-id": 1, "client-id": "carol"})
        ('alice', 'carol')
        ```
    """

    client_ids: Sequence[str]

    def __call__(self, node_config: Mapping[str, Any]) -> str:
        if node_config.get(CLIENT_ID):
            return str(node_config[CLIENT_ID])
        return str(self.client_ids[int(node_config[PARTITION_ID])])


def initial_global_state(model: nn.Module, adapter_config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fresh global adapter at r_max (PEFT's init: A random, B zero), seeded; PEFT saved keys, float32.

    Example:
        ```py
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from peft_hetlora import HetLoRAConfig
        >>> tiny = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                                     num_hidden_layers=1, num_attention_heads=2))
        >>> sd = initial_global_state(tiny, HetLoRAConfig(r=4, target_modules=["q_proj"]))
        >>> sorted({tuple(v.shape) for v in sd.values()})
        [(4, 16), (16, 4)]
        >>> float(sum(v.abs().sum() for k, v in sd.items() if "lora_B" in k))  # B starts at zero
        0.0
        ```
    """
    from peft import get_peft_model, get_peft_model_state_dict

    config = federation_adapter_config(adapter_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with peft_model_warnings():
            peft_model = get_peft_model(model, hetlora_config(config, int(config["r"])))
    state = get_peft_model_state_dict(peft_model)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
