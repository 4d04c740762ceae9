"""Mirrors a Flower run into an `AdapterStore` in the coordinator's layout (the records are `round`'s).

``federation.json``, ``rounds/<t>/global/`` (adapter, ``adapter_config.json``, ``round.json``) and
``rounds/<t>/summary.json``, so the Hub view of a Flower federation is the coordinator's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from peft_hetlora.federated.round import FEDERATION_FORMAT, RoundPlan
from peft_hetlora.federated.stores import json_text
from peft_hetlora.utils.constants import ADAPTER_FILE, CONFIG_FILE, ROUND_FILE


class StoreMirror:
    """Mixin of `HetLoRAStrategy`: writes ``federation.json``, publishes globals with their ``round.json``."""

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
            "dp": self.dp.to_dict() if self.dp is not None else None,
            "component_selection": self.component_selection,
            "anchor": self.anchor,
            "created_at": self._clock(),
        }

    def _publish_round(self, t: int, participants: list[str], ranks: dict[str, int], final: bool = False,
                       components: dict[str, tuple[int, ...]] | None = None) -> str:
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
        plan = RoundPlan(t, list(participants), {cid: int(r) for cid, r in ranks.items()}, opened_at=self._clock(),
                         final=final, components=components)
        info = plan.to_json(self.round_settings())
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


def round_metrics(summary: Mapping[str, Any]) -> dict[str, float | int]:
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
