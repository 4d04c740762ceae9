"""One client's local HetLoRA round with `transformers.Trainer`, shared by the Flower `ClientApp` and the in-process
reference run (so both train exactly alike).

A round: build the HetLoRA model at the client's rank (parameters allocated at that rank), load the truncated
global adapter, train `local_steps` optimizer steps with `HetLoRACallback` (regulariser bookkeeping and self-pruning),
and return only the active components with the round's metrics.

Example:
    ```py
    >>> task = ClientTask(model=base_model, train_dataset=ds)  # doctest: +SKIP
    >>> out = train_local_round(task, truncate(global_sd, 4), adapter_config=config, rank=4,
    ...                         training=LocalTrainingConfig(local_steps=5), seed=0)  # doctest: +SKIP
    >>> out.rank_out, out.num_examples  # doctest: +SKIP
    (3, 120)
    ```
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# LocalTrainingConfig field -> ConfigRecord key
_CONFIG_KEYS = {
    "local_steps": "local-steps",
    "batch_size": "batch-size",
    "learning_rate": "learning-rate",
    "gradient_accumulation_steps": "gradient-accumulation-steps",
    "weight_decay": "weight-decay",
    "max_grad_norm": "max-grad-norm",
    "lr_scheduler_type": "lr-scheduler-type",
    "warmup_steps": "warmup-steps",
    "prune": "prune",
    "nested": "nested",
    "eval_batch_size": "eval-batch-size",
    "bf16": "bf16",
    "use_cpu": "use-cpu",
}


@dataclass
class ClientTask:
    """What a client trains: a freshly built base model (no adapter yet) and its data.

    The `ClientApp` asks a task function ``task_fn(partition_id, node_config) -> ClientTask`` for one on every
    message, so build the model fresh each time (HetLoRA layers are injected into it).

    Args:
        model: the base causal LM (no PEFT adapter).
        train_dataset: a map-style dataset of examples the collator turns into ``input_ids`` / ``labels`` batches.
        eval_dataset: optional held-out examples for federated evaluation.
        data_collator: batches examples (default: `transformers.default_data_collator`).
        num_examples: the data-size weight ``n_k`` (default: ``len(train_dataset)``).

    Example:
        ```py
        task = ClientTask(model=tiny_llama(), train_dataset=my_dataset)
        ```
    """

    model: nn.Module
    train_dataset: Any = None
    eval_dataset: Any = None
    data_collator: Callable[[list], dict[str, torch.Tensor]] | None = None
    num_examples: int | None = None


TaskFn = Callable[[int, Mapping[str, Any]], ClientTask]
"""``task_fn(partition_id, node_config) -> ClientTask``: builds one client's model and data."""


@dataclass
class LocalTrainingConfig:
    """Settings of a local round, defined once: the Flower `ClientApp` trains with them (the server sends them in
    the train `ConfigRecord`, keys with dashes) and so does the simulator (``hetlora simulate``, both engines:
    `hetlora_bench.arms.SimulationConfig.training`).

    ``prune``: self-pruning (`HetLoRACallback`); ``nested``: nested-prefix training (every optimizer step trains a
    random prefix; False follows the adapter config's ``nested``).

    Example:
        ```py
        >>> cfg = LocalTrainingConfig(local_steps=3, learning_rate=1e-3)
        >>> LocalTrainingConfig.from_config(cfg.to_config()) == cfg
        True
        ```
    """

    local_steps: int = 5
    batch_size: int = 4
    learning_rate: float = 3e-4
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    prune: bool = True
    nested: bool = False
    eval_batch_size: int = 8
    bf16: bool = False
    use_cpu: bool = False

    def to_config(self) -> dict[str, Any]:
        """The settings as `ConfigRecord` entries (``local-steps``, ``batch-size``, ...)."""
        return {key: getattr(self, name) for name, key in _CONFIG_KEYS.items()}

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], defaults: LocalTrainingConfig | None = None
    ) -> LocalTrainingConfig:
        """Settings from a `ConfigRecord` (missing keys keep `defaults`' values)."""
        base = defaults if defaults is not None else cls()
        values = {}
        for f in dataclasses.fields(cls):
            key = _CONFIG_KEYS[f.name]
            if key in config:
                default = getattr(base, f.name)
                values[f.name] = type(default)(config[key])
        return dataclasses.replace(base, **values)


