"""What a federated arm's round row measures beyond the coordinator's summary, one source for both engines (the
in-process runner and ``--engine flower``): the model each client holds of a global (`held_rank`), the bytes the
participants download (`held_download_bytes`), the clients' validation perplexity on the model they hold
(`held_validation_ppl`) and the payload bytes of an upload in its message format (`message_payload_bytes`).

Example:
    ```py
    >>> import torch
    >>> held_rank({"aggregation": "hetlora"}, 8, 2), held_rank({"selection": "coverage"}, 8, 2)
    (2, 8)
    >>> state = {"m.lora_A.weight": torch.zeros(8, 5), "m.lora_B.weight": torch.zeros(3, 8)}
    >>> held_download_bytes(state, {}, 8, {"a": 2, "b": 8}) == 4 * (2 * (5 + 3) + 8 * (5 + 3))
    True
    ```
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from peft import get_peft_model, set_peft_model_state_dict

from peft_hetlora.federated import truncate
from peft_hetlora.federated.adapter import core_rank
from peft_hetlora.federated.upload import encode_state_dict, payload_nbytes
from peft_hetlora.known_noise import peft_model_warnings

from .seed_stats import FIXED_VAL  # the rows' column of the fixed federation validation set

__all__ = [
    "FIXED_VAL",
    "HELD",
    "fixed_val_columns",
    "arm_peft_model",
    "held_download_bytes",
    "held_rank",
    "held_validation_ppl",
    "load_global",
    "message_payload_bytes",
]

#: ``client_val_model`` of a row whose client validation and download bytes follow `held_rank`; rows without it
#: come from versions that measured window clients on their rank-k prefix (`runner.refresh_window_rows` redoes them)
HELD = "held"


@contextlib.contextmanager
def arm_peft_model(wb: Any, adapter_config: Any, seed: int) -> Iterator[Any]:
    """The arm's PEFT model on the workbench's base model (``wb.base_model``), unloaded back into it on exit.

    Example:
        ```py
        >>> with arm_peft_model(wb, arm_adapter_config(config, 8, wb), seed=0) as model:  # doctest: +SKIP
        ...     load_global(model, weights, 8)
        ```
    """
    torch.manual_seed(seed)
    with peft_model_warnings():  # transformers' is_gradient_checkpointing notice, raised inside PEFT
        model = get_peft_model(wb.base_model, adapter_config)
    try:
        yield model
    finally:
        wb.base_model = model.unload()


def load_global(model: Any, weights: Mapping[str, torch.Tensor], rank: int) -> None:
    """Load a global adapter's first `rank` components into the simulation's model (`arm_peft_model`).

    Example:
        ```py
        >>> load_global(model, load_file("store/rounds/1/global/adapter_model.safetensors"), 4)  # doctest: +SKIP
        ```
    """
    model.base_model.set_rank(rank)
    set_peft_model_state_dict(model, truncate(dict(weights), rank))


def held_rank(spec: Mapping[str, Any], r_arm: int, client_rank: int, dims: Any = None) -> int:
    """How many components of the global a client downloads and serves: its own rank under the prefix rules
    (HetLoRA, RBLA, FlexLoRA), all ``r_arm`` in a window arm, where the components outside its window stay frozen
    in its model (docs/design.md#component-rule). A core client below ``r_arm`` (docs/methods.md#core-clients)
    downloads the whole global (its bases and their seed come from all of it) and serves the top ``r_c``
    (``core_rank`` of the module ``dims``).

    Example:
        ```py
        >>> held_rank({"client_training": "core"}, 8, 2)  # a core client downloads the whole global
        8
        ```
    """
    if spec.get("selection", "prefix") != "prefix":
        return r_arm
    if spec.get("client_training") == "core" and client_rank < r_arm:
        return r_arm if dims is None else core_rank(client_rank, r_arm, dims)
    return client_rank


def _float32_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * 4 for t in state.values())


def held_download_bytes(
    sent: Mapping[str, torch.Tensor], spec: Mapping[str, Any], r_arm: int, ranks: Mapping[str, int]
) -> int:
    """Float32 bytes the clients ``{client: rank}`` download of the global `sent` (`held_rank` of each).

    Example:
        ```py
        >>> global_state = {"m.lora_A.weight": torch.zeros(4, 3), "m.lora_B.weight": torch.zeros(2, 4)}
        >>> held_download_bytes(global_state, {}, 4, {"a": 1})  # A: 1 x 3, B: 2 x 1 float32s
        20
        ```
    """
    return sum(_float32_bytes(truncate(dict(sent), held_rank(spec, r_arm, rank))) for rank in ranks.values())


def held_validation_ppl(
    wb: Any,
    model: Any,
    weights: Mapping[str, torch.Tensor],
    spec: Mapping[str, Any],
    r_arm: int,
    ranks: Mapping[str, int],
) -> float | None:
    """Mean validation perplexity of the clients ``{client: rank}`` on the model each holds of the global `weights`
    (``wb.validation_ppl``); None without clients.

    Example:
        ```py
        >>> held_validation_ppl(wb, model, weights, ARMS["hetlora"], 8, {"c1": 2, "c2": 8})  # doctest: +SKIP
        57.3
        ```
    """
    val = []
    dims = [(layer.in_features, layer.out_features) for _, layer in model.base_model.hetlora_layers()]
    for cid, rank in ranks.items():
        load_global(model, weights, held_rank(spec, r_arm, rank, dims))
        val.append(wb.validation_ppl(model, cid))
    return sum(val) / len(val) if val else None


def fixed_val_columns(wb: Any, model: Any, enabled: bool, *, initial: bool = False) -> dict[str, float]:
    """A round row's fixed-validation columns: `FIXED_VAL` (the loaded global on the fixed federation validation set)
    and its cost ``fixed_val_s``; round 0 (``initial``) reuses the seed's base-model value and records no cost.
    Empty when ``enabled`` is false (``SimulationConfig.fixed_validation``). Call it before anything reloads other
    ranks into ``model``.

    Example:
        ```py
        >>> row = {"round": 3, **fixed_val_columns(wb, model, True)}  # doctest: +SKIP
        ```
    """
    if not enabled:
        return {}
    if initial:
        return {FIXED_VAL: wb.initial_fixed_val_ppl(model)}
    started = time.perf_counter()
    value = wb.fixed_validation_ppl(model)
    return {FIXED_VAL: value, "fixed_val_s": time.perf_counter() - started}


def message_payload_bytes(state_dict: Mapping[str, torch.Tensor], message_format: str) -> int:
    """Tensor bytes of `state_dict` sent as a `message_format` message (`upload.payload_nbytes` of its encoding, as
    `client_uploads.UploadTransform.payload_bytes` counts a message it sends); a validated update's decoded float32
    tensors give the bytes the client sent (the encoding's shapes and dtypes follow the tensors' shapes alone).

    Example:
        ```py
        >>> state = {"m.lora_A.weight": torch.ones(2, 64)}
        >>> message_payload_bytes(state, "fp32"), message_payload_bytes(state, "bf16")
        (512, 256)
        ```
    """
    return payload_nbytes(encode_state_dict(dict(state_dict), message_format))
