"""`HetLoRACallback`: the local side of one HetLoRA round inside any `transformers.Trainer`."""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from peft_hetlora.model import HetLoRAModel

logger = logging.getLogger(__name__)


def hetlora_peft_model(model: Any) -> Any:
    """The HetLoRA `PeftModel` inside `model` (possibly wrapped by accelerate, DDP or torch.compile).

    Raises a `TypeError` naming what was found when `model` is not a HetLoRA PeftModel.

    Example:
        ```py
        >>> peft_model = hetlora_peft_model(trainer.model_wrapped)  # doctest: +SKIP
        ```
    """
    seen = model
    for _ in range(4):  # DDP / accelerate / torch.compile wrappers
        if isinstance(getattr(seen, "base_model", None), HetLoRAModel):
            return seen
        seen = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if seen is None:
            break
    raise TypeError(
        f"HetLoRA callbacks need a HetLoRA PeftModel, got {type(model).__name__}. Build it with "
        "`get_peft_model(base_model, peft_hetlora.HetLoRAConfig(...))` (after `import peft_hetlora`)."
    )


def hetlora_tuner(model: Any) -> HetLoRAModel:
    """The `HetLoRAModel` tuner of a HetLoRA PeftModel (see `hetlora_peft_model`)."""
    return hetlora_peft_model(model).base_model


