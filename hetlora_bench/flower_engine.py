"""`hetlora simulate --engine flower`: the same arms through a Flower (Ray) simulation.

Each federated arm becomes one `run_flower_simulation` with the arm's ranks and aggregation, the
same client datasets, seeds and central held-out evaluation; rounds are mirrored to a `LocalStore`
in the arm's folder (the coordinator's layout). Rows have the in-process engine's columns, measured by the same
functions (`round_measures`): the clients' validation perplexity on the model each holds of the new global
(``client_val_ppl``), the participants' download bytes, the upload bytes the server received (``upload_bytes``: the
encoded message plus its report, as the coordinator counts them) and the tensor bytes of the accepted uploads in
their message format (``payload_bytes``, from the validated updates the strategy keeps for the arm's rounds).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_hetlora.federated import LocalStore
from peft_hetlora.utils import ADAPTER_FILE

from .arm_setup import arm_adapter_config, arm_coordinator_settings, arm_ranks
from .arms import ARMS
from .round_measures import (
    HELD,
    arm_peft_model,
    fixed_val_columns,
    held_download_bytes,
    held_validation_ppl,
    load_global,
    message_payload_bytes,
)


def load_base_model(model_dir: str) -> torch.nn.Module:
    """A fresh base model (module-level so Ray can pickle a partial of it)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


def run_flower_arm(wb: Any, arm: str, arm_dir: Path, ranks0: dict[str, int]) -> dict[str, Any]:
    """Run one federated arm on Flower and return its metrics `{"rounds": [...], ...}`: the arm's settings record
    (`arm_setup.arm_coordinator_settings`, as the in-process engine's `Coordinator` takes it) and local training record
    (`SimulationConfig.training`)."""
    from .engines import run_flower_simulation

    config = wb.config
    spec = ARMS[arm]
    r_arm, ranks = arm_ranks(config, arm, ranks0)
    clients = sorted(ranks)
    settings = arm_coordinator_settings(config, arm, r_arm, ranks, wb.seed)
    adapter_config = arm_adapter_config(config, r_arm, wb, prune=spec["prune"])
    store = LocalStore(arm_dir / "store", create=True)
    run = run_flower_simulation(
        adapter_config=adapter_config,
        settings=settings,
        model_fn=functools.partial(load_base_model, str(wb.model_dir)),
        client_datasets={cid: wb.train[cid] for cid in clients},
        data_collator=wb.collator,
        rounds=config.rounds,
        training=config.training(prune=spec["prune"], nested=bool(spec.get("nested")),
                                 use_cpu=not torch.cuda.is_available()),
        message_format=config.message_format,
        eval_dataset=wb.heldout,
        eval_batch_size=config.eval_batch_size,
        store=store,
        num_cpus=os.cpu_count(),
        keep_updates=True,  # the accepted uploads' payload bytes (the rows' payload_bytes)
    )
    with arm_peft_model(wb, adapter_config, wb.seed) as model:
        model.eval()
        rows = _rows(run, ranks, wb, model, store, arm, r_arm, config.message_format, config.fixed_validation)
    info: dict[str, Any] = {
        "rounds": rows,
        "homogeneous_rank": None if spec["ranks"] == "heterogeneous" else r_arm,
        "clients": len(clients),
        "aggregation": spec["aggregation"],
        "message_format": config.message_format,
        "engine": "flower",
    }
    if settings.dp is not None:
        info["dp"] = settings.dp.to_dict()
    return info


def _rows(run: Any, ranks: dict[str, int], wb: Any, model: Any, store: LocalStore, arm: str, r_arm: int,
          message_format: str, fixed_validation: bool = True) -> list[dict[str, Any]]:
    """The arm's round rows (the in-process runner's columns) from a finished Flower run and its mirrored store."""
    spec = ARMS[arm]
    current = dict(ranks)
    rows = [
        {
            "round": 0,
            "heldout_ppl": run.evaluation[0]["central/eval-perplexity"],
            **fixed_val_columns(wb, model, fixed_validation, initial=True),
            "upload_bytes": 0,
            "download_bytes": 0,
            "ranks": dict(current),
            "wall_s": 0.0,
        }
    ]
    for summary in run.rounds:
        t = summary["round"]
        assigned = summary["assigned_ranks"]
        client_ranks = summary.get("client_ranks", {})
        current.update(client_ranks)
        sent = load_file(str(store.get_global(t).path / ADAPTER_FILE))
        weights = load_file(str(store.get_global(t + 1).path / ADAPTER_FILE))
        accepted = {cid: int(client_ranks.get(cid, assigned[cid])) for cid in summary["accepted"]}
        updates = [u for u in run.updates.get(t, []) if u.client_id in accepted]
        load_global(model, weights, r_arm)
        fixed = fixed_val_columns(wb, model, fixed_validation)  # before the client validation reloads other ranks
        rows.append(
            {
                "round": t + 1,
                "heldout_ppl": run.evaluation[t + 1]["central/eval-perplexity"],
                "client_val_ppl": held_validation_ppl(wb, model, weights, spec, r_arm, accepted),
                "client_val_model": HELD,
                **fixed,
                # as the server received them: the encoded message and its report
                "upload_bytes": summary["metrics"].get("bytes_uploaded", 0),
                "payload_bytes": sum(message_payload_bytes(u.state_dict, u.metadata.get("message_format")
                                                           or message_format) for u in updates),
                "client_upload_bytes": {cid: (summary.get("clients", {}).get(cid) or {}).get("upload_bytes")
                                        for cid in summary["accepted"]},
                "message_format": message_format,
                "attackers": [],  # the Flower engine runs honest arms only (arms.runs_on_flower)
                "epsilon": (summary.get("privacy") or {}).get("epsilon"),
                "download_bytes": held_download_bytes(sent, spec, r_arm, {c: assigned[c] for c in
                                                                          summary["participants"]}),
                "ranks": {cid: int(r) for cid, r in current.items()},
                "rejected": {**summary.get("rejected", {}), **summary.get("failed", {})},
                "train_loss": summary["metrics"].get("train_loss"),
                "wall_s": summary["metrics"].get("seconds"),
            }
        )
    run.updates.clear()  # the payload was all they were kept for
    return rows
