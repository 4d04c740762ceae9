"""Mirrors a Flower run into an `AdapterStore` in the coordinator's layout (the records are `round`'s).

``federation.json``, ``rounds/<t>/global/`` (adapter, ``adapter_config.json``, ``round.json``) and
``rounds/<t>/summary.json``, so the Hub view of a Flower federation is the coordinator's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from peft_hetlora.federated.policies import DEFAULT_CLIENT_SAMPLING
from peft_hetlora.federated.round import RoundPlan, RoundSettings
from peft_hetlora.federated.stores import AdapterStore, json_text
from peft_hetlora.utils.constants import ADAPTER_FILE, CONFIG_FILE, ROUND_FILE, SERVER_STATE_FILE


class StoreMirror:
    """Publishes a Flower run's globals with their ``round.json`` (held by `HetLoRAStrategy` as ``strategy.mirror``).

    With a ``store``, global t goes to ``rounds/<t>/global/`` and round 0 first writes ``federation.json``; without
    one, a round's revision is ``flower-round-<t>``. ``revisions`` holds each published round's revision.

    Example:
        ```py
        >>> mirror = StoreMirror(None, clock=lambda: 0.0)
        >>> mirror.publish_round(0, ["a"], {"a": 2}, global_state={}, adapter_config={}, round_settings=None,
        ...                      federation=dict)
        'flower-round-0'
        ```
    """

    def __init__(self, store: AdapterStore | None, *, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock
        self.revisions: dict[int, str] = {}

    def publish_round(self, t: int, participants: list[str], ranks: dict[str, int], *,
                      global_state: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any],
                      round_settings: RoundSettings | None, federation: Callable[[], dict[str, Any]],
                      final: bool = False, components: dict[str, tuple[int, ...]] | None = None,
                      server_state: Mapping[str, torch.Tensor] | None = None,
                      client_sampling: str = DEFAULT_CLIENT_SAMPLING) -> str:
        """Publish global t with its round.json (to the store if any); returns its revision.

        ``client_sampling``: the policy that drew ``participants`` (round.json names it when it is not uniform).

        ``server_state`` (the server step's, `round.server_step`) goes beside the adapter as `SERVER_STATE_FILE`.

        ``federation`` builds ``federation.json`` (called once, for round 0 of a store).
        """
        if t in self.revisions:
            return self.revisions[t]
        if self.store is None:
            self.revisions[t] = f"flower-round-{t}"
            return self.revisions[t]
        if t == 0:
            existing = self.store.read_federation()
            if existing is not None:
                raise ValueError("The store already holds a federation; mirror a Flower run into a new store "
                                 "(a fresh folder or Hub repo).")
            self.store.write_federation(federation())
        plan = RoundPlan(t, list(participants), {cid: int(r) for cid, r in ranks.items()}, opened_at=self.clock(),
                         final=final, components=components, client_sampling=client_sampling)
        info = plan.to_json(round_settings)
        with tempfile.TemporaryDirectory(prefix=f"hetlora-flower-global-{t}-") as tmp:
            folder = Path(tmp)
            tensors = {k: global_state[k] for k in sorted(global_state)}
            save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
            (folder / CONFIG_FILE).write_text(json_text(adapter_config, indent=2, sort_keys=True) + "\n")
            (folder / ROUND_FILE).write_text(json_text(info, indent=2, sort_keys=True) + "\n")
            if server_state is not None:
                save_file({k: server_state[k].contiguous() for k in sorted(server_state)},
                          str(folder / SERVER_STATE_FILE), metadata={"format": "pt"})
            self.revisions[t] = self.store.publish_global(t, folder)
        return self.revisions[t]


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
