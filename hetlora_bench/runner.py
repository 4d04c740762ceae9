"""`run_simulation`: a federated HetLoRA experiment in one process, every arm on the same data and seeds.

Each federated arm is a real federation: a `Coordinator` over a `LocalStore` in the run folder, and
clients that are ordinary `transformers.Trainer` runs with the `FederatedClientCallback` (the same
code a real deployment uses). The run folder is resumable: finished rounds are kept, an open round
continues with the clients that have not uploaded yet.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from peft_hetlora.federated import Coordinator, LocalStore
from peft_hetlora.federated.policies import DEFAULT_CLIENT_SAMPLING
from peft_hetlora.federated.round import RoundPlan
from peft_hetlora.federated.stores import json_text
from peft_hetlora.flower import LocalTrainingConfig
from peft_hetlora.utils import ADAPTER_FILE, ROUND_FILE
from trainer_callbacks import FederatedClientCallback

from .activation_cache import (
    CachedBlocks,
)
from .arm_setup import arm_adapter_config, arm_coordinator_settings, arm_ranks, record_arm_base
from .arms import ARMS, SimulationConfig
from .attacks import choose_attackers
from .client_uploads import UploadTransform
from .engines import run_round
from .report import write_report
from .round_measures import FIXED_VAL, HELD, fixed_val_columns, held_rank  # noqa: F401 - held_rank: importable from the runner, as before
from .round_measures import arm_peft_model as _peft_model
from .round_measures import held_download_bytes as _held_download_bytes
from .round_measures import held_validation_ppl as _held_validation_ppl
from .round_measures import load_global as _load_global
from .workbench import Workbench, prepare

logger = logging.getLogger(__name__)


class RunFolderMismatch(ValueError):
    """The run folder holds a run of different settings."""


# ----------------------------------------------------------------------------- progress
def format_duration(seconds: float) -> str:
    """``1h02m``, ``4m05s`` or ``37s``.

    Example:
        >>> format_duration(3725), format_duration(245), format_duration(37.4)
        ('1h02m', '4m05s', '37s')
    """
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its children that have finished, in seconds.

    Example:
        >>> cpu_seconds() > 0
        True
    """
    try:
        import resource
    except ImportError:  # pragma: no cover  (not Unix)
        return time.process_time()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class RunProgress:
    """The whole run's progress: "arm k of N", the elapsed time and an ETA from the rounds finished so far.

    One line per arm on `stream` (default stderr) when the arm starts, so a log gets N lines; the per-arm progress
    bars (a terminal only) show the same status. The ETA is the mean time of the rounds this invocation trained
    times the rounds left (rounds a killed run already finished are neither re-run nor counted in the mean).

    Example:
        >>> import io
        >>> clock = iter([0.0, 0.0, 0.0, 60.0, 60.0]).__next__  # a fake clock, for the example
        >>> progress = RunProgress(arms=2, rounds_per_arm=3, stream=io.StringIO(), clock=clock)
        >>> progress.start_arm("hetlora (seed 0)")
        >>> progress.round_done()
        >>> progress.status()  # one round took 60 s, five are left
        'arm 1 of 2, elapsed 1m00s, ETA 5m00s'
    """

    def __init__(self, arms: int, rounds_per_arm: int, *, stream: Any = None, clock: Any = time.perf_counter) -> None:
        self.arms, self.rounds_per_arm = int(arms), int(rounds_per_arm)
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self.first_round_started: float | None = None
        self.arm = 0
        self.trained = 0
        self.resumed = 0

    def start_arm(self, label: str, done_rounds: int = 0) -> None:
        """Announce the next arm; `done_rounds` are rounds of it that an earlier invocation finished."""
        self.arm += 1
        self.resumed += int(done_rounds)
        if self.first_round_started is None:
            self.first_round_started = self.clock()
        stream = self.stream if self.stream is not None else sys.stderr
        print(f"hetlora simulate: {label}: {self.status()}", file=stream, flush=True)

    def round_done(self) -> None:
        self.trained += 1

    def eta_s(self) -> float | None:
        """Seconds left, or None before the first round of this invocation finished."""
        left = self.arms * self.rounds_per_arm - self.trained - self.resumed
        if left <= 0:
            return 0.0
        if not self.trained or self.first_round_started is None:
            return None
        return (self.clock() - self.first_round_started) / self.trained * left

    def status(self) -> str:
        eta = self.eta_s()
        eta_text = "after the first round" if eta is None else format_duration(eta)
        return (
            f"arm {self.arm} of {self.arms}, elapsed {format_duration(self.clock() - self.started)}, "
            f"ETA {eta_text}"
        )


