"""`hetlora simulate --engine flower`: the same arms through a Flower (Ray) simulation.

Each federated arm becomes one `run_flower_simulation` with the arm's ranks and aggregation, the
same client datasets, seeds and central held-out evaluation; rounds are mirrored to a `LocalStore`
in the arm's folder (the coordinator's layout). Rows have the in-process engine's format.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from peft_hetlora.federated import LocalStore

from .arm_setup import arm_adapter_config, arm_coordinator_settings, arm_ranks
from .arms import ARMS


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
    run = run_flower_simulation(
        adapter_config=arm_adapter_config(config, r_arm, wb, prune=spec["prune"]),
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
        store=LocalStore(arm_dir / "store", create=True),
        num_cpus=os.cpu_count(),
    )
    info: dict[str, Any] = {
        "rounds": _rows(run, ranks),
        "homogeneous_rank": None if spec["ranks"] == "heterogeneous" else r_arm,
        "clients": len(clients),
        "aggregation": spec["aggregation"],
        "message_format": config.message_format,
        "engine": "flower",
    }
    if settings.dp is not None:
        info["dp"] = settings.dp.to_dict()
    return info


def _rows(run: Any, ranks: dict[str, int]) -> list[dict[str, Any]]:
    current = dict(ranks)
    rows = [
        {
            "round": 0,
            "heldout_ppl": run.evaluation[0]["central/eval-perplexity"],
            "upload_bytes": 0,
            "download_bytes": 0,
            "ranks": dict(current),
            "wall_s": 0.0,
        }
    ]
    for summary in run.rounds:
        t = summary["round"]
        current.update(summary.get("client_ranks", {}))
        rows.append(
            {
                "round": t + 1,
                "heldout_ppl": run.evaluation[t + 1]["central/eval-perplexity"],
                "upload_bytes": summary["metrics"].get("bytes_uploaded", 0),
                "ranks": {cid: int(r) for cid, r in current.items()},
                "rejected": {**summary.get("rejected", {}), **summary.get("failed", {})},
                "epsilon": (summary.get("privacy") or {}).get("epsilon"),
                "train_loss": summary["metrics"].get("train_loss"),
                "wall_s": summary["metrics"].get("seconds"),
            }
        )
    return rows