@dataclass
class LocalRoundResult:
    """A client's upload after a local round: the active components and the round's metrics."""

    state_dict: dict[str, torch.Tensor]
    num_examples: int
    rank_in: int
    rank_out: int
    train_loss: float | None
    tail_norm_start: float | None
    tail_norm_end: float | None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def hetlora_config(adapter_config: Any, rank: int):
    """A `HetLoRAConfig` for a client of rank `rank` from the federation's config (object, dict or JSON text).

    Example:
        ```py
        >>> import peft_hetlora
        >>> hetlora_config({"peft_type": "HETLORA", "r": 8, "target_modules": ["q"]}, 2).rank
        2
        ```
    """
    import peft_hetlora  # noqa: F401 - registers the HETLORA type
    from peft_hetlora.config import HetLoRAConfig

    if isinstance(adapter_config, str):
        data = json.loads(adapter_config)
    elif hasattr(adapter_config, "to_dict"):
        data = adapter_config.to_dict()
    else:
        data = dict(adapter_config)
    data = {k: v for k, v in data.items() if k not in ("peft_type", "auto_mapping", "peft_version")}
    data["rank"] = int(rank)
    data["inference_mode"] = False
    known = {f.name for f in dataclasses.fields(HetLoRAConfig)}
    return HetLoRAConfig(**{k: v for k, v in data.items() if k in known})


