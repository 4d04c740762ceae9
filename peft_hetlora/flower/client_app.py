"""The HetLoRA Flower `ClientApp`: train and evaluate at the node's rank, report a stable client id.

Handlers (Message API):

* ``query``: answers the strategy's identification query with the node's stable client id (node config
  ``client-id``, else ``client-<partition-id>``) and the optional ``max-rank`` its device can train.
* ``train``: builds the base model and data with the pluggable ``task_fn(partition_id, node_config)``, wraps it with
  a HetLoRA adapter allocated at the rank in the message, loads the truncated global adapter, runs a local round with
  `transformers.Trainer` + `HetLoRACallback` (self-pruning included) and replies with only the active components
  (`ArrayRecord`) and a `MetricRecord` (``num-examples``, ``rank-in``, ``rank-out``, ``train-loss``, tail norms).
* ``evaluate``: loss of the received global adapter (at the node's rank) on the task's eval dataset.

Example:
    ```py
    from peft_hetlora.flower import ClientTask, make_client_app

    def task_fn(partition_id, node_config):
        return ClientTask(model=AutoModelForCausalLM.from_pretrained(MODEL_DIR), train_dataset=shards[partition_id])

    app = make_client_app(task_fn)      # referenced as "client_app:app" in pyproject.toml
    ```
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from peft_hetlora.federated.adapter import check_components
from peft_hetlora.federated.upload import encode_state_dict, parse_message_format
from peft_hetlora.utils.errors import RankError
from peft_hetlora.utils.ranks import check_rank

from . import records as rec
from .local_round import LocalTrainingConfig, TaskFn, evaluate_global, train_local_round

logger = logging.getLogger(__name__)

ClientIdFn = Callable[[Mapping[str, Any]], str]
"""``client_id_fn(node_config) -> str``: the stable client id a node reports."""


def _partition_id(context: Context) -> int:
    value = context.node_config.get(rec.PARTITION_ID)
    return int(value) if value is not None else -1


def _settle_heap() -> None:
    """Collect garbage, then freeze the survivors (imports, caches) out of the cyclic collector's scans.

    The Trainer calls ``gc.collect()`` after every local round; in a ClientApp process (a Ray actor or a SuperNode's
    ClientApp process) that scan covers torch's and transformers' hundreds of thousands of long-lived objects, about
    half a second per round on a small model. Collecting first means no garbage is frozen.
    """
    gc.collect()
    gc.freeze()


def _settings(context: Context) -> dict[str, Any]:
    """What a task function sees: the run config (pyproject ``[tool.flwr.app.config]``) under the node config."""
    return {**dict(context.run_config or {}), **dict(context.node_config or {})}


def _check_rank(config: Mapping[str, Any], node_config: Mapping[str, Any]) -> int:
    max_rank = node_config.get(rec.MAX_RANK)
    r_max = int(config[rec.R_MAX]) if rec.R_MAX in config else 1 << 30
    hi = min(r_max, int(max_rank)) if max_rank is not None else r_max
    return check_rank(config[rec.RANK], 1, hi, what="the rank the server asked for",
                      hi_name="this node's max-rank" if max_rank is not None and int(max_rank) < r_max else "r_max",
                      hint="the strategy caps ranks at the max-rank a node reports, so this is a server/strategy "
                           "mismatch")


def _window(config: Mapping[str, Any], rank: int) -> list[int] | None:
    """The window the server assigned (ConfigRecord ``components``), checked; None for the prefix."""
    if rec.COMPONENTS not in config:
        return None
    r_max = int(config[rec.R_MAX]) if rec.R_MAX in config else 1 << 30
    try:
        return list(check_components(list(config[rec.COMPONENTS]), r_max=r_max, budget=rank))
    except RankError as err:
        raise ValueError(f"the server's window is malformed ({err}); a server/strategy mismatch") from None


def make_client_app(
    task_fn: TaskFn,
    *,
    client_id_fn: ClientIdFn | None = None,
    training_defaults: LocalTrainingConfig | None = None,
    message_format: str = "fp32",
) -> ClientApp:
    """A Flower `ClientApp` running HetLoRA local rounds on the model and data `task_fn` builds.

    Args:
        task_fn: ``task_fn(partition_id, node_config) -> ClientTask``; called on every train / evaluate message,
            so build the base model fresh (HetLoRA layers are injected into it). ``partition_id`` is the node config's
            ``partition-id`` (-1 if absent); ``node_config`` is the node config laid over the run config (the app's
            ``[tool.flwr.app.config]``), so a task reads app-wide and per-node settings alike. Keep it cheap to
            pickle: the simulation ships it to every worker.
        client_id_fn: ``client_id_fn(node_config) -> str``, the stable id reported to the strategy (default:
            `peft_hetlora.flower.records.node_client_id`).
        training_defaults: local settings used where the server's train config is silent.
        message_format: how replies are encoded (`peft_hetlora.federated.upload`: "fp32", "bf16", "fp16",
            "int8-block<B>"); declared as ``message-format`` in the reply's ``message`` ConfigRecord (a node config
            ``message-format`` overrides it per node). The strategy checks and decodes it to float32.

    Example:
        ```py
        app = make_client_app(lambda pid, cfg: ClientTask(model=tiny_llama(), train_dataset=data[pid]))
        ```
    """
    default_format = parse_message_format(message_format).name
    app = ClientApp()
    id_fn = client_id_fn or rec.node_client_id
    defaults = training_defaults or LocalTrainingConfig()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        answer: dict[str, Any] = {rec.CLIENT_ID: id_fn(context.node_config)}
        if context.node_config.get(rec.MAX_RANK) is not None:
            answer[rec.MAX_RANK] = int(context.node_config[rec.MAX_RANK])
        return Message(RecordDict({rec.QUERY_KEY: ConfigRecord(answer)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content[rec.CONFIG_KEY]
        client_id = id_fn(context.node_config)
        if config.get(rec.CLIENT_ID) not in (None, client_id):
            raise ValueError(f"Message for client {config[rec.CLIENT_ID]!r} reached node {client_id!r}.")
        rank = _check_rank(config, context.node_config)
        window = _window(config, rank)
        _settle_heap()
        task = task_fn(_partition_id(context), _settings(context))
        global_state = rec.arrays_to_state_dict(msg.content[rec.ARRAYS_KEY])
        out = train_local_round(
            task,
            global_state,
            adapter_config=config[rec.ADAPTER_CONFIG],
            rank=rank,
            training=LocalTrainingConfig.from_config(config, defaults),
            seed=int(config.get(rec.SEED, 0)),
            components=window,
        )
        metrics: dict[str, Any] = {
            rec.NUM_EXAMPLES: out.num_examples,
            rec.RANK_IN: out.rank_in,
            rec.RANK_OUT: out.rank_out,
            "seconds": out.seconds,
        }
        for key, value in (
            (rec.TRAIN_LOSS, out.train_loss),
            (rec.TAIL_NORM_START, out.tail_norm_start),
            (rec.TAIL_NORM_END, out.tail_norm_end),
        ):
            if value is not None:
                metrics[key] = float(value)
        if out.extra.get("components") is not None:
            metrics[rec.COMPONENTS] = [int(j) for j in out.extra["components"]]
        logger.info("client %s round %s: rank %d -> %d, loss %s", client_id, config.get(rec.ROUND), out.rank_in,
                    out.rank_out, out.train_loss)
        fmt = parse_message_format(context.node_config.get(rec.MESSAGE_FORMAT, default_format)).name
        arrays = rec.message_to_arrays(encode_state_dict(out.state_dict, fmt))
        content = RecordDict({rec.ARRAYS_KEY: arrays, rec.METRICS_KEY: MetricRecord(metrics),
                              rec.MESSAGE_KEY: ConfigRecord({rec.MESSAGE_FORMAT: fmt})})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        config = msg.content[rec.CONFIG_KEY]
        rank = _check_rank(config, context.node_config)
        _settle_heap()
        task = task_fn(_partition_id(context), _settings(context))
        settings = LocalTrainingConfig.from_config(config, defaults)
        loss, num_examples = evaluate_global(
            task,
            rec.arrays_to_state_dict(msg.content[rec.ARRAYS_KEY]),
            adapter_config=config[rec.ADAPTER_CONFIG],
            rank=rank,
            batch_size=settings.eval_batch_size,
        )
        metrics = MetricRecord({rec.EVAL_LOSS: float(loss), rec.NUM_EXAMPLES: int(num_examples), rec.RANK: rank})
        return Message(RecordDict({rec.METRICS_KEY: metrics}), reply_to=msg)

    return app