# ----------------------------------------------------------------------------- arms
def initial_client_ranks(config: SimulationConfig, clients: list[str], seed: int) -> dict[str, int]:
    """Each client's device rank under the configured policy (same for every arm of a seed)."""
    from peft_hetlora.federated import RankPolicy

    return RankPolicy.coerce(config.rank_policy).assign(clients, r_min=config.r_min, r_max=config.r_max, seed=seed)


def _training_args(training: LocalTrainingConfig, out: Path, seed: int, steps: int) -> TrainingArguments:
    """The `Trainer` arguments of one simulated client (or a centralized round) from the one training record."""
    gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=training.batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        max_steps=steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler_type,
        warmup_steps=training.warmup_steps,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        logging_steps=max(1, steps),
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
        use_cpu=not gpu,
        bf16=bool(training.bf16 and gpu),
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append_row(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json_text(row, nonfinite="null") + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_federated_arm(
    wb: Workbench, arm: str, arm_dir: Path, ranks0: dict[str, int], progress: RunProgress | None = None
) -> dict[str, Any]:
    """Run (or resume) one federated arm; return its metrics `{"rounds": [...], ...}`."""
    config = wb.config
    spec = ARMS[arm]
    r_arm, ranks = arm_ranks(config, arm, ranks0)
    clients = sorted(ranks)
    store = LocalStore(arm_dir / "store", create=True)
    rows_path = arm_dir / "rounds.jsonl"
    rows = _read_rows(rows_path)
    adapter_config = arm_adapter_config(config, r_arm, wb, prune=spec["prune"])
    training = config.training(prune=spec["prune"], nested=bool(spec.get("nested")))
    settings = arm_coordinator_settings(config, arm, r_arm, ranks, wb.seed)
    coordinator = Coordinator(store, settings, progress=False)
    with _peft_model(wb, adapter_config, wb.seed) as model:
        if config.fixed_validation and rows and _missing_fixed_val(rows):  # older folder: filled, no training
            rows = _fill_fixed_val(wb, model, store, r_arm, rows_path, rows)
        if store.latest_global() is None:
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                coordinator.init(tmp)
        record_arm_base(store, model, adapter_config, wb)  # as `hetlora init`: the clients check their base against it
        if not rows:
            _load_global(model, load_file(str(store.get_global(0).path / ADAPTER_FILE)), r_arm)
            row = {
                "round": 0,
                "heldout_ppl": wb.initial_heldout_ppl(model),
                **fixed_val_columns(wb, model, config.fixed_validation, initial=True),
                "upload_bytes": 0,
                "download_bytes": 0,
                "ranks": dict(ranks),
                "wall_s": 0.0,
            }
            _append_row(rows_path, row)
            rows.append(row)
        hf_logging.set_verbosity_error()
        if progress is not None:
            progress.start_arm(f"{arm} (seed {wb.seed})", done_rounds=min(len(rows) - 1, config.rounds))
        bar = tqdm(total=config.rounds, initial=len(rows) - 1, desc=f"{arm} (seed {wb.seed})", unit="round",
                   disable=None)  # None: a terminal only, never a log file
        sent_by_round: dict[int, dict[str, dict[str, int]]] = {}  # bytes as sent, per round and client

        def attackers_of(plan: RoundPlan) -> list[str]:
            if not spec.get("attack"):
                return []
            return choose_attackers(plan.participants, config.attack_fraction, seed=wb.seed, round_idx=plan.round)

        def train_client(plan: RoundPlan, cid: str) -> None:
            client_store = UploadTransform(
                store,
                message_format=config.message_format,
                attack=config.attack if cid in attackers_of(plan) else None,
                attack_scale=config.attack_scale,
                honest_copy=arm_dir / "honest_uploads" / f"round-{plan.round}" / f"{cid}.safetensors",
            )
            callback = FederatedClientCallback(
                client_store,
                cid,
                num_examples=len(wb.train[cid]),
                prune=training.prune,
                **_callback_options(training, config.message_format),
            )
            client_seed = wb.seed * 100_003 + plan.round * 101 + clients.index(cid)
            trainer = Trainer(
                model=wb.trainable(model),
                args=_training_args(training, arm_dir / "trainer", client_seed, training.local_steps),
                train_dataset=wb.train_set(cid),
                data_collator=wb.train_collator(),
                callbacks=[callback],
            )
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            if client_store.sent_bytes is not None:
                sent = sent_by_round.setdefault(plan.round, _read_sent(arm_dir, plan.round))
                sent[cid] = {"sent_bytes": client_store.sent_bytes, "payload_bytes": client_store.payload_bytes}
                _write_sent(arm_dir, plan.round, sent)

        while len(rows) - 1 < config.rounds:
            started = time.perf_counter()
            t = len(rows) - 1
            plan, summary = run_round(coordinator, t, train_client)
            attackers = attackers_of(plan)
            sent = sent_by_round.get(t) or _read_sent(arm_dir, t)
            global_t = load_file(str(store.get_global(t).path / ADAPTER_FILE))
            downloads = _held_download_bytes(global_t, spec, r_arm, {c: plan.ranks[c] for c in plan.participants})
            latest = store.get_global(t + 1)
            latest_weights = load_file(str(latest.path / ADAPTER_FILE))
            _load_global(model, latest_weights, r_arm)
            heldout = wb.heldout_ppl(model)
            fixed = fixed_val_columns(wb, model, config.fixed_validation)  # before client validation reloads ranks
            client_ranks = summary.get("client_ranks", {})
            accepted = {cid: int(client_ranks.get(cid, plan.ranks[cid])) for cid in summary["accepted"]}
            client_val = _held_validation_ppl(wb, model, latest_weights, spec, r_arm, accepted)
            accepted_sent = [sent[c] for c in summary["accepted"] if c in sent]
            row = {
                "round": t + 1,
                "heldout_ppl": heldout,
                "client_val_ppl": client_val,
                "client_val_model": HELD,
                **fixed,  # fixed_val_ppl and its cost fixed_val_s (seconds of this round's wall_s)
                # bytes as sent: the encoded message (message_format), plus client.json
                "upload_bytes": sum(s["sent_bytes"] for s in accepted_sent)
                if config.message_format != "fp32"
                else summary["metrics"]["bytes_uploaded"],
                "payload_bytes": sum(s["payload_bytes"] for s in accepted_sent),
                # per accepted client, as the coordinator read them (a core client's r_c^2 per module, issue 24)
                "client_upload_bytes": {cid: (summary.get("clients", {}).get(cid) or {}).get("upload_bytes")
                                        for cid in summary["accepted"]},
                "message_format": config.message_format,
                "attackers": attackers,
                "epsilon": (summary.get("privacy") or {}).get("epsilon"),
                "download_bytes": downloads,
                "ranks": {cid: int(client_ranks.get(cid, r)) for cid, r in ranks.items()},
                "rejected": summary.get("rejected", {}),
                "train_loss": summary["metrics"].get("train_loss"),
                "wall_s": time.perf_counter() - started,
            }
            _append_row(rows_path, row)
            rows.append(row)
            bar.update(1)
            if progress is not None:
                progress.round_done()
                bar.set_postfix_str(f"ppl={heldout:.2f}; {progress.status()}")
            else:
                bar.set_postfix(ppl=f"{heldout:.2f}")
        bar.close()
    info: dict[str, Any] = {
        "rounds": rows,
        "homogeneous_rank": None if spec["ranks"] == "heterogeneous" else r_arm,
        "clients": len(clients),
        "aggregation": spec["aggregation"],
        "message_format": config.message_format,
    }
    if "dp_epsilon" in spec:
        info["dp"] = settings.dp.to_dict()
    if spec.get("attack"):
        info["attack"] = {"kind": config.attack, "fraction": config.attack_fraction, "scale": config.attack_scale}
    return info




def _missing_fixed_val(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if FIXED_VAL not in r]


def _write_rows(rows_path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``rounds.jsonl`` atomically (a temporary file, then a rename)."""
    tmp = rows_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json_text(r, nonfinite="null") + "\n" for r in rows))
    os.replace(tmp, rows_path)


def _fill_fixed_val(
    wb: Workbench, model: Any, store: LocalStore, r_arm: int, rows_path: Path, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Add `FIXED_VAL` to the rows lacking it, from the global each row measured (round ``n``: the store's global
    ``n``, loaded at ``r_arm`` like the held-out evaluation); no training. Rows whose global the store no longer
    has keep no value (early stopping then falls back to client validation for that arm)."""
    model.eval()
    for row in tqdm(_missing_fixed_val(rows), desc="fixed validation of the stored globals", unit="round",
                    leave=False, disable=None):
        try:
            weights = load_file(str(store.get_global(int(row["round"])).path / ADAPTER_FILE))
        except (FileNotFoundError, KeyError, ValueError):  # pragma: no cover  (a store pruned by hand)
            logger.warning("No stored global for round %s in %s: its fixed_val_ppl stays empty.", row["round"],
                           rows_path.parent)
            continue
        _load_global(model, weights, r_arm)
        row[FIXED_VAL] = wb.fixed_validation_ppl(model)
    _write_rows(rows_path, rows)
    return rows


def fill_fixed_val_rows(wb: Workbench, arm: str, arm_dir: Path) -> int:
    """Add ``fixed_val_ppl`` to the recorded rounds of a federated arm that lack it (run folders written before
    the column), evaluating the globals its store kept; training is not repeated. Returns how many rows were
    filled (0 when none lacked it; then the file is not touched).

    Example:
        ```py
        >>> fill_fixed_val_rows(wb, "homlora_rmin", Path("runs/x/seed-0/homlora_rmin"))  # doctest: +SKIP
        11
        ```
    """
    rows_path = arm_dir / "rounds.jsonl"
    rows = _read_rows(rows_path)
    missing = len(_missing_fixed_val(rows))
    if not missing:
        return 0
    config = wb.config
    spec = ARMS[arm]
    r_arm, _ = arm_ranks(config, arm, initial_client_ranks(config, wb.corpus.client_ids, wb.seed))
    store = LocalStore(arm_dir / "store")
    with _peft_model(wb, arm_adapter_config(config, r_arm, wb, prune=spec["prune"]), wb.seed) as model:
        rows = _fill_fixed_val(wb, model, store, r_arm, rows_path, rows)
    return missing - len(_missing_fixed_val(rows))


def fill_fixed_val_folder(folder: str | Path) -> dict[str, Any]:
    """`fill_fixed_val_rows` for every federated arm and seed of a `hetlora simulate` run folder (its
    ``config.json`` gives the settings); only for a folder no process is writing. Returns ``{"rows", "seconds",
    "arms"}``: rows filled, wall seconds of the evaluation (setup excluded) and the arm folders visited.

    Example:
        ```py
        >>> fill_fixed_val_folder("runs/study24/chitchat/raflora/s0")  # doctest: +SKIP
        {'rows': 11, 'seconds': 9.8, 'arms': ['seed-0/raflora']}
        ```
    """
    out = Path(folder)
    stored = json.loads((out / "config.json").read_text())["settings"]
    config = SimulationConfig(**stored)
    filled, seconds, visited = 0, 0.0, []
    for seed_dir in sorted(out.glob("seed-*")):
        arm_dirs = [d for d in sorted(seed_dir.iterdir()) if d.name in ARMS and (d / "store").is_dir()
                    and _missing_fixed_val(_read_rows(d / "rounds.jsonl"))]
        if not arm_dirs:
            continue
        wb = prepare(config, int(seed_dir.name.split("-")[1]), spill_dir=seed_dir / "activation_cache")
        for arm_dir in arm_dirs:
            started = time.perf_counter()
            filled += fill_fixed_val_rows(wb, arm_dir.name, arm_dir)
            seconds += time.perf_counter() - started
            visited.append(f"{seed_dir.name}/{arm_dir.name}")
        if wb.cache is not None and wb.cache.path is not None:
            wb.cache.path.unlink(missing_ok=True)
    return {"rows": filled, "seconds": seconds, "arms": visited}


def refresh_window_rows(wb: Workbench, arm: str, arm_dir: Path) -> int:
    """Redo the client validation perplexity and download bytes of a window arm's recorded rounds with the model
    its clients hold (the whole global, `held_rank`), from the globals in its store; training is not repeated.

    For run folders written before that rule (they measured a window client on its rank-k prefix). Rows already
    measured so are kept; the file is replaced atomically. Returns how many rows changed.
    """
    config = wb.config
    spec = ARMS[arm]
    r_arm, _ = arm_ranks(config, arm, initial_client_ranks(config, wb.corpus.client_ids, wb.seed))
    rows_path = arm_dir / "rounds.jsonl"
    rows = _read_rows(rows_path)
    stale = [r for r in rows if r["round"] > 0 and r.get("client_val_model") != HELD]
    if not stale:
        return 0
    store = LocalStore(arm_dir / "store")
    with _peft_model(wb, arm_adapter_config(config, r_arm, wb, prune=spec["prune"]), wb.seed) as model:
        model.eval()
        for row in tqdm(stale, desc=f"{arm}: client validation of the held model", unit="round", leave=False):
            t = row["round"] - 1
            info = json.loads((store.get_global(t).path / ROUND_FILE).read_text())
            summary = store.read_summary(t)
            sent_global = load_file(str(store.get_global(t).path / ADAPTER_FILE))
            participants = {cid: int(info["ranks"][cid]) for cid in info["participants"]}
            row["download_bytes"] = _held_download_bytes(sent_global, spec, r_arm, participants)
            weights = load_file(str(store.get_global(t + 1).path / ADAPTER_FILE))
            client_ranks = summary.get("client_ranks", {})
            accepted = {cid: int(client_ranks.get(cid, info["ranks"][cid])) for cid in summary["accepted"]}
            row["client_val_ppl"] = _held_validation_ppl(wb, model, weights, spec, r_arm, accepted)
            row["client_val_model"] = HELD
    _write_rows(rows_path, rows)
    return len(stale)


def _callback_options(training: LocalTrainingConfig, message_format: str) -> dict[str, Any]:
    options: dict[str, Any] = {"nested": True} if training.nested else {}
    # a callback that encodes its own uploads declares the format; otherwise UploadTransform round-trips it
    if message_format != "fp32" and "message_format" in inspect.signature(FederatedClientCallback).parameters:
        options["message_format"] = message_format
    return options


def _sent_path(arm_dir: Path, t: int) -> Path:
    return arm_dir / "sent_bytes" / f"round-{t}.json"


def _read_sent(arm_dir: Path, t: int) -> dict[str, dict[str, int]]:
    path = _sent_path(arm_dir, t)
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_sent(arm_dir: Path, t: int, sent: dict[str, dict[str, int]]) -> None:
    path = _sent_path(arm_dir, t)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sent, sort_keys=True))


