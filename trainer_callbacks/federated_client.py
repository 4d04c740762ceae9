"""`FederatedClientCallback`: turn a Trainer script into a HetLoRA federated client."""

from __future__ import annotations

import hashlib
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
from peft_hetlora.base_identity import check_base_model, federation_base_identity
from peft_hetlora.federated.adapter import (
    core_rank,
    core_state_dict,
    in_core_mode,
    lora_module_names,
    start_core,
    stop_core,
    truncate,
)
from peft_hetlora.federated.stores import AdapterStore, GlobalAdapter, json_text, validate_client_id
from peft_hetlora.federated.upload import (
    MESSAGE_FORMAT_FIELD,
    ErrorFeedback,
    encode_message,
    parse_message_format,
)
from peft_hetlora.federation_config import check_matches_federation
from peft_hetlora.utils.constants import ADAPTER_FILE
from peft_hetlora.utils.errors import RankError
from peft_hetlora.utils.ranks import MAX_RANK, check_rank

from .client_view import client_get_global, client_latest_global
from .hetlora_callback import HetLoRACallback, checkpoint_round_start, hetlora_peft_model, hetlora_tuner
from .processes import agree, is_main_process, refuse_sharded_training

logger = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A `resume_from_checkpoint` checkpoint that is not of this client's open round."""


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

    Core clients (docs/methods.md#core-clients; LoRA-XS arXiv 2405.17604, Fed-SB arXiv 2502.15436, FedSVD arXiv
    2505.12805): when `round.json` carries `cores: {client_id: r_c}`, the client trains an `r_c x r_c` core inside
    the global's top-`r_c` singular subspace (`peft_hetlora.federated.adapter.core_model.start_core`: `lora_A` and
    the basis of `lora_B` frozen, only the core in the optimizer), starts exactly at the global truncated to `r_c`,
    does not prune, and uploads the cores only (`<module>.lora_core.weight`) with `core_rank` in `client.json`
    (`rank_in` / `rank_out` stay its factor rank k). A device whose budget is below its assigned rank trains the
    smaller core `core_rank(budget)` of the budget rule. After the upload the model keeps the held factors
    `B = U_c C`, `A = V_c^T` as plain factors.

    A client restarted mid-round either calls `train()` again (it redoes the round; its upload replaces
    the earlier one atomically) or resumes: `train(resume_from_checkpoint=...)` continues the round from
    the checkpoint (weights, optimizer, scheduler, step and the round start all come from the checkpoint;
    the global is loaded only at the start of a fresh round). The round's identity (federation, round,
    client id, the global's revision, rank and window) travels in each checkpoint's `trainer_state.json`
    (this callback is a transformers `ExportableState`); a checkpoint of another round, client or
    federation is refused before any step (`CheckpointMismatchError`). A client whose upload for the
    open round already landed skips training (nothing is uploaded twice); a round that trained no step
    uploads nothing.

    Multi-process clients (`torchrun`, `accelerate launch`): every process trains, the main process
    (`state.is_world_process_zero`) alone uploads, once per round; the others wait for it and fail with
    it. DeepSpeed and FSDP are refused (`is_sharded_training`): their processes hold shards of the adapter.

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
        message_format: how the upload is encoded (`peft_hetlora.federated.upload`): "fp32" (default),
            "bf16" / "fp16" (half the bytes) or "int8-block<B>" (e.g. "int8-block64": about a quarter, blockwise
            absmax). Declared as `message_format` in `client.json`; the coordinator checks the file against it and
            decodes to float32 before aggregating. The federation may restrict the formats (`message_formats`).
        error_feedback: keep the quantisation residual across this client's rounds and add it to the next upload
            (`compression.ErrorFeedback`, arXiv 1901.09847); the residual is reset when the trained window changes.
        core_tokens: tokens of one micro-batch (batch size x sequence length): a core client then counts its adapter
            activations in the budget rule (`core_rank(..., tokens=...)`) and trains a smaller core where needed; 0
            (default) trains the core the plan assigned.

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
        core_tokens: int = 0,
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
        self.not_uploaded: dict[int, str] = {}
        self._start_step = 0  # global_step when the current train() call began (> 0: resumed)
        self._base_checked = False  # the base model is checked against federation.json once per client
        self._finished_weights: dict[str, torch.Tensor] | None = None
        self.core_rank: int | None = None  # r_c of the open round's core (None: the client trains factors)
        self._factor_rank: int | None = None  # the rank k a core client reports as rank_in / rank_out
        self._allocation: int | None = None  # the model's rank allocation before a core round grew it
        if isinstance(core_tokens, bool) or not isinstance(core_tokens, int) or core_tokens < 0:
            raise ValueError(f"core_tokens must be an int >= 0 (tokens per micro-batch), got {core_tokens!r}.")
        self.core_tokens = int(core_tokens)

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores of this callback (`ExportableState`): the round start and the round's identity.

        `args` stays empty: the callback cannot be rebuilt from JSON (it holds a store), so
        `restore_callback_states_from_checkpoint=True` is refused; the callback reads its entry itself.
        """
        saved = super().state()
        return {"args": {}, "attributes": saved["attributes"]}

    # ------------------------------------------------------------------ round discovery
    def current_round(self) -> int | None:
        """The round the store has open (the latest published global), or None before the first."""
        latest = client_latest_global(self.store)
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

    def assigned_core(self, round_info: dict[str, Any], r_max: int) -> int | None:
        """The core rank r_c the coordinator assigned this client (`round.json` `cores`), None to train factors.

        A malformed entry raises `RankError` (fix the coordinator's plan).
        """
        table = round_info.get("cores")
        if table is None:
            return None
        if not isinstance(table, dict):
            raise RankError(f"round.json `cores` must map client ids to core ranks, got {type(table).__name__}.")
        value = table.get(self.client_id)
        if value is None:
            return None
        return check_rank(value, 1, r_max, what=f"Client {self.client_id}: round.json core rank", hi_name="r_max",
                          hint="fix the coordinator's plan")

    def nested_seed_tag(self) -> str:
        round_idx = None if self.current is None else self.current.round
        return f"{self.client_id}:round-{round_idx}"

    # ------------------------------------------------------------------ events
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._check_args(args)

    def _check_args(self, args: TrainingArguments) -> None:
        refuse_sharded_training(args)
        if getattr(args, "restore_callback_states_from_checkpoint", False):
            raise ValueError(
                "restore_callback_states_from_checkpoint=True would rebuild FederatedClientCallback without its "
                "store; leave it False: the callback reads the round's identity from the checkpoint itself."
            )

    def federation_fingerprint(self) -> str | None:
        """sha256 of the store's `federation.json` (canonical JSON) without `rounds`, None when there is none.

        `rounds` is left out because extending a federation rewrites it; everything else is fixed at init.
        """
        federation = self.store.read_federation()
        if not isinstance(federation, dict):
            return None
        fixed = {key: value for key, value in federation.items() if key != "rounds"}
        return hashlib.sha256(json_text(fixed, sort_keys=True).encode()).hexdigest()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._check_args(args)
        peft_model = hetlora_peft_model(kwargs.get("model"))
        self.skipped = False
        resumed = state.global_step > 0
        # every process of a multi-process client follows the main process's view of the store
        latest_round, uploaded = agree(self._store_view() if is_main_process(state) else None)
        if latest_round is None:
            raise RuntimeError(
                "The store has no global adapter yet: the coordinator must publish round 0 first "
                "(`hetlora coordinate ... --init` or Coordinator.init)."
            )
        latest = client_get_global(self.store, latest_round)
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
        if uploaded:
            logger.info("Client %s already uploaded round %d; skipping.", self.client_id, latest.round)
            self.skipped = True
            control.should_training_stop = True
            return
        identity = self.round_identity(latest)
        self._checkpoint_dir: Path | None = None
        if not resumed:
            self._load_global(peft_model, latest)
        else:
            self._checkpoint_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self._resume_round(peft_model, latest, identity, checkpoint_round_start(state, type(self).__name__))
        components = hetlora_tuner(peft_model).peft_config[hetlora_tuner(peft_model).active_adapters[0]].components
        self.round_start = {
            **identity,
            "rank": self._rank(hetlora_tuner(peft_model)),
            "components": None if components is None else list(components),
            "budget": self.budget,
            "core_rank": self.core_rank,
        }
        super().on_train_begin(args, state, control, **kwargs)
        self._start_step = state.global_step
        self._finished_weights = None
        if resumed and state.max_steps and state.global_step >= state.max_steps:
            # resumed from the round's last checkpoint (killed before the upload): transformers still runs one
            # optimizer step after a stop requested here, so the checkpoint's weights are kept aside and restored
            self._finished_weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
            control.should_training_stop = True

    def round_identity(self, latest: GlobalAdapter) -> dict[str, Any]:
        """What a checkpoint of this client's round `latest.round` must carry to be resumed."""
        return {
            "federation": self.federation_fingerprint(),
            "round": latest.round,
            "client_id": self.client_id,
            "global_revision": latest.revision,
        }

    def resumable_checkpoint(self, output_dir: str | Path) -> str | None:
        """The last checkpoint in `output_dir` of this client's open round, None when there is none.

        Checkpoints of other rounds, clients or federations (and folders that are not Trainer checkpoints)
        are passed over, so a script can always call `trainer.train(resume_from_checkpoint=...)` with this.
        """
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        latest = client_latest_global(self.store)
        if latest is None or not Path(output_dir).is_dir():
            return None
        identity = self.round_identity(latest)
        found = []
        for folder in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            step = folder.name.rsplit("-", 1)[-1]
            if not step.isdigit() or not (folder / "trainer_state.json").is_file():
                continue
            try:
                state = TrainerState.load_from_json(str(folder / "trainer_state.json"))
            except (ValueError, TypeError, OSError):
                continue
            saved = checkpoint_round_start(state, type(self).__name__) or {}
            if all(saved.get(key) == value for key, value in identity.items()):
                found.append((int(step), str(folder)))
        return max(found)[1] if found else None

    def _store_view(self) -> tuple[int | None, bool]:
        latest = client_latest_global(self.store)
        if latest is None:
            return None, False
        return latest.round, self.already_uploaded(latest.round)

    def _resume_round(self, peft_model: Any, latest: GlobalAdapter, identity: dict, saved: dict | None) -> None:
        """Check a resumed checkpoint is of this round, then set the round up around the checkpoint's weights."""
        fix = (
            "Start the open round fresh from the global: call trainer.train() without resume_from_checkpoint "
            "(or move the old checkpoint-* folders out of output_dir; one output_dir per round avoids this)."
        )
        if saved is None or "round" not in saved:
            raise CheckpointMismatchError(
                f"Client {self.client_id}: the checkpoint being resumed carries no HetLoRA round identity (it was "
                f"not written by a FederatedClientCallback), so it cannot be told to be of round {latest.round}. {fix}"
            )
        differ = [f"{key}: checkpoint {saved.get(key)!r}, open round {value!r}"
                  for key, value in identity.items() if saved.get(key) != value]
        if differ:
            raise CheckpointMismatchError(
                f"Client {self.client_id}: the checkpoint being resumed is not of the open round "
                f"({'; '.join(differ)}). {fix}"
            )
        trained = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
        self._load_global(peft_model, latest)  # checks, rank, window (and its frozen part) as at the round's start
        checkpoint = getattr(self, "_checkpoint_dir", None)  # set by on_train_begin (tests may call this directly)
        shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
        if self.core_rank is not None and checkpoint is not None and (checkpoint / ADAPTER_FILE).is_file() and \
                shapes != {k: tuple(v.shape) for k, v in trained.items()}:
            # a core round grew the model's layers past the allocation the Trainer loaded the checkpoint into (which
            # truncated it): read the checkpoint's held factors (rank r_c) from its file instead
            trained = load_file(str(checkpoint / ADAPTER_FILE))
        tuner = hetlora_tuner(peft_model)
        adapter = tuner.active_adapters[0]
        components = tuner.peft_config[adapter].components
        now = {"rank": self._rank(tuner), "components": None if components is None else list(components)}
        shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
        if any(saved.get(k) != v for k, v in now.items()) or shapes != {k: tuple(v.shape) for k, v in trained.items()}:
            raise CheckpointMismatchError(
                f"Client {self.client_id}: the checkpoint trained rank {saved.get('rank')} components "
                f"{saved.get('components')} but round {latest.round} gives this client rank {now['rank']} components "
                f"{now['components']} (another max_rank / rank= than before the restart?). {fix}"
            )
        set_peft_model_state_dict(peft_model, trained, adapter_name=adapter)
        logger.info("Client %s resumed round %d from its checkpoint (the global was not reloaded)",
                    self.client_id, latest.round)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self.skipped or self.current is None:
            if kwargs.get("model") is not None and in_core_mode(hetlora_tuner(kwargs["model"])):
                stop_core(hetlora_tuner(kwargs["model"]))
            return
        model = kwargs.get("model")
        last_step = state.global_step
        if self._finished_weights is not None:  # undo the step transformers ran after the stop
            peft_model = hetlora_peft_model(model)
            set_peft_model_state_dict(peft_model, self._finished_weights, adapter_name=peft_model.active_adapters[0])
            self._finished_weights = None
            last_step = self._start_step
        core = in_core_mode(hetlora_tuner(model))
        prune, self.prune = self.prune, self.prune and not core  # a core keeps its rank: nothing to prune
        try:
            super().on_train_end(args, state, control, **kwargs)
        finally:
            self.prune = prune
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
        if self._start_step > 0:  # resumed: the Trainer's train_loss covers this call's steps only
            losses = [log["loss"] for log in state.log_history if "loss" in log and log.get("step", 0) <= last_step]
            train_loss = sum(losses) / len(losses) if losses else train_loss
        if state.global_step == 0:
            reason = "it trained no step (empty dataset or max_steps=0?)"
            logger.warning("Client %s: round %d not uploaded: %s.", self.client_id, self.current.round, reason)
            self.not_uploaded[self.current.round] = reason
        else:
            self._upload_once(state, model, num_examples=int(num_examples), train_loss=train_loss)
        if core:  # keep the held factors U_c C, V_c^T as plain factors
            stop_core(hetlora_tuner(model))
        # end of the round: forget the frozen rest of the global (restoring the base weights if merged) and go
        # back to prefix labels, so code that sets ranks or loads a global between rounds sees a plain model
        hetlora_tuner(model).clear_components()

    def _upload_once(self, state: TrainerState, model: Any, **info: Any) -> None:
        """The main process uploads; the others wait for it and raise if it failed."""
        error = None
        if is_main_process(state):
            try:
                self.upload(model, **info)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other processes heard of it
                error = exc
        failed = agree(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if failed is not None:
            raise RuntimeError(f"Client {self.client_id}: the main process's upload failed: {failed}")
        if not is_main_process(state):
            self.uploaded_rounds.append(self.current.round)

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
        if not self._base_checked:
            check_base_model(peft_model, config, federation_base_identity(self.store))
            self._base_checked = True
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
        if self._allocation is not None and allocated > self._allocation:
            allocated = self._allocation  # a core round grew the layers; the device's budget did not change
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
        self.core_rank = self._factor_rank = None
        core = self.assigned_core(self.round_info, config.r) if window is None else None
        if core is not None:
            dims = [(layer.in_features, layer.out_features) for _, layer in tuner.hetlora_layers(adapter)]
            r_c = core if rank >= assigned and not self.core_tokens else min(
                core, core_rank(rank, config.r, dims, tokens=self.core_tokens))
            if r_c > allocated:
                self._allocation = allocated
            start_core(peft_model, weights, r_c, adapter)
            self.core_rank, self._factor_rank = r_c, rank
            logger.info("Client %s loaded global round %d: trains a %d x %d core (budget rank %d)",
                        self.client_id, latest.round, r_c, r_c, rank)
            return
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
        core = in_core_mode(tuner, adapter)
        state = core_state_dict(peft_model, adapter) if core else get_peft_model_state_dict(peft_model,
                                                                                              adapter_name=adapter)
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
        if core:  # a core client reports its factor rank k and the core it trained
            info["rank_in"] = info["rank_out"] = int(self._factor_rank)
            info["core_rank"] = int(self.core_rank)
            self.last_round.update(rank_in=info["rank_in"], rank_out=info["rank_out"], core_rank=info["core_rank"])
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
