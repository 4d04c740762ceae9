"""What travels in Flower messages between `HetLoRAStrategy` and the HetLoRA `ClientApp`.

Every message carries one `RecordDict`:

* server -> node, train / evaluate: ``"arrays"`` (`ArrayRecord`: the global adapter truncated to the node's rank,
  PEFT saved-key format, float32) and ``"config"`` (`ConfigRecord`): ``client-id``, ``round``, ``rank``, ``r-max``,
  ``r-min``, ``adapter-config`` (the federation's HETLORA `adapter_config.json` as a JSON string), ``seed`` and the
  local training settings of :class:`~peft_hetlora.flower.local_round.LocalTrainingConfig`.
* node -> server, train: ``"arrays"`` (only the active components, at ``rank-out``) and ``"metrics"``
  (`MetricRecord`): ``num-examples``, ``rank-in``, ``rank-out``, ``train-loss``, ``tail-norm-start``,
  ``tail-norm-end``.
* server -> node, query ``"hetlora"``: the node answers a ``"hetlora"`` `ConfigRecord` with its stable
  ``client-id`` (from its node config: ``client-id``, else ``client-<partition-id>``) and, optionally, the
  ``max-rank`` its device can train.

Example:
    ```py
    >>> import torch
    >>> record = state_dict_to_arrays({"m.lora_A.weight": torch.ones(2, 3)})
    >>> arrays_to_state_dict(record)["m.lora_A.weight"].shape
    torch.Size([2, 3])
    ```
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..federated.stores import json_text

if TYPE_CHECKING:  # flwr is needed only by the functions that build or read Flower records
    from flwr.app import ArrayRecord

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
QUERY_KEY = "hetlora"

CLIENT_ID = "client-id"
PARTITION_ID = "partition-id"
MAX_RANK = "max-rank"
ROUND = "round"
RANK = "rank"
R_MAX = "r-max"
R_MIN = "r-min"
ADAPTER_CONFIG = "adapter-config"
SEED = "seed"
METHOD = "method"
MESSAGE_KEY = "message"  # a reply's ConfigRecord describing its encoding
MESSAGE_FORMAT = "message-format"  # ... its declared compressed format (in the MESSAGE_KEY ConfigRecord)
COMPONENTS = "components"  # a window client's global components: ConfigRecord to it, MetricRecord back

NUM_EXAMPLES = "num-examples"
RANK_IN = "rank-in"
RANK_OUT = "rank-out"
TRAIN_LOSS = "train-loss"
TAIL_NORM_START = "tail-norm-start"
TAIL_NORM_END = "tail-norm-end"
EVAL_LOSS = "eval-loss"


def state_dict_to_arrays(state_dict: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An adapter state dict as a Flower `ArrayRecord` (float32 on CPU; numpy has no bfloat16).

    Example:
        ```py
        >>> import torch
        >>> list(state_dict_to_arrays({"x": torch.zeros(1, dtype=torch.bfloat16)})["x"].shape)
        [1]
        ```
    """
    from flwr.app import ArrayRecord

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    return ArrayRecord(tensors)