def run_centralized_arm(wb: Workbench, arm_dir: Path, progress: RunProgress | None = None) -> dict[str, Any]:
    """LoRA at r_max on the pooled client data, with the compute of one federated round per round."""
    from datasets import Dataset, concatenate_datasets

    config = wb.config
    rows_path = arm_dir / "rounds.jsonl"
    rows = _read_rows(rows_path)
    order = sorted(wb.train)
    if wb.cache is not None:
        # the same permutation `Dataset.shuffle(seed)` applies to the pooled rows (it depends on length and seed)
        n_rows = sum(len(wb.train[cid]) for cid in order)
        permutation = Dataset.from_dict({"i": list(range(n_rows))}).shuffle(seed=wb.seed)["i"]
        pooled = CachedBlocks.concatenate([wb.train_set(cid) for cid in order]).select(permutation)
    else:
        pooled = concatenate_datasets([wb.train[cid] for cid in order]).shuffle(seed=wb.seed)
    steps = config.local_steps * config.clients_per_round
    with _peft_model(wb, arm_adapter_config(config, config.r_max, wb, prune=False), wb.seed) as model:
        checkpoint = arm_dir / "adapter"
        if rows and (checkpoint / ADAPTER_FILE).is_file():
            set_peft_model_state_dict(model, load_file(str(checkpoint / ADAPTER_FILE)))
        elif rows:
            rows = []
            rows_path.unlink()
        if not rows:
            row = {"round": 0, "heldout_ppl": wb.initial_heldout_ppl(model),
                   **fixed_val_columns(wb, model, config.fixed_validation, initial=True),
                   "upload_bytes": 0, "wall_s": 0.0}
            _append_row(rows_path, row)
            rows.append(row)
        hf_logging.set_verbosity_error()
        if progress is not None:
            progress.start_arm(f"centralized (seed {wb.seed})", done_rounds=min(len(rows) - 1, config.rounds))
        bar = tqdm(total=config.rounds, initial=len(rows) - 1, desc=f"centralized (seed {wb.seed})", unit="round",
                   disable=None)
        while len(rows) - 1 < config.rounds:
            started = time.perf_counter()
            t = len(rows) - 1
            offset = (t * steps * config.batch_size) % max(1, len(pooled))
            shard = pooled.select([(offset + i) % len(pooled) for i in range(steps * config.batch_size)])
            trainer = Trainer(
                model=wb.trainable(model),
                args=_training_args(config.training(prune=False), arm_dir / "trainer", wb.seed + t, steps),
                train_dataset=shard,
                data_collator=wb.train_collator(),
            )
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            model.save_pretrained(str(checkpoint))
            heldout = wb.heldout_ppl(model)
            row = {"round": t + 1, "heldout_ppl": heldout,
                   **({FIXED_VAL: wb.fixed_validation_ppl(model)} if config.fixed_validation else {}),
                   "upload_bytes": 0, "wall_s": time.perf_counter() - started}
            _append_row(rows_path, row)
            rows.append(row)
            bar.update(1)
            if progress is not None:
                progress.round_done()
                bar.set_postfix_str(progress.status())
        bar.close()
    return {"rounds": rows, "homogeneous_rank": config.r_max, "reference": False, "centralized": True}


