"""`FederatedClientCallback`: turn a Trainer script into a HetLoRA federated client."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments

import peft_hetlora
from peft_hetlora.federated.aggregation import lora_module_names, truncate
from peft_hetlora.federated.compression import (
    MESSAGE_FORMAT_FIELD,
    ErrorFeedback,
    encode_message,
    parse_message_format,
)
from peft_hetlora.federated.errors import RankError
from peft_hetlora.federated.ranks import MAX_RANK, check_rank
from peft_hetlora.federated.store import AdapterStore, GlobalAdapter, json_text, validate_client_id
from peft_hetlora.federation_config import check_matches_federation

from .hetlora_callback import HetLoRACallback, hetlora_peft_model, hetlora_tuner

logger = logging.getLogger(__name__)


class FederatedClientCallback(HetLoRACallback):
    """One client of a HetLoRA federation inside any `transformers.Trainer` script.

    At `train()` begin, before any step, it pulls the current global adapter from `store` and refuses
    (`ConfigMismatchError`, naming the field, both values and the fix) a model whose HetLoRA settings
    differ from the federation's in anything that changes the math: r (r_max), lora_alpha,
    rank_scaling, target modules, layers, bias, fan_in_fan_out (see `FEDERATION_FIELDS`; build the
    model with `HetLoRAConfig.from_federation` or `peft_hetlora.get_federated_model` so it cannot
    differ). It checks the shapes, truncates the global to this round's rank and loads it.

    The round's rank is min(assigned rank, `max_rank`): a device never trains above its budget, even
    when the coordinator assigned more, and `client.json` reports `max_rank` so the coordinator does
    not assign more again.
    During the round it does everything `HetLoRACallback` does (regulariser, logging). At the end it
    applies the pruning rule and uploads only the active components with `client.json` (rank in / out,
    num_examples, train loss, tail norms, the global revision it started from). Add this callback
    *instead of* `HetLoRACallback`, not beside it.

    Window training (docs/design.md#component-rule): when `round.json` carries `components: {client_id: [j, ...]}`, the
    client trains exactly those global components (ascending global index, at most its budget: a
    longer window keeps its lowest indices) with the rest of the global frozen (`frozen="factors"`:
    buffers added in forward; `frozen="merged"`: merged into the base weights and subtracted at the
    end of the round), so its model is the global model while it pays gradients and optimizer state
    for its k components only. It uploads only those k components and writes their global indices,
    in slot order, as `components` in `client.json`. Self-pruning under a window drops the window's
    tail (its highest global indices), so the uploaded `components` shrinks with `rank_out`. Without
    `components` the client trains the prefix range(rank), exactly as before. After the upload the
    model drops the frozen part and returns to prefix labels (`last_round["components"]` keeps the
    window it trained).

    A client restarted mid-round simply calls `train()` again: it redoes the round and its upload
    replaces the earlier one atomically; a client whose upload for the open round already landed
    skips training (nothing is uploaded twice).

    Args:
        store: any `AdapterStore` (`LocalStore`, `HubStore`, ...).
        client_id: this client's id (letters, digits, `_.-`).
        rank: force this client's rank; by default the rank the coordinator assigned in `round.json`.
        max_rank: this device's budget, the largest rank it can train (default and upper bound: the rank
            its model was created at, e.g. `HetLoRAConfig(rank=4)`). Reported in `client.json`.
        num_examples: examples this client trains on (weights the data-size methods); default: the size
            of the Trainer's training dataset.
        require_participant: refuse to train when the coordinator did not select this client.
        frozen: how a window client keeps the global's other components: "factors" (default; also on
            quantised bases) or "merged" (float bases).
        nested: nested training (see `HetLoRACallback`); None follows the adapter's `nested` setting.
        message_format: how the upload is encoded (`peft_hetlora.federated.compression`): "fp32" (default),
            "bf16" / "fp16" (half the bytes) or "int8-block<B>" (e.g. "int8-block64": about a quarter, blockwise
            absmax). Declared as `message_format` in `client.json`; the coordinator checks the file against it and
            decodes to float32 before aggregating. The federation may restrict the formats (`message_formats`).
        error_feedback: keep the quantisation residual across this client's rounds and add it to the next upload
            (`compression.ErrorFeedback`, arXiv 1901.09847); the residual is reset when the trained window changes.

    Example:
        ```py
        >>> store = LocalStore("runs/fed")  # doctest: +SKIP
        >>> client = FederatedClientCallback(store, "alice")  # doctest: +SKIP
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[client])  # doctest: +SKIP
        >>> trainer.train()  # pull global -> local round -> prune -> upload  # doctest: +SKIP
        ```
    """

    def __init__(
        self,
        store: AdapterStore,
        client_id: str,
        *,
        rank: int | None = None,
        max_rank: int | None = None,
        num_examples: int | None = None,
        require_participant: bool = True,
        prune: bool = True,
        reset_optimizer: bool = True,
        frozen: str = "factors",
        nested: bool | None = None,
        message_format: str = "fp32",
        error_feedback: bool = False,
    ) -> None:
        super().__init__(prune=prune, reset_optimizer=reset_optimizer, nested=nested)
        self.message_format = parse_message_format(message_format).name
        self.error_feedback = ErrorFeedback() if error_feedback else None
        self._feedback_window: list[int] | None = None
        self.upload_bytes: dict[int, int] = {}
        if frozen not in ("factors", "merged"):
            raise ValueError(f"frozen must be 'factors' or 'merged', got {frozen!r}.")
        self.frozen = frozen
        self.store = store
        self.client_id = validate_client_id(client_id)
        if max_rank is not None:
            check_rank(max_rank, 1, MAX_RANK, what="max_rank (the most this device trains)")
        self.forced_rank = rank
        self.max_rank = max_rank
        self.budget: int | None = None
        self.num_examples = num_examples
        self.require_participant = require_participant
        self.current: GlobalAdapter | None = None
        self.round_info: dict[str, Any] = {}
        self.skipped = False
        self.uploaded_rounds: list[int] = []

    # ------------------------------------------------------------------ round discovery
    def current_round(self) -> int | None:
        """The round the store has open (the latest published global), or None before the first."""
        latest = self.store.latest_global()
        return None if latest is None else latest.round

    def is_participant(self, round_info: dict[str, Any] | None = None) -> bool:
        """Whether the coordinator selected this client in the round (all clients when unspecified)."""
        info = self.round_info if round_info is None else round_info
        participants = info.get("participants")
        return participants is None or self.client_id in participants

    def federation_finished(self, round_idx: int, round_info: dict[str, Any]) -> bool:
        """Whether global `round_idx` is the federation's last (a federation extended later is not finished)."""
        if not round_info.get("final"):
            return False
        federation = self.store.read_federation() or {}
        return int(federation.get("rounds", round_idx)) <= round_idx

    def already_uploaded(self, round_idx: int) -> bool:
        """Whether this client's upload for `round_idx` has landed in the store."""
        return self.client_id in self.store.list_client_uploads(round_idx)

    def assigned_rank(self, round_info: dict[str, Any], r_max: int) -> int:
        """This client's rank for the round: forced > coordinator's assignment > the model's current rank."""
        rank = self.forced_rank if self.forced_rank is not None else round_info.get("ranks", {}).get(self.client_id)
        if rank is None:
            return r_max
        return check_rank(rank, 1, r_max, what=f"Client {self.client_id}: rank", hi_name="r_max",
                          hint="fix the rank policy of the coordinator or the `rank=` argument")

    def assigned_components(self, round_info: dict[str, Any], r_max: int) -> list[int] | None:
        """The global components the coordinator assigned this client (ascending), None for the prefix.

        Reads `round_info["components"][client_id]`; a malformed entry raises `RankError` (fix the
        coordinator's component policy).
        """
        table = round_info.get("components")
        if table is None:
            return None
        if not isinstance(table, dict):
            raise RankError(f"round.json `components` must map client ids to index lists, got {type(table).__name__}.")
        window = table.get(self.client_id)
        if window is None:
            return None
        if not isinstance(window, list) or not window:
            raise RankError(f"Client {self.client_id}: round.json components must be a non-empty list: {window!r}.")
        bad = [j for j in window if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < r_max]
        if bad or len(set(window)) != len(window):
            raise RankError(
                f"Client {self.client_id}: round.json components {window!r} must be unique integers in "
                f"[0, r_max={r_max}); fix the coordinator's component policy."
            )
        return sorted(window)

    def nested_seed_tag(self) -> str:
        round_idx = None if self.current is None else self.current.round
        return f"{self.client_id}:round-{round_idx}"

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        peft_model = hetlora_peft_model(kwargs.get("model"))
        self.skipped = False
        latest = self.store.latest_global()
        if latest is None:
            raise RuntimeError(
                "The store has no global adapter yet: the coordinator must publish round 0 first "
                "(`hetlora coordinate ... --init` or Coordinator.init)."
            )
        self.current = latest
        self.round_info = self._read_round_info(latest)
        if self.federation_finished(latest.round, self.round_info):
            logger.info("The federation is finished (global %d is final); nothing to train.", latest.round)
            self.skipped = True
            control.should_training_stop = True
            return
        if self.require_participant and not self.is_participant():
            raise RuntimeError(
                f"Client {self.client_id} is not a participant of round {latest.round} "
                f"(participants: {self.round_info.get('participants')}); check `is_participant()` before training."
            )
        if self.already_uploaded(latest.round):
            logger.info("Client %s already uploaded round %d; skipping.", self.client_id, latest.round)
            self.skipped = True
            control.should_training_stop = True
            return
        self._load_global(peft_model, latest)
        super().on_train_begin(args, state, control, **kwargs)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.skipped or self.current is None:
            return
        super().on_train_end(args, state, control, **kwargs)
        model = kwargs.get("model")
        num_examples = self.num_examples
        if num_examples is None:
            loader = kwargs.get("train_dataloader")
            dataset = getattr(loader, "dataset", None)
            num_examples = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
        if not num_examples:
            raise ValueError(
                f"Client {self.client_id}: cannot tell how many examples were trained on; pass num_examples=."
            )
        train_loss = next((log["train_loss"] for log in reversed(state.log_history) if "train_loss" in log), None)
        self.upload(model, num_examples=int(num_examples), train_loss=train_loss)
        # end of the round: forget the frozen rest of the global (restoring the base weights if merged) and go
        # back to prefix labels, so code that sets ranks or loads a global between rounds sees a plain model
        hetlora_tuner(model).clear_components()

    # ------------------------------------------------------------------ pull / push
    @staticmethod
    def _read_round_info(latest: GlobalAdapter) -> dict[str, Any]:
        path = Path(latest.path) / "round.json"
        return json.loads(path.read_text()) if path.is_file() else {"round": latest.round}

    def _load_global(self, peft_model: Any, latest: GlobalAdapter) -> None:
        tuner = peft_model.base_model
        adapter = tuner.active_adapters[0]
        config = tuner.peft_config[adapter]
        global_config = json.loads((Path(latest.path) / "adapter_config.json").read_text())
        if global_config.get("peft_type") != "HETLORA":
            raise ValueError(f"The published global of round {latest.round} is not a HETLORA adapter.")
        check_matches_federation(config, global_config)
        ours = set(lora_module_names(get_peft_model_state_dict(peft_model, adapter_name=adapter)))
        weights = load_file(str(Path(latest.path) / "adapter_model.safetensors"))
        theirs = set(lora_module_names(weights))
        if ours != theirs:
            missing, extra = sorted(theirs - ours)[:3], sorted(ours - theirs)[:3]
            raise ValueError(
                f"The global adapter does not fit this model: modules only in the global {missing}, only in the "
                f"model {extra}. Use the same base model and target_modules as federation.json."
            )
        for name, layer in tuner.hetlora_layers(adapter):
            key = next(k for k in (f"base_model.model.{name}", name) if f"{k}.lora_A.weight" in weights)
            a, b = weights[f"{key}.lora_A.weight"], weights[f"{key}.lora_B.weight"]
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise ValueError(
                    f"The global adapter's {name} expects a {a.shape[1]} -> {b.shape[0]} layer but the model has "
                    f"{layer.in_features} -> {layer.out_features}: a different base model?"
                )
        window = self.assigned_components(self.round_info, config.r)
        assigned = len(window) if window is not None else self.assigned_rank(self.round_info, config.r)
        if window is not None and self.forced_rank is not None:
            assigned = min(assigned, self.assigned_rank(self.round_info, config.r))
        allocated = min(layer.r[adapter] for _, layer in tuner.hetlora_layers(adapter))
        self.budget = allocated if self.max_rank is None else min(self.max_rank, allocated)
        rank = min(assigned, self.budget)
        if rank < assigned:
            logger.info("Client %s: assigned rank %d, trains at its budget %d.", self.client_id, assigned, rank)
        federation_r_min = self.round_info.get("r_min")
        # a window smaller than r_min is the coordinator's choice; a budget below it excludes the device
        limiting = rank if window is None else self.budget
        if isinstance(federation_r_min, int) and limiting < federation_r_min:
            raise RankError(
                f"Client {self.client_id}: its budget max_rank={self.budget} is below the federation's "
                f"r_min={federation_r_min}; this device cannot take part (raise its rank to >= {federation_r_min})."
            )
        if isinstance(federation_r_min, int) and 1 <= federation_r_min <= rank:
            config.r_min = federation_r_min  # pruning must respect the federation's r_min, not a local default
        if window is not None:
            tuner.set_components(window[:rank], weights, adapter, frozen=self.frozen)
            logger.info(
                "Client %s loaded global round %d: trains components %s, %d frozen (%s)",
                self.client_id, latest.round, window[:rank], len(tuner.frozen_components(adapter)), self.frozen,
            )
            return
        tuner.clear_components(adapter)
        tuner.set_rank(rank, adapter)
        set_peft_model_state_dict(peft_model, truncate(weights, rank), adapter_name=adapter)
        logger.info("Client %s loaded global round %d at rank %d", self.client_id, latest.round, rank)

    def upload(self, model: Any, *, num_examples: int, train_loss: float | None) -> None:
        """Save the active components and `client.json`, then upload them as one all-or-nothing unit."""
        peft_model = hetlora_peft_model(model)
        tuner = peft_model.base_model
        adapter = tuner.active_adapters[0]
        state = get_peft_model_state_dict(peft_model, adapter_name=adapter)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        info = {
            "client_id": self.client_id,
            "round": self.current.round,
            "rank_in": self.last_round.get("rank_in", self.rank_in),
            "rank_out": self.last_round.get("rank_out", self._rank(tuner)),
            "max_rank": self.budget if self.budget is not None else self._rank(tuner),
            "num_examples": num_examples,
            "train_loss": train_loss,
            "tail_norm_start": self.last_round.get("tail_norm_start"),
            "tail_norm_end": self.last_round.get("tail_norm_end"),
            "global_revision": self.current.revision,
            "peft_hetlora_version": peft_hetlora.__version__,
        }
        components = tuner.peft_config[adapter].components
        if components is not None:  # window client: the global index of each uploaded slot
            info["components"] = list(components)
            self.last_round["components"] = list(components)
        info[MESSAGE_FORMAT_FIELD] = self.message_format
        window = list(components) if components is not None else None
        if self.error_feedback is not None and window != self._feedback_window:
            self.error_feedback.residual.clear()  # slot i now holds another global component
        self._feedback_window = window
        data = encode_message(state, self.message_format, error_feedback=self.error_feedback)
        self.upload_bytes[self.current.round] = len(data)
        self.last_round["upload_bytes"] = len(data)
        with tempfile.TemporaryDirectory(prefix=f"hetlora-{self.client_id}-") as tmp:
            (Path(tmp) / "adapter_model.safetensors").write_bytes(data)
            (Path(tmp) / "client.json").write_text(json_text(info, indent=2, nonfinite="null") + "\n")
            self.store.upload_client(self.current.round, self.client_id, tmp)
        self.uploaded_rounds.append(self.current.round)
        logger.info("Client %s uploaded round %d at rank %d", self.client_id, self.current.round, info["rank_out"])
