"""Mirrors a Flower run into an `AdapterStore` in the coordinator's layout, and builds each round's summary.

``federation.json``, ``rounds/<t>/global/`` (adapter, ``adapter_config.json``, ``round.json``) and
``rounds/<t>/summary.json``, so the Hub view of a Flower federation is the coordinator's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from peft_hetlora.federated.aggregation import ClientUpdate
from peft_hetlora.federated.coordinator import FEDERATION_FORMAT, weighted_mean
from peft_hetlora.federated.keys import update_norm
from peft_hetlora.federated.store import json_text
from peft_hetlora.federated.validation import ADAPTER_FILE, CONFIG_FILE

ROUND_FILE = "round.json"


class StoreMirror:
    """Mixin of `HetLoRAStrategy`: publishes globals and ``round.json`` files, writes the round summaries."""

    def _federation(self, clients: Sequence[str]) -> dict[str, Any]:
        return {
            "format": FEDERATION_FORMAT,
            "engine": "flower",
            "method": self.method,
            "r_max": self.r_max,
            "r_min": self.r_min,
            "base_model": self.adapter_config.get("base_model_name_or_path"),
            "modules": {name: list(dims) for name, dims in self.spec.modules.items()},
            "adapter_config": self.adapter_config,
            "scaling": self.scaling,
            "clients": list(clients),
            "rank_policy": self.rank_policy.to_dict(),
            "initial_ranks": dict(self.initial_ranks),
            "clients_per_round": self.clients_per_round,
            "min_clients": self.min_replies,
            "rounds": self.num_rounds,
            "seed": self.seed,
            "clip_norm": self.clip_norm,
            "next_rank": self.next_rank,
            "created_at": self._clock(),
        }

    def _publish_round(self, t: int, participants: list[str], ranks: dict[str, int], final: bool = False) -> str:
        """Publish global t with its round.json (to the store if any); returns its revision."""
        if t in self._revisions:
            return self._revisions[t]
        if self.store is None:
            self._revisions[t] = f"flower-round-{t}"
            return self._revisions[t]
        if t == 0:
            existing = self.store.read_federation()
            if existing is not None:
                raise ValueError("The store already holds a federation; mirror a Flower run into a new store "
                                 "(a fresh folder or Hub repo).")
            self.store.write_federation(self._federation(self.roster or sorted(self.client_ranks)))
        info = {
            "round": t,
            "participants": list(participants),
            "ranks": {cid: int(r) for cid, r in ranks.items()},
            "r_max": self.r_max,
            "r_min": self.r_min,
            "method": self.method,
            "scaling": self.scaling,
            "opened_at": self._clock(),
            "deadline_s": None,
            "final": final,
            "engine": "flower",
        }
        with tempfile.TemporaryDirectory(prefix=f"hetlora-flower-global-{t}-") as tmp:
            folder = Path(tmp)
            tensors = {k: self.global_state[k] for k in sorted(self.global_state)}
            save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
            (folder / CONFIG_FILE).write_text(json_text(self.adapter_config, indent=2, sort_keys=True) + "\n")
            (folder / ROUND_FILE).write_text(json_text(info, indent=2, sort_keys=True) + "\n")
            self._revisions[t] = self.store.publish_global(t, folder)
        return self._revisions[t]

    def _publish_final(self) -> None:
        if self.num_rounds is None or self.global_state is None or self.store is None:
            return
        if not self.history or self.history[-1]["round"] != self.num_rounds - 1:
            return
        self._publish_round(self.num_rounds, [], {}, final=True)

    def _round_summary(self, t, plan, result, accepted, rejected, failed, details, note) -> dict[str, Any]:
        total = sum(details[c]["num_examples"] for c in accepted)
        losses = [(details[c]["train_loss"], details[c]["num_examples"]) for c in accepted
                  if details[c]["train_loss"] is not None]
        if result is not None:
            for cid, value in result.norms.items():
                if cid in details:
                    details[cid]["norm"] = float(value)
        metrics = {
            "num_participants": len(plan["participants"]),
            "num_accepted": len(accepted),
            "num_rejected": len(rejected),
            "num_failed": len(failed),
            "num_examples": total,
            "bytes_uploaded": sum(details[c]["upload_bytes"] for c in accepted),
            "mean_rank_in": sum(details[c]["rank_in"] for c in accepted) / len(accepted) if accepted else None,
            "mean_rank_out": sum(details[c]["rank_out"] for c in accepted) / len(accepted) if accepted else None,
            "train_loss": weighted_mean(losses),
            "global_update_norm": float(update_norm(result.state_dict, self.scaling)) if result is not None else None,
            "seconds": self._clock() - self._round_started.get(t, self._clock()),
        }
        summary = {
            "round": t,
            "engine": "flower",
            "method": self.method,
            "global_revision": self._revisions.get(t),
            "participants": list(plan["participants"]),
            "assigned_ranks": dict(plan["ranks"]),
            "accepted": list(accepted),
            "rejected": dict(rejected),
            "failed": dict(failed),
            "weights": {cid: float(w) for cid, w in result.weights.items()} if result is not None else {},
            "clients": details,
            "client_ranks": dict(self.client_ranks),
            "metrics": metrics,
            "aggregation": result.summary() if result is not None else None,
            "closed_at": self._clock(),
        }
        if note:
            summary["note"] = note
        return summary



def _client_details(update: ClientUpdate) -> dict[str, Any]:
    meta = update.metadata
    return {
        "rank_in": int(meta["rank_in"]),
        "rank_out": int(meta["rank_out"]),
        "num_examples": int(meta["num_examples"]),
        "train_loss": meta.get("train_loss"),
        "tail_norm_start": meta.get("tail_norm_start"),
        "tail_norm_end": meta.get("tail_norm_end"),
        "global_revision": meta.get("global_revision"),
        "local_seconds": meta.get("local_seconds"),
        "upload_bytes": int(meta["upload_bytes"]),
        "sha256": meta["sha256"],
    }


def _round_metrics(summary: Mapping[str, Any]) -> dict[str, float | int]:
    """The round summary as a Flower `MetricRecord` (numbers only; per-client flags as ``failed/<id>`` keys)."""
    out: dict[str, float | int] = {}
    for key, value in summary["metrics"].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key.replace("_", "-")] = value
    for cid in summary["failed"]:
        out[f"failed/{cid}"] = 1
    for cid in summary["rejected"]:
        out[f"rejected/{cid}"] = 1
    for cid in summary["accepted"]:
        out[f"rank-out/{cid}"] = int(summary["clients"][cid]["rank_out"])
    return out
