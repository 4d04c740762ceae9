"""Multi-process clients (`torchrun`, `accelerate launch`): one upload per client per round.

Every process of a multi-process client trains its share of the batch; the adapter is the same on all of
them after each optimizer step (DDP all-reduces the gradients). The main process alone talks to the store
for writes, and the others follow its view: `agree(value)` is the main process's `value` on every process
(a broadcast when `torch.distributed` is initialised, the value itself otherwise).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerState, TrainingArguments


def distributed() -> bool:
    """Whether this process is one of several joined by `torch.distributed`.

    Example:
        ```py
        >>> distributed()  # a plain Python process
        False
        ```
    """
    return torch.distributed.is_available() and torch.distributed.is_initialized() and (
        torch.distributed.get_world_size() > 1
    )


def is_main_process(state: TrainerState | None = None) -> bool:
    """The process that uploads: the Trainer's `state.is_world_process_zero` (rank 0 of `torch.distributed`).

    Example:
        ```py
        >>> is_main_process()
        True
        ```
    """
    if state is not None:
        return bool(state.is_world_process_zero)
    return not distributed() or torch.distributed.get_rank() == 0


def agree(value: Any) -> Any:
    """The main process's `value` on every process (a barrier too); `value` itself in a single process.

    `value` must be picklable; the other processes' values are ignored.

    Example:
        ```py
        >>> agree((3, False))
        (3, False)
        ```
    """
    if not distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def is_sharded_training(args: TrainingArguments) -> str | None:
    """'DeepSpeed' or 'FSDP' when `args` (or the `accelerate launch` environment) shards the model, else None.

    Example:
        ```py
        >>> is_sharded_training(TrainingArguments("out", use_cpu=True, report_to=[]))  # None: plain DDP is fine
        ```
    """
    env = os.environ
    if getattr(args, "deepspeed", None) or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return "DeepSpeed"
    if getattr(args, "fsdp", None) or env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "FSDP"
    return None


def refuse_sharded_training(args: TrainingArguments) -> None:
    """Raise `NotImplementedError` for DeepSpeed / FSDP clients (see `is_sharded_training`).

    Under ZeRO-3 and FSDP each process holds a shard of the adapter, so the callback's reads and writes of
    the adapter (loading the global, pruning, the upload) would see shards; ZeRO-2 keeps whole parameters
    but is not tested here. Plain DDP (`torchrun`, `accelerate launch --multi_gpu`) is supported.

    Example:
        ```py
        >>> refuse_sharded_training(TrainingArguments("out", use_cpu=True, report_to=[]))
        ```
    """
    kind = is_sharded_training(args)
    if kind is not None:
        raise NotImplementedError(
            f"FederatedClientCallback does not support {kind} (its processes hold shards of the adapter, so "
            "loading the global, pruning and the upload would see shards; not tested). Train the client with "
            "plain data parallelism instead: `torchrun --nproc_per_node N script.py` or "
            "`accelerate launch --multi_gpu --num_processes N script.py`; a HetLoRA adapter is small enough to be "
            "replicated on every GPU (shard only the frozen base, e.g. with a quantised base)."
        )