def arrays_to_state_dict(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of an `ArrayRecord` (numpy-serialised, never pickled) as a plain state dict.

    Example:
        ```py
        >>> import torch
        >>> sorted(arrays_to_state_dict(state_dict_to_arrays({"b": torch.ones(1), "a": torch.ones(1)})))
        ['a', 'b']
        ```
    """
    return {key: torch.from_numpy(record[key].numpy().copy()) for key in record}


def message_to_arrays(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An encoded message (`compression.encode_state_dict`) as an `ArrayRecord`, its dtypes kept.

    numpy has no bfloat16, so bf16 tensors travel as their int16 bit patterns; `arrays_to_message` views them back
    (the declared format says which). Payload bytes equal the encoded message's.

    Example:
        ```py
        >>> import torch
        >>> from peft_hetlora.federated.upload import encode_state_dict
        >>> record = message_to_arrays(encode_state_dict({"w": torch.ones(4)}, "bf16"))
        >>> arrays_to_message(record, "bf16")["w"].dtype
        torch.bfloat16
        ```
    """
    from flwr.app import ArrayRecord

    out = {}
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        out[key] = value.view(torch.int16) if value.dtype == torch.bfloat16 else value
    return ArrayRecord(out)


def arrays_to_message(record: ArrayRecord, message_format: str) -> dict[str, torch.Tensor]:
    """The encoded tensors of a reply declared as `message_format` (bf16: int16 bit patterns viewed as bfloat16).

    Only the view is done here; whether the dtypes, keys and scales match the declaration is validation's check.
    """
    from peft_hetlora.federated.upload import parse_message_format

    tensors = arrays_to_state_dict(record)
    if parse_message_format(message_format).kind == "bf16":
        tensors = {k: v.view(torch.bfloat16) if v.dtype == torch.int16 else v for k, v in tensors.items()}
    return tensors


def adapter_config_json(config: Any) -> str:
    """A PEFT config (object or dict) as the JSON text of its `adapter_config.json` (sets become sorted lists).

    Example:
        ```py
        >>> import peft_hetlora
        >>> json.loads(adapter_config_json(peft_hetlora.HetLoRAConfig(r=8, target_modules=["q"])))["peft_type"]
        'HETLORA'
        ```
    """
    data = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    for key, value in list(data.items()):
        if isinstance(value, (set, frozenset)):
            data[key] = sorted(value)
        elif hasattr(value, "value") and type(value).__module__.startswith("peft"):
            data[key] = value.value
    return json_text(data, sort_keys=True, default=str)


def federation_adapter_config(config: Any, r_min: int | None = None) -> dict[str, Any]:
    """The federation's HETLORA `adapter_config.json` dict (rank = r = r_max) from a config object, dict or JSON text.

    This is what the strategy sends to clients and publishes with every global adapter.

    Example:
        ```py
        >>> import peft_hetlora
        >>> cfg = federation_adapter_config(peft_hetlora.HetLoRAConfig(r=8, rank=2, target_modules=["q"]), r_min=2)
        >>> cfg["r"], cfg["rank"], cfg["r_min"]
        (8, 8, 2)
        ```
    """
    from peft_hetlora.federated.settings import global_adapter_config
    from peft_hetlora.utils.ranks import check_rank

    data = json.loads(config) if isinstance(config, str) else json.loads(adapter_config_json(config))
    r_max = int(data["r"])
    r_min = int(r_min if r_min is not None else data.get("r_min", 1))
    check_rank(r_min, 1, r_max, what="r_min", hi_name="r_max")
    return global_adapter_config({**data, "peft_type": "HETLORA"}, r_max=r_max, r_min=r_min)


def local_seed(seed: int, client_id: str, round_idx: int) -> int:
    """The seed of one client's local round: depends only on (seed, client id, round), in [0, 2**31).

    Example:
        ```py
        >>> local_seed(0, "a", 1) == local_seed(0, "a", 1) != local_seed(0, "a", 2)
        True
        ```
    """
    digest = hashlib.sha256(f"{seed}:{client_id}:{round_idx}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def node_client_id(node_config: Mapping[str, Any]) -> str:
    """The stable client id a node reports: node config ``client-id``, else ``client-<partition-id>``.

    Raises:
        ValueError: the node config has neither (start the SuperNode with
            ``--node-config "client-id='alice'"`` or ``"partition-id=3 num-partitions=10"``).

    Example:
        ```py
        >>> node_client_id({"partition-id": 3, "num-partitions": 10})
        'client-3'
        ```
    """
    if node_config.get(CLIENT_ID) not in (None, ""):
        return str(node_config[CLIENT_ID])
    if node_config.get(PARTITION_ID) is not None:
        return f"client-{int(node_config[PARTITION_ID])}"
    raise ValueError(
        "This node has no stable client id: start the SuperNode with --node-config \"client-id='alice'\" "
        "(or \"partition-id=3 num-partitions=10\"), so its rank and history follow it across rounds."
    )
