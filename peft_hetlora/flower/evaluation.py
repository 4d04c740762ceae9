"""Federated evaluation of the global adapter on the clients, each at its current rank."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

import peft_hetlora.flower.records as rec
from peft_hetlora.federated.adapter import truncate
from peft_hetlora.federated.policies import sample_clients
from peft_hetlora.federated.stores import json_text

from .nodes import short_reason

logger = logging.getLogger(__name__)

_EVAL_SEED_SALT = 1_000_003


class FederatedEvaluation:
    """Mixin of `HetLoRAStrategy`: the ``configure_evaluate`` / ``aggregate_evaluate`` Flower hooks."""

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send sampled clients the global adapter truncated to their current rank for federated evaluation."""
        if self.fraction_evaluate == 0.0:
            return []
        t = server_round - 1
        state = rec.arrays_to_state_dict(arrays)
        connected = self._connected_clients(grid, self.min_available_nodes)
        pool = sorted(connected)
        if not pool:
            return []
        n = min(len(pool), max(int(len(pool) * self.fraction_evaluate), self.min_evaluate_nodes, 1))
        chosen = sample_clients(pool, n, seed=self.seed + _EVAL_SEED_SALT, round_idx=t)
        messages, pending = [], {}
        for cid in chosen:
            rank = self.client_ranks[cid]
            content = RecordDict({
                self.arrayrecord_key: rec.state_dict_to_arrays(truncate(state, rank)),
                self.configrecord_key: ConfigRecord({
                    **dict(config),
                    **self.training.to_config(),
                    "server-round": server_round,
                    rec.ROUND: t,
                    rec.CLIENT_ID: cid,
                    rec.RANK: rank,
                    rec.ADAPTER_CONFIG: json_text(self.adapter_config, sort_keys=True),
                }),
            })
            messages.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=connected[cid]))
            pending[connected[cid]] = cid
        self._pending_eval[t] = pending
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' ``eval-loss``; failures are counted and logged."""
        t = server_round - 1
        pending = self._pending_eval.pop(t, {})
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
            logger.warning("[ROUND %d/%s] evaluation client %s failed: %s", *self._tag(t), cid, reason)
        if not losses:
            return None
        total = sum(n for _, n in losses)
        mean = sum(loss * n for loss, n in losses) / total
        out = {"eval-loss": mean, "eval-perplexity": math.exp(min(mean, 700.0)), rec.NUM_EXAMPLES: total,
               "num-failed": len(failed)}
        self.evaluation.setdefault(server_round, {}).update({f"federated/{k}": v for k, v in out.items()})
        return MetricRecord(out)