def build_client_model(base_model: nn.Module, adapter_config: Any, rank: int, state_dict: Mapping[str, torch.Tensor]):
    """Wrap `base_model` with a HetLoRA adapter allocated at `rank` and load the (truncated) global `state_dict`.

    Raises:
        ValueError: the global adapter's modules differ from the model's, or it is below `rank`.

    Example:
        ```py
        >>> model = build_client_model(tiny_llama(), config, 4, truncate(global_sd, 4))  # doctest: +SKIP
        >>> model.get_rank()  # doctest: +SKIP
        4
        ```
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from peft_hetlora.federated.adapter import lora_module_names, truncate

    from ..known_noise import peft_model_warnings

    with peft_model_warnings():  # transformers' is_gradient_checkpointing notice, raised inside PEFT
        model = get_peft_model(base_model, hetlora_config(adapter_config, rank))
    ours = set(lora_module_names(get_peft_model_state_dict(model)))
    theirs = set(lora_module_names(state_dict))
    if ours != theirs:
        raise ValueError(
            f"The global adapter does not fit this model: modules only in the global {sorted(theirs - ours)[:3]}, "
            f"only in the model {sorted(ours - theirs)[:3]}. Build the client model from the federation's base model "
            "and target_modules."
        )
    set_peft_model_state_dict(model, truncate(state_dict, int(rank)))
    return model


def _collator(task: ClientTask):
    if task.data_collator is not None:
        return task.data_collator
    from transformers import default_data_collator

    return default_data_collator


def train_local_round(
    task: ClientTask,
    global_state: Mapping[str, torch.Tensor],
    *,
    adapter_config: Any,
    rank: int,
    training: LocalTrainingConfig | None = None,
    seed: int = 0,
    components: Sequence[int] | None = None,
) -> LocalRoundResult:
    """Run one local HetLoRA round with `transformers.Trainer` + `HetLoRACallback` and return the upload.

    Args:
        task: the client's base model and data.
        global_state: the global adapter (at least `rank` components per module; truncated here).
        adapter_config: the federation's HETLORA config (object, dict or JSON text).
        rank: this client's rank for the round.
        training: local steps, batch size, learning rate, ... (default `LocalTrainingConfig()`).
        seed: Trainer seed (weights of new parts, data order); same seed, same round.
        components: a window (docs/design.md#component-rule): train exactly these global components of the whole
        ``global_state``
            with the other components frozen as factors (`HetLoRAModel.set_components`); ``rank`` must be
            ``len(components)``. ``extra["components"]`` then holds the global index of each uploaded slot.

    Returns:
        `LocalRoundResult` with only the first ``rank_out`` components (float32, CPU).

    Example:
        ```py
        >>> out = train_local_round(task, global_sd, adapter_config=config, rank=4)  # doctest: +SKIP
        ```
    """
    from peft import get_peft_model_state_dict
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from trainer_callbacks import HetLoRACallback

    training = training or LocalTrainingConfig()
    if task.train_dataset is None:
        raise ValueError("The client task has no train_dataset; return one from the task function.")
    started = time.perf_counter()
    model = build_client_model(task.model, adapter_config, rank, global_state)
    if components is not None:
        if len(components) != rank:
            raise ValueError(f"components {list(components)} must list exactly rank={rank} global indices.")
        model.base_model.set_components(sorted(int(j) for j in components), global_state, frozen="factors")
    callback = HetLoRACallback(prune=training.prune, nested=True if training.nested else None)
    out_dir = tempfile.mkdtemp(prefix="hetlora-flower-")
    try:
        args = TrainingArguments(
            output_dir=out_dir,
            max_steps=training.local_steps,
            per_device_train_batch_size=training.batch_size,
            gradient_accumulation_steps=training.gradient_accumulation_steps,
            learning_rate=training.learning_rate,
            weight_decay=training.weight_decay,
            max_grad_norm=training.max_grad_norm,
            lr_scheduler_type=training.lr_scheduler_type,
            warmup_steps=training.warmup_steps,
            seed=seed,
            data_seed=seed,
            bf16=training.bf16,
            use_cpu=training.use_cpu,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available() and not training.use_cpu,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=task.train_dataset,
            data_collator=_collator(task),
            callbacks=[callback],
        )
        for quiet in (PrinterCallback, ProgressCallback):  # no per-client console output
            trainer.remove_callback(quiet)
        output = trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    state = get_peft_model_state_dict(model)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    summary = callback.last_round
    extra: dict[str, Any] = {}
    if components is not None:
        trained = model.base_model.peft_config[model.active_adapter].components
        extra["components"] = [int(j) for j in trained]  # pruning drops the window's tail
    num_examples = task.num_examples if task.num_examples is not None else len(task.train_dataset)
    loss = float(output.training_loss) if output.training_loss is not None else None
    return LocalRoundResult(
        state_dict=state,
        num_examples=int(num_examples),
        rank_in=int(summary.get("rank_in", rank)),
        rank_out=int(summary.get("rank_out", rank)),
        train_loss=loss if loss is None or math.isfinite(loss) else None,
        tail_norm_start=summary.get("tail_norm_start"),
        tail_norm_end=summary.get("tail_norm_end"),
        seconds=time.perf_counter() - started,
        extra=extra,
    )


@torch.no_grad()
def evaluate_adapter(
    model: nn.Module, dataset: Any, *, batch_size: int = 8, data_collator: Callable | None = None
) -> tuple[float, int]:
    """Token-weighted mean causal-LM loss of `model` on `dataset`; returns ``(loss, num_examples)``.

    Example:
        ```py
        >>> loss, n = evaluate_adapter(peft_model, eval_ds)  # doctest: +SKIP
        ```
    """
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=data_collator or default_data_collator)
    total, tokens, examples = 0.0, 0, 0
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = model(**batch)
        labels = batch.get("labels")
        count = int((labels[:, 1:] != -100).sum()) if labels is not None else 1
        total += float(out.loss) * count
        tokens += count
        examples += int(batch["input_ids"].shape[0])
    if tokens == 0:
        raise ValueError("The evaluation dataset holds no label tokens; give it examples with `labels`.")
    return total / tokens, examples


def evaluate_global(
    task: ClientTask,
    global_state: Mapping[str, torch.Tensor],
    *,
    adapter_config: Any,
    rank: int,
    batch_size: int = 8,
    dataset: Any = None,
) -> tuple[float, int]:
    """Loss of the global adapter truncated to `rank` on `dataset` (default: the task's eval dataset).

    Example:
        ```py
        >>> loss, n = evaluate_global(task, global_sd, adapter_config=config, rank=8)  # doctest: +SKIP
        ```
    """
    dataset = dataset if dataset is not None else task.eval_dataset
    if dataset is None:
        raise ValueError("No evaluation dataset: give the client task an eval_dataset (or pass dataset=).")
    model = build_client_model(task.model, adapter_config, rank, global_state)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return evaluate_adapter(model, dataset, batch_size=batch_size, data_collator=task.data_collator)