def reset_optimizer_state(optimizer: Any) -> None:
    """Drop optimizer moments so each round starts fresh (FL practice) while keeping the param groups."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    state = getattr(inner, "state", None)
    if state is not None:
        state.clear()


#: the attribute under which a callback's round start travels in a checkpoint's `trainer_state.json`
#: (`stateful_callbacks[<callback class name>]["attributes"]`)
ROUND_START = "hetlora_round"


def checkpoint_round_start(state: TrainerState, name: str) -> dict[str, Any] | None:
    """The round start a `name` callback stored in the checkpoint `state` was restored from, or None.

    The Trainer writes every `ExportableState` callback's `state()` into each checkpoint's
    `trainer_state.json` and reads it back with the rest of `TrainerState` on resume.

    Example:
        ```py
        >>> from transformers import TrainerState
        >>> state = TrainerState(stateful_callbacks={"HetLoRACallback": {"args": {}, "attributes": {
        ...     "hetlora_round": {"rank_in": 4, "tail_norm_start": 0.5}}}})
        >>> checkpoint_round_start(state, "HetLoRACallback")
        {'rank_in': 4, 'tail_norm_start': 0.5}
        ```
    """
    stored = (state.stateful_callbacks or {}).get(name)
    if isinstance(stored, list):  # several callbacks of one class: the Trainer keeps a list
        stored = stored[0] if stored else None
    if not isinstance(stored, dict):
        return None
    found = (stored.get("attributes") or {}).get(ROUND_START)
    return found if isinstance(found, dict) else None


class HetLoRACallback(TrainerCallback, ExportableState):
    """Runs HetLoRA's local round inside a Trainer: regulariser bookkeeping, self-pruning, logging.

    The self-pruning regulariser lambda * sum_m ||B_m tail|| ||A_m tail|| is added to the loss by the
    HetLoRA tuner's own forward (a callback cannot change the loss the Trainer back-propagates, and
    the forward route needs no Trainer subclass, works under autocast, `accelerate launch` and any
    loss the model computes). The callback tells the tuner the gradient-accumulation steps so the term
    is counted once per optimizer step, records the tail norm at the start of the round, applies the
    pruning rule at its end, and logs `hetlora/rank`, `hetlora/tail_norm` and `hetlora/regularizer`.

    Nested training (optional; PreLort arXiv 2606.15963, Matryoshka representation learning arXiv
    2205.13147): with `nested=True` (or `HetLoRAConfig(nested=True)`) every optimizer step trains the
    model truncated at k' active components, k' drawn uniformly in [max(1, r_min), k] from a seeded
    generator at `on_step_begin`, so one k' holds for all micro-batches of a gradient-accumulation
    step; components above k' get no gradient in that step. The draws are in `nested_draws`.

    Ablation switches (the cut-down "HetLoRA" baselines of other papers): `prune=False` (or
    `HetLoRAConfig(prune_lambda=0)` for no regulariser) turns self-pruning off; the sparsity weights
    are a server choice (`method="zero_pad"` is HetLoRA without them).

    Checkpoint resume: the callback is an `ExportableState`, so the round start (rank in, tail norm at the
    start of the round) is written into every checkpoint's `trainer_state.json`; a `train(resume_from_checkpoint=...)`
    prunes against the round's start, not against the checkpoint's tail.

    Args:
        prune: apply the pruning rule at the end of the round (docs/design.md#self-pruning).
        reset_optimizer: clear optimizer moments at the start of each `train()` call (fresh local round).
        nested: draw a random truncation per optimizer step; None follows the adapter's `nested` setting.

    Example:
        ```py
        >>> callback = HetLoRACallback()
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[callback])  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> callback.last_round  # doctest: +SKIP
        {'rank_in': 8, 'rank_out': 7, 'tail_norm_start': 0.0123, 'tail_norm_end': 0.0101, 'pruned': True}
        ```
    """

    def __init__(self, prune: bool = True, reset_optimizer: bool = True, nested: bool | None = None) -> None:
        if nested is not None and not isinstance(nested, bool):
            raise ValueError(f"nested must be True, False or None (follow the adapter config), got {nested!r}.")
        self.prune = prune
        self.reset_optimizer = reset_optimizer
        self.nested = nested
        self.reference_tail_norm: float | None = None
        self.rank_in: int | None = None
        self.last_round: dict[str, Any] = {}
        self.nested_draws: list[int] = []
        self._nested_rng: random.Random | None = None
        self._rounds_begun = 0
        self.round_start: dict[str, Any] = {}

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores of this callback (transformers' `ExportableState`): the round start."""
        return {
            "args": {"prune": self.prune, "reset_optimizer": self.reset_optimizer, "nested": self.nested},
            "attributes": {ROUND_START: dict(self.round_start)},
        }

    def nested_seed_tag(self) -> str:
        """What, beside the seeds, makes this round's nested draws differ from another round's."""
        return f"round-{self._rounds_begun}"

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        tuner = hetlora_tuner(kwargs.get("model"))
        tuner.gradient_accumulation_steps = args.gradient_accumulation_steps
        if self.reset_optimizer and kwargs.get("optimizer") is not None and state.global_step == 0:
            reset_optimizer_state(kwargs["optimizer"])
        saved = checkpoint_round_start(state, type(self).__name__) if state.global_step > 0 else None
        if saved is not None and isinstance(saved.get("tail_norm_start"), (int, float)) and isinstance(
            saved.get("rank_in"), int
        ):  # resumed: the round began earlier
            self.reference_tail_norm = float(saved["tail_norm_start"])
            self.rank_in = int(saved["rank_in"])
        else:
            with torch.no_grad():
                self.reference_tail_norm = float(tuner.tail_norm())
            self.rank_in = self._rank(tuner)
        self.last_round = {}
        self._rounds_begun += 1
        self.round_start = {**self.round_start, "rank_in": self.rank_in, "tail_norm_start": self.reference_tail_norm}
        config = tuner.peft_config[tuner.active_adapters[0]]
        nested = config.nested if self.nested is None else self.nested
        self.nested_draws = []
        self._nested_rng = (
            random.Random(f"{config.nested_seed}:{args.seed}:{self.nested_seed_tag()}") if nested else None
        )
        if self._nested_rng is not None:
            for _ in range(state.global_step):  # a resumed round continues the round's draws
                self._nested_rng.randint(min(max(1, config.r_min), self.rank_in), self.rank_in)
        logger.info("HetLoRA local round: rank %d, tail norm %.6g", self.rank_in, self.reference_tail_norm)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._nested_rng is None:
            return
        tuner = hetlora_tuner(kwargs.get("model"))
        config = tuner.peft_config[tuner.active_adapters[0]]
        k = self._rank(tuner)
        draw = self._nested_rng.randint(min(max(1, config.r_min), k), k)
        self.nested_draws.append(draw)
        tuner.set_truncation(draw if draw < k else None)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._nested_rng is not None:
            hetlora_tuner(kwargs.get("model")).set_truncation(None)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if logs is None or kwargs.get("model") is None:
            return
        tuner = hetlora_tuner(kwargs["model"])
        values = self.metrics(tuner)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        tuner = hetlora_tuner(kwargs.get("model"))
        if self.reference_tail_norm is None:
            return
        if self._nested_rng is not None:
            tuner.set_truncation(None)
        with torch.no_grad():
            tail_end = float(tuner.tail_norm())
        rank_before = self._rank(tuner)
        rank_out = tuner.prune(self.reference_tail_norm) if self.prune else rank_before
        self.last_round = {
            "rank_in": self.rank_in,
            "rank_out": rank_out,
            "tail_norm_start": self.reference_tail_norm,
            "tail_norm_end": tail_end,
            "pruned": rank_out < rank_before,
        }
        logger.info(
            "HetLoRA round end: tail norm %.6g -> %.6g, rank %d -> %d",
            self.reference_tail_norm,
            tail_end,
            rank_before,
            rank_out,
        )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _rank(tuner: HetLoRAModel) -> int:
        rank = tuner.get_rank()
        return rank if isinstance(rank, int) else max(rank.values())

    def metrics(self, tuner: HetLoRAModel) -> dict[str, float]:
        """The values logged at each logging step."""
        config = tuner.peft_config[tuner.active_adapters[0]]
        with torch.no_grad():
            tail = float(tuner.tail_norm())
        return {
            "hetlora/rank": float(self._rank(tuner)),
            "hetlora/tail_norm": tail,
            "hetlora/regularizer": float(config.prune_lambda) * tail,
        }


def add_callbacks_first(trainer: Any, *callbacks: TrainerCallback) -> None:
    """Insert `callbacks` ahead of the reporting integrations so tensorboard / wandb see `hetlora/*`.

    `Trainer(callbacks=[...])` appends user callbacks after the `report_to` integrations, which then
    log before HetLoRA adds its values; the progress bar and `state.log_history` see them either way.

    Example:
        ```py
        >>> add_callbacks_first(trainer, HetLoRACallback())  # doctest: +SKIP
        ```
    """
    handler = trainer.callback_handler
    for callback in reversed(callbacks):
        handler.callbacks.insert(0, callback)
