"""Federated evaluation of the global adapter on the clients, each at its current rank."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

import peft_hetlora.flower.records as rec
from peft_hetlora.federated.adapter import truncate
from peft_hetlora.federated.policies import sample_clients

from .nodes import short_reason

logger = logging.getLogger(__name__)

_EVAL_SEED_SALT = 1_000_003


class FederatedEvaluation:
    """Federated evaluation (held by `HetLoRAStrategy` as ``strategy.evaluator``; its Flower hooks call this).

    ``results`` maps a Flower round to its metrics (federated ``federated/...`` and central ``central/...``).

    Example:
        ```py
        >>> evaluator = FederatedEvaluation(seed=0)
        >>> evaluator.messages(1, {}, {}, fraction=1.0, min_nodes=1, client_ranks={}, arrays_key="arrays",
        ...                    config_key="config", config={}, adapter_config="{}")
        []
        ```
    """

    def __init__(self, *, seed: int) -> None:
        self.seed = seed
        self.pending: dict[int, dict[int, str]] = {}
        self.results: dict[int, dict[str, Any]] = {}

    def messages(self, server_round: int, state: Mapping[str, Any], connected: Mapping[str, int], *, fraction: float,
                 min_nodes: int, client_ranks: Mapping[str, int], arrays_key: str, config_key: str,
                 config: Mapping[str, Any], adapter_config: str) -> list[Message]:
        """The evaluation messages of ``server_round``: sampled clients get the global truncated to their rank."""
        t = server_round - 1
        pool = sorted(connected)
        if not pool:
            return []
        n = min(len(pool), max(int(len(pool) * fraction), min_nodes, 1))
        chosen = sample_clients(pool, n, seed=self.seed + _EVAL_SEED_SALT, round_idx=t)
        messages, pending = [], {}
        for cid in chosen:
            rank = client_ranks[cid]
            content = RecordDict({
                arrays_key: rec.state_dict_to_arrays(truncate(state, rank)),
                config_key: ConfigRecord({
                    **dict(config),
                    "server-round": server_round,
                    rec.ROUND: t,
                    rec.CLIENT_ID: cid,
                    rec.RANK: rank,
                    rec.ADAPTER_CONFIG: adapter_config,
                }),
            })
            messages.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=connected[cid]))
            pending[connected[cid]] = cid
        self.pending[t] = pending
        return messages

    def aggregate(self, server_round: int, replies: Iterable[Message], tag: tuple[int, str]) -> MetricRecord | None:
        """Example-weighted mean of the clients' ``eval-loss``; failures are counted and logged."""
        t = server_round - 1
        pending = self.pending.pop(t, {})
        losses: list[tuple[float, int]] = []
        failed: dict[str, str] = {}
        answered = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            cid = pending.get(node, str(node))
            answered.add(node)
            if msg.has_error():
                failed[cid] = f"node error: {short_reason(msg.error.reason)}"
                continue
            try:
                metrics = msg.content[rec.METRICS_KEY]
                loss, n = float(metrics[rec.EVAL_LOSS]), int(metrics[rec.NUM_EXAMPLES])
            except (KeyError, TypeError, ValueError) as err:
                failed[cid] = f"malformed evaluation reply: {err}"
                continue
            if math.isfinite(loss) and n > 0:
                losses.append((loss, n))
            else:
                failed[cid] = f"invalid evaluation reply: loss={loss}, num-examples={n}"
        for node, cid in pending.items():
            if node not in answered:
                failed[cid] = "no reply before the round timeout"
        for cid, reason in failed.items():
            logger.warning("[ROUND %d/%s] evaluation client %s failed: %s", *tag, cid, reason)
        if not losses:
            return None
        total = sum(n for _, n in losses)
        mean = sum(loss * n for loss, n in losses) / total
        out = {"eval-loss": mean, "eval-perplexity": math.exp(min(mean, 700.0)), rec.NUM_EXAMPLES: total,
               "num-failed": len(failed)}
        self.results.setdefault(server_round, {}).update({f"federated/{k}": v for k, v in out.items()})
        return MetricRecord(out)
