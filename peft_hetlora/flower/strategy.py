"""`HetLoRAStrategy`: HetLoRA as a Flower Message-API strategy (a `FedAvg` subclass).

Per round ``t`` (Flower's ``server_round`` is ``t + 1``):

1. ``configure_train`` identifies new nodes (a ``query`` message: each node reports its stable client id, e.g.
   ``client-<partition-id>``, and optionally a ``max-rank``), so ranks follow clients, not Flower node ids; samples
   the round's clients with the coordinator's seeded `sample_clients`; and sends every selected node the global
   adapter **truncated to that client's rank** with a `ConfigRecord` holding the rank, the adapter config and the
   local training settings.
2. ``aggregate_train`` turns each reply into a `ClientUpdate`, validated with the coordinator's upload checks
   (`peft_hetlora.federated.validation`: keys, shapes for the declared rank, dtype, finite values, size, metadata),
   and calls `peft_hetlora.federated.aggregate` (any method: ``hetlora``, ``zero_pad``, ``fedavg``, ``flexlora``,
   ``rankwise`` with ``previous`` = the current global). Failed nodes (error replies, no reply) and rejected uploads
   are logged, listed in the round summary and counted in the returned `MetricRecord`; the round completes with
   the rest. A client's next rank is the ``rank-out`` it reported after self-pruning.
3. ``configure_evaluate`` / ``aggregate_evaluate`` evaluate the global adapter on the clients (at their ranks); a
   central ``evaluate_fn`` passed to ``start`` works as with any Flower strategy.

With ``store=`` (`LocalStore` or `HubStore`) every round is mirrored in the coordinator's layout: ``federation.json``,
``rounds/<t>/global/`` (adapter, ``adapter_config.json``, ``round.json`` with participants and ranks) and
``rounds/<t>/summary.json`` (written before global ``t + 1``), so the Hub view of a Flower federation is the
coordinator's.

Example:
    ```py
    from flwr.app import ArrayRecord
    from flwr.serverapp import ServerApp

    strategy = HetLoRAStrategy(HetLoRAConfig(r=16, r_min=2, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
                               method="hetlora", clients_per_round=4)
    app = ServerApp()

    @app.main()
    def main(grid, context):
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_adapter_state_dict), num_rounds=10)
    ```
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import save_file

from peft_hetlora.federated.aggregation import AGGREGATION_METHODS, ClientUpdate, aggregate, truncate, update_norm
from peft_hetlora.federated.coordinator import FEDERATION_FORMAT, scaling_from_config
from peft_hetlora.federated.rank_policy import RankPolicy, sample_clients
from peft_hetlora.federated.store import AdapterStore, validate_client_id
from peft_hetlora.federated.validation import (
    ADAPTER_FILE,
    CLIENT_FILE,
    CONFIG_FILE,
    DEFAULT_MAX_EXAMPLES,
    RejectedUpload,
    UploadSpec,
    validate_upload,
)

from . import records as rec
from .local_round import LocalTrainingConfig

logger = logging.getLogger(__name__)

ROUND_FILE = "round.json"
NEXT_RANK_RULES = ("rank_out", "initial")
_EVAL_SEED_SALT = 1_000_003


class HetLoRAStrategy(FedAvg):
    """Federated HetLoRA on Flower: per-client ranks, truncated distribution, validated heterogeneous aggregation.

    Args:
        adapter_config: the federation's `HetLoRAConfig` (or its dict / JSON): ``r`` is ``r_max``; clients get a copy
            with their own ``rank``.
        method: aggregation method (``AGGREGATION_METHODS``).
        r_min: smallest rank (default: the config's ``r_min``).
        rank_policy: initial ranks: a `RankPolicy`, a policy name or ``{client_id: rank}`` (default: ``"uniform"``;
            ``"constant"`` at ``r_max`` for ``fedavg``). Without ``clients`` only per-client policies work
            (uniform, constant, explicit, budget).
        clients: optional roster of client ids; nodes reporting other ids are not selected.
        clients_per_round: clients sampled per round (default: ``max(fraction_train * connected, min_train_nodes)``).
        fraction_train, min_train_nodes, min_available_nodes, fraction_evaluate, min_evaluate_nodes: as in `FedAvg`.
        min_replies: accepted uploads needed to update the global adapter (else it is carried over unchanged).
        seed: seeds client sampling and the clients' local training seeds.
        scaling: ``s`` for norms and clipping (default ``lora_alpha / r_max``, or rsLoRA's).
        clip_norm, weighting: passed to `aggregate`.
        next_rank: ``"rank_out"`` (a client's next rank is what it reported after pruning) or ``"initial"``.
        training: local training settings sent to the clients (`LocalTrainingConfig`).
        store: mirror every round to this `AdapterStore` in the coordinator's layout.
        query_timeout: seconds to wait for nodes to report their client id.
        keep_updates: keep each round's validated `ClientUpdate`s in ``round_updates`` (tests, debugging).
        clock, sleep: the wall clock (round timestamps) and the wait between node polls; tests inject fakes.

    Attributes:
        history: one summary dict per closed round (the coordinator's ``summary.json`` fields plus ``failed``).
        evaluation: ``round -> metrics`` of federated and central evaluation.
        client_ranks: ``client_id -> rank`` of the next round.
        global_state: the current global adapter (r_max, float32).

    Example:
        ```py
        strategy = HetLoRAStrategy(HetLoRAConfig(r=8, target_modules=["q_proj"]), clients_per_round=2)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(init_sd), num_rounds=3)
        strategy.history[-1]["accepted"]  # ['client-0', 'client-3']
        ```
    """

    def __init__(
        self,
        adapter_config: Any,
        *,
        method: str = "hetlora",
        r_min: int | None = None,
        rank_policy: RankPolicy | str | Mapping[str, int] | None = None,
        clients: Sequence[str] | None = None,
        clients_per_round: int | None = None,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 0,
        min_replies: int = 1,
        seed: int = 0,
        scaling: float | None = None,
        clip_norm: float | None = None,
        weighting: str = "per_client",
        next_rank: str = "rank_out",
        training: LocalTrainingConfig | None = None,
        store: AdapterStore | None = None,
        query_timeout: float = 120.0,
        max_examples: int = DEFAULT_MAX_EXAMPLES,
        keep_updates: bool = False,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=rec.NUM_EXAMPLES,
        )
        if method not in AGGREGATION_METHODS:
            raise ValueError(f"Unknown method {method!r}; use one of {AGGREGATION_METHODS}.")
        if next_rank not in NEXT_RANK_RULES:
            raise ValueError(f"next_rank must be one of {NEXT_RANK_RULES}, got {next_rank!r}.")
        self.adapter_config: dict[str, Any] = rec.federation_adapter_config(adapter_config, r_min)
        self.r_max = int(self.adapter_config["r"])
        self.r_min = int(self.adapter_config["r_min"])
        self.method = method
        default_policy = RankPolicy("constant") if method == "fedavg" else RankPolicy("uniform")
        self.rank_policy = RankPolicy.coerce(rank_policy) if rank_policy is not None else default_policy
        self.roster = [validate_client_id(c) for c in clients] if clients is not None else None
        if self.roster is None and self.rank_policy.kind == "tiers":
            raise ValueError("The tiers rank policy splits a known set of clients: pass clients=[...] (the roster).")
        if clients_per_round is not None and clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}.")
        self.clients_per_round = clients_per_round
        self.min_replies = max(1, int(min_replies))
        self.seed = int(seed)
        self.scaling = float(scaling) if scaling is not None else scaling_from_config(self.adapter_config, self.r_max)
        self.clip_norm = clip_norm
        self.weighting = weighting
        self.next_rank = next_rank
        self.training = training or LocalTrainingConfig()
        if method == "fedavg" and self.training.prune:  # homogeneous LoRA: every client stays at its rank
            self.training = dataclasses.replace(self.training, prune=False)
        self.store = store
        self.query_timeout = query_timeout
        self.max_examples = max_examples
        self.keep_updates = keep_updates
        self._clock = clock
        self._sleep = sleep

        self.global_state: dict[str, torch.Tensor] | None = None
        self.spec: UploadSpec | None = None
        self.num_rounds: int | None = None
        self.node_clients: dict[int, str] = {}
        self.node_max_rank: dict[str, int] = {}
        self.unidentified: dict[int, str] = {}
        self.initial_ranks: dict[str, int] = {}
        self.client_ranks: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        self.evaluation: dict[int, dict[str, Any]] = {}
        self.round_updates: dict[int, list[ClientUpdate]] = {}
        self._pending: dict[int, dict[int, tuple[str, int]]] = {}
        self._pending_eval: dict[int, dict[int, str]] = {}
        self._plans: dict[int, dict[str, Any]] = {}
        self._revisions: dict[int, str] = {}
        self._round_started: dict[int, float] = {}

    # ------------------------------------------------------------------------------------------------ Flower hooks
    def summary(self) -> None:
        """Log the strategy's configuration (Flower calls this at start)."""
        super().summary()
        logger.info("HetLoRA: method=%s r_max=%d r_min=%d rank policy=%s clients_per_round=%s store=%s",
                    self.method, self.r_max, self.r_min, self.rank_policy.kind, self.clients_per_round,
                    type(self.store).__name__ if self.store is not None else None)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ):
        """Run `num_rounds` rounds (see `flwr.serverapp.strategy.Strategy.start`); publishes the final global.

        ``initial_arrays`` is the global adapter at rank ``r_max`` (PEFT saved keys). Central evaluation results are
        also recorded in ``evaluation``.
        """
        self.num_rounds = int(num_rounds)
        wrapped = None
        if evaluate_fn is not None:

            def wrapped(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
                res = evaluate_fn(server_round, arrays)
                if res is not None:
                    self.evaluation.setdefault(server_round, {}).update({f"central/{k}": v for k, v in res.items()})
                return res

        result = super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, wrapped)
        self._publish_final()
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled client the global adapter truncated to its rank."""
        if self.fraction_train == 0.0:
            return []
        t = server_round - 1
        self._set_global(rec.arrays_to_state_dict(arrays))
        connected = self._connected_clients(grid, self.min_available_nodes)
        pool = sorted(connected)
        if not pool:
            logger.warning("[ROUND %d/%s] no identified client is connected; nothing to train.", *self._tag(t))
            return []
        n = self.clients_per_round or max(int(len(pool) * self.fraction_train), self.min_train_nodes)
        if n > len(pool):
            logger.warning("[ROUND %d/%s] %d clients wanted but %d connected; sampling all.", *self._tag(t), n,
                           len(pool))
            n = len(pool)
        participants = sample_clients(pool, n, seed=self.seed, round_idx=t)
        ranks = {cid: self.client_ranks[cid] for cid in participants}
        self._plans[t] = {"participants": participants, "ranks": ranks}
        self._round_started[t] = self._clock()
        revision = self._publish_round(t, participants, ranks)
        messages = []
        pending: dict[int, tuple[str, int]] = {}
        for cid in participants:
            node = connected[cid]
            rank = ranks[cid]
            content = RecordDict({
                self.arrayrecord_key: rec.state_dict_to_arrays(truncate(self.global_state, rank)),
                self.configrecord_key: ConfigRecord({
                    **dict(config),
                    **self.training.to_config(),
                    "server-round": server_round,
                    rec.ROUND: t,
                    rec.CLIENT_ID: cid,
                    rec.RANK: rank,
                    rec.R_MAX: self.r_max,
                    rec.R_MIN: self.r_min,
                    rec.METHOD: self.method,
                    rec.SEED: rec.local_seed(self.seed, cid, t),
                    rec.ADAPTER_CONFIG: json.dumps(self.adapter_config, sort_keys=True),
                    "global-revision": revision,
                }),
            })
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
            pending[node] = (cid, rank)
        self._pending[t] = pending
        logger.info("[ROUND %d/%s] training %s", *self._tag(t), ", ".join(f"{c}@r{ranks[c]}" for c in participants))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, aggregate the accepted ones with `aggregate`, report failures; returns the global."""
        t = server_round - 1
        replies = list(replies)
        pending = self._pending.pop(t, {})
        plan = self._plans.get(t, {"participants": [], "ranks": {}})
        failed: dict[str, str] = {}
        rejected: dict[str, str] = {}
        details: dict[str, dict[str, Any]] = {}
        accepted: list[str] = []
        kept: list[ClientUpdate] = []
        answered: set[int] = set()
        valid: list[tuple[str, int, Message]] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if node not in pending:
                logger.warning("[ROUND %d/%s] ignoring a reply from node %s, which was not asked to train.",
                               *self._tag(t), node)
                continue
            answered.add(node)
            cid, rank = pending[node]
            if msg.has_error():
                failed[cid] = f"node error: {short_reason(msg.error.reason)}"
                logger.warning("[ROUND %d/%s] client %s (node %s) failed: %s", *self._tag(t), cid, node, failed[cid])
                logger.debug("[ROUND %d/%s] client %s full error: %s", *self._tag(t), cid, msg.error.reason)
            else:
                valid.append((cid, rank, msg))
        for node, (cid, _) in pending.items():
            if node not in answered:
                failed[cid] = "no reply before the round timeout"
                logger.warning("[ROUND %d/%s] client %s (node %s) did not reply.", *self._tag(t), cid, node)

        def updates() -> Iterator[ClientUpdate]:
            for cid, rank, msg in sorted(valid, key=lambda item: item[0]):
                try:
                    update = self._validate_reply(t, cid, rank, msg.content)
                except RejectedUpload as err:
                    rejected[cid] = err.reason
                    logger.warning("[ROUND %d/%s] rejected %s: %s", *self._tag(t), cid, err.reason)
                    continue
                accepted.append(cid)
                details[cid] = _client_details(update)
                if self.keep_updates:
                    kept.append(update)
                yield update

        previous = self.global_state  # rankwise keeps uncovered components; clip_norm clips around it
        result = None
        try:
            result = aggregate(updates(), method=self.method, r_max=self.r_max, scaling=self.scaling,
                               previous=previous, clip_norm=self.clip_norm, weighting=self.weighting)
        except ValueError:
            if accepted:
                raise
        note = None
        if result is not None and len(accepted) < self.min_replies:
            note = (f"only {len(accepted)} accepted upload(s), below min_replies={self.min_replies}: the global "
                    "adapter is carried over unchanged")
            result = None
        elif result is None:
            note = "no accepted upload: the global adapter is carried over unchanged"
        if note:
            logger.warning("[ROUND %d/%s] %s.", *self._tag(t), note)
        if result is not None:
            self._set_global(result.state_dict)
        if self.next_rank == "rank_out":
            for cid in accepted:
                self.client_ranks[cid] = int(details[cid]["rank_out"])
        if self.keep_updates:
            self.round_updates[t] = kept
        summary = self._round_summary(t, plan, result, accepted, rejected, failed, details, note)
        self.history.append(summary)
        if self.store is not None:
            self.store.write_summary(t, summary)
        return rec.state_dict_to_arrays(self.global_state), MetricRecord(_round_metrics(summary))

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
                    rec.ADAPTER_CONFIG: json.dumps(self.adapter_config, sort_keys=True),
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

    # ------------------------------------------------------------------------------------------------ clients
    def _tag(self, t: int) -> tuple[int, str]:
        """Flower's ``[ROUND n/N]`` numbers for store round ``t`` (store rounds count from 0, Flower's from 1)."""
        return t + 1, str(self.num_rounds) if self.num_rounds is not None else "?"

    def _wait_for_nodes(self, grid: Grid, minimum: int) -> list[int]:
        waited = 0
        while len(nodes := list(grid.get_node_ids())) < minimum:
            if waited % 30 == 0:
                logger.info("Waiting for nodes to connect: %d connected (minimum required: %d).", len(nodes), minimum)
            self._sleep(1.0)
            waited += 1
        return nodes

    def _connected_clients(self, grid: Grid, minimum: int) -> dict[str, int]:
        """``client_id -> node_id`` of the connected, identified clients that may train."""
        nodes = self._wait_for_nodes(grid, minimum)
        unknown = [n for n in nodes if n not in self.node_clients]
        if unknown:
            self._identify(grid, unknown, set(nodes))
        live = set(nodes)
        out = {cid: node for node, cid in self.node_clients.items() if node in live and cid in self.client_ranks}
        return dict(sorted(out.items()))

    def _identify(self, grid: Grid, nodes: list[int], live: set[int]) -> None:
        messages = [
            Message(
                content=RecordDict({rec.QUERY_KEY: ConfigRecord({"ask": rec.CLIENT_ID})}),
                message_type=MessageType.QUERY,
                dst_node_id=node,
            )
            for node in nodes
        ]
        answered = set()
        for msg in grid.send_and_receive(messages, timeout=self.query_timeout):
            node = msg.metadata.src_node_id
            answered.add(node)
            try:
                if msg.has_error():
                    raise ValueError(f"node error: {short_reason(msg.error.reason)}")
                answer = msg.content[rec.QUERY_KEY]
                cid = validate_client_id(str(answer[rec.CLIENT_ID]))
                max_rank = int(answer[rec.MAX_RANK]) if rec.MAX_RANK in answer else None
            except (KeyError, TypeError, ValueError) as err:
                self.unidentified[node] = f"could not identify the node: {err}"
                logger.warning("Node %s did not report a usable client id (%s); it is not sampled.", node, err)
                continue
            holder = next((n for n, c in self.node_clients.items() if c == cid and n in live and n != node), None)
            if holder is not None:
                self.unidentified[node] = f"client id {cid!r} is already used by connected node {holder}"
                logger.error("Node %s reports client id %r, already used by connected node %s; ignoring it.",
                             node, cid, holder)
                continue
            for old in [n for n, c in self.node_clients.items() if c == cid]:
                del self.node_clients[old]  # the client reconnected as a new node: its rank follows it
            if self.roster is not None and cid not in self.roster:
                self.unidentified[node] = f"client id {cid!r} is not in the federation's roster"
                logger.warning("Node %s reports client id %r, which is not in the roster; it is not sampled.",
                               node, cid)
                continue
            if max_rank is not None:
                self.node_max_rank[cid] = max_rank
            try:
                self._ensure_rank(cid)
            except ValueError as err:
                self.unidentified[node] = f"no rank for client {cid!r}: {err}"
                logger.warning("Node %s (client %s) gets no rank (%s); it is not sampled.", node, cid, err)
                continue
            self.node_clients[node] = cid
            self.unidentified.pop(node, None)
        for node in nodes:
            if node not in answered:
                self.unidentified[node] = "no answer to the identification query"

    def _ensure_rank(self, cid: str) -> None:
        if cid in self.client_ranks:
            return
        dims = dict(self.spec.modules) if self.spec is not None else None
        if self.roster is not None:
            if not self.initial_ranks:
                self.initial_ranks = self.rank_policy.assign(
                    self.roster, r_min=self.r_min, r_max=self.r_max, module_dims=dims, seed=self.seed
                )
            rank = self.initial_ranks[cid]
        else:
            policy = self.rank_policy
            if policy.kind == "explicit":
                if cid not in (policy.ranks or {}):
                    raise ValueError(f"The explicit rank policy has no rank for client {cid!r}; add it to the map.")
                policy = RankPolicy("explicit", ranks={cid: policy.ranks[cid]})
            elif policy.kind == "budget":
                if cid not in (policy.budgets or {}):
                    raise ValueError(f"The budget rank policy has no budget for client {cid!r}; add it.")
                policy = RankPolicy("budget", budgets={cid: policy.budgets[cid]}, budget_kind=policy.budget_kind,
                                    bytes_per_param=policy.bytes_per_param)
            rank = policy.assign([cid], r_min=self.r_min, r_max=self.r_max, module_dims=dims, seed=self.seed)[cid]
        cap = self.node_max_rank.get(cid)
        if cap is not None:
            if cap < self.r_min:
                logger.warning("Client %s reports max-rank %d < r_min=%d; it cannot take part.", cid, cap, self.r_min)
                return
            rank = min(rank, cap)
        self.initial_ranks.setdefault(cid, rank)
        self.client_ranks[cid] = rank

    # ------------------------------------------------------------------------------------------------ validation
    def _set_global(self, state: Mapping[str, torch.Tensor]) -> None:
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        if self.spec is None:
            self.spec = UploadSpec.from_state_dict(state, r_min=self.r_min, r_max=self.r_max,
                                                   max_examples=self.max_examples)
            ranks = {v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")}
            if ranks != {self.r_max}:
                raise ValueError(f"The initial global adapter has rank(s) {sorted(ranks)} but r_max is {self.r_max}: "
                                 "pass it at full rank (HetLoRAConfig(r=r_max, rank=r_max)).")
        self.global_state = state

    def _validate_reply(self, t: int, cid: str, rank: int, content: RecordDict) -> ClientUpdate:
        """The coordinator's upload checks on an in-memory reply (via a private temporary upload folder)."""
        if self.arrayrecord_key not in content or rec.METRICS_KEY not in content:
            raise RejectedUpload(f"reply lacks its {self.arrayrecord_key!r} ArrayRecord or {rec.METRICS_KEY!r} "
                                 "MetricRecord")
        try:
            state = rec.arrays_to_state_dict(content[self.arrayrecord_key])
        except Exception as err:  # noqa: BLE001 - undecodable arrays are a rejection, never a crash
            raise RejectedUpload(f"arrays could not be decoded: {err}") from None
        metrics = content[rec.METRICS_KEY]
        meta = {
            "client_id": cid,
            "round": t,
            "rank_in": metrics.get(rec.RANK_IN),
            "rank_out": metrics.get(rec.RANK_OUT),
            "num_examples": metrics.get(rec.NUM_EXAMPLES),
            "train_loss": metrics.get(rec.TRAIN_LOSS),
            "tail_norm_start": metrics.get(rec.TAIL_NORM_START),
            "tail_norm_end": metrics.get(rec.TAIL_NORM_END),
            "global_revision": self._revisions.get(t),
            "local_seconds": metrics.get("seconds"),
        }
        with tempfile.TemporaryDirectory(prefix="hetlora-flower-reply-") as tmp:
            folder = Path(tmp)
            try:
                save_file(state, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
            except Exception as err:  # noqa: BLE001
                raise RejectedUpload(f"arrays are not a valid adapter state dict: {err}") from None
            (folder / CLIENT_FILE).write_text(json.dumps(meta))
            return validate_upload(
                folder, self.spec, client_id=cid, round_idx=t, assigned_rank=rank,
                required_rank=rank if self.method == "fedavg" else None,
            )

    # ------------------------------------------------------------------------------------------------ store
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
            (folder / CONFIG_FILE).write_text(json.dumps(self.adapter_config, indent=2, sort_keys=True) + "\n")
            (folder / ROUND_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            self._revisions[t] = self.store.publish_global(t, folder)
        return self._revisions[t]

    def _publish_final(self) -> None:
        if self.num_rounds is None or self.global_state is None or self.store is None:
            return
        if not self.history or self.history[-1]["round"] != self.num_rounds - 1:
            return
        self._publish_round(self.num_rounds, [], {}, final=True)

    # ------------------------------------------------------------------------------------------------ summary
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
            "train_loss": sum(loss * n for loss, n in losses) / sum(n for _, n in losses) if losses else None,
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


_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?:\(\w+\))?: (.+)$")
_WRAPPERS = ("RayTaskError", "ClientAppException", "RayActorError")


def short_reason(reason: str | None, limit: int = 500) -> str:
    """The useful line of a node's error reason (Flower/Ray wrap the ClientApp's exception in full tracebacks).

    Example:
        ```py
        >>> short_reason("Traceback ...\\n  File x\\nRuntimeError: disk full\\nmore")
        'RuntimeError: disk full'
        ```
    """
    text = str(reason or "unknown error")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        match = _EXCEPTION_LINE.match(line)
        if match and not any(w in match.group(1) for w in _WRAPPERS):
            return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"[:limit]
    for line in lines:
        if line.startswith("Message: "):
            return line[len("Message: "):][:limit]
    return (lines[-1] if lines else text)[:limit]


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