# ----------------------------------------------------------------------------- driver
def _check_run_folder(out: Path, config: SimulationConfig) -> None:
    marker = out / "config.json"
    if marker.is_file():
        stored = json.loads(marker.read_text())
        if stored.get("fingerprint") != config.fingerprint():
            changed = sorted(
                k
                for k, v in config.to_dict().items()
                if stored.get("settings", {}).get(k) != v and k not in ("methods", "seeds", "engine")
            )
            raise RunFolderMismatch(
                f"{out} holds a run with different settings ({', '.join(changed) or 'fingerprint'}); use another "
                "--out folder or delete this one to start over."
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text(
            json_text({"fingerprint": config.fingerprint(), "settings": config.to_dict()}, indent=2, default=str)
        )


def run_simulation(config: SimulationConfig, out_dir: str | Path) -> Path:
    """Run every configured arm for every seed into `out_dir`; write `report.md`, `metrics.json`, plots.

    Rerunning with the same settings resumes: finished rounds are kept. Returns the report's path.

    Example:
        ```py
        >>> cfg = SimulationConfig.from_sources(profile="quick")
        >>> run_simulation(cfg, "runs/quick")  # doctest: +SKIP
        PosixPath('runs/quick/report.md')
        ```
    """
    out = Path(out_dir)
    _check_run_folder(out, config)
    per_seed: list[dict[str, Any]] = []
    cache_notes: list[str] = []
    quant_note = ""
    started = time.perf_counter()
    cpu_started = cpu_seconds()
    progress = RunProgress(len(config.seeds) * len(config.methods), config.rounds)
    for seed in config.seeds:
        random.seed(seed)
        wb = prepare(config, seed, spill_dir=out / f"seed-{seed}" / "activation_cache")
        # the Trainer runs gc.collect() at every train(); freezing the long-lived setup objects keeps it cheap
        gc.collect()
        gc.freeze()
        ranks0 = initial_client_ranks(config, wb.corpus.client_ids, seed)
        metrics: dict[str, Any] = {}
        for arm in config.methods:
            arm_dir = out / f"seed-{seed}" / arm
            arm_dir.mkdir(parents=True, exist_ok=True)
            if arm == "centralized":
                metrics[arm] = run_centralized_arm(wb, arm_dir, progress)
            elif config.engine == "flower":
                from .flower_engine import run_flower_arm

                progress.start_arm(f"{arm} (seed {seed}, Flower)")
                metrics[arm] = run_flower_arm(wb, arm, arm_dir / "flower", ranks0)
                progress.trained += config.rounds
            else:
                metrics[arm] = run_federated_arm(wb, arm, arm_dir, ranks0, progress)
        per_seed.append(metrics)
        cache_notes.append(f"seed {seed}: {wb.cache.describe() if wb.cache is not None else wb.cache_note}")
        if config.quantize is not None and not quant_note:
            from peft_hetlora.quantization import quantization_summary

            quant_note = f"Base model quantised ({config.quantize}): {json_text(quantization_summary(wb.base_model))}."
        if wb.cache is not None and wb.cache.path is not None:
            wb.cache.path.unlink(missing_ok=True)  # the spill file is scratch, not a result
    resources = {
        "wall_s": time.perf_counter() - started,
        "cpu_s": cpu_seconds() - cpu_started,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    notes = _notes(config, per_seed, resources) + "\n\n" + "; ".join(cache_notes) + "."
    if quant_note:
        notes += "\n\n" + quant_note
    return write_report(per_seed, out, notes=notes, seeds=config.seeds, reference=config.reference,
                        resources=resources)


def _notes(config: SimulationConfig, per_seed: list[dict[str, Any]], resources: dict[str, Any]) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if k not in ("methods",) and v is not None)
    wall, cpu = resources["wall_s"], resources["cpu_s"]
    ranked = [m for m in config.methods
              if ARMS[m].get("sampling", DEFAULT_CLIENT_SAMPLING) != DEFAULT_CLIENT_SAMPLING]
    def _ranked(m: str) -> str:
        rounds = ARMS[m].get("sampling_rounds")
        return m if rounds is None else f"{m} for the first {rounds} rounds"

    sampling = "the same client sampling" if not ranked else (
        f"the same client sampling (uniform; {', '.join(map(_ranked, ranked))}: in proportion to rank)")
    return (
        f"Settings: {settings}.\n\nAll arms use the same scale s = lora_alpha / r_max, {sampling} "
        f"and seeds. This invocation ran for {wall:.0f} s wall ({format_duration(wall)}) and {cpu:.0f} s CPU "
        f"(this process and its children; {cpu / max(wall, 1e-9):.2f} cores busy on average, of "
        f"{resources['cpu_count']}; torch threads {resources['torch_threads']}); resumed rounds are not re-run. "
        "Wall time grows with whatever else shares the cores; CPU time much less."
    )
