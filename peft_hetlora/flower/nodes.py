"""Which Flower node is which client: the identification query, ranks that follow client ids, the node wait.

Flower node ids change when a device reconnects; HetLoRA ranks belong to clients. Each new node answers a ``query``
message with its stable client id (and optionally a ``max-rank``); the mixin keeps ``node -> client`` and gives a
client its initial rank from the rank policy the first time it is seen. `HetLoRAStrategy` holds one `NodeClients`
(``strategy.nodes``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

import peft_hetlora.flower.records as rec
from peft_hetlora.federated.policies import RankPolicy
from peft_hetlora.federated.stores import validate_client_id
from peft_hetlora.federated.upload import UploadSpec

logger = logging.getLogger(__name__)

_EXCEPTION_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?:\(\w+\))?: (.+)$")
_WRAPPERS = ("RayTaskError", "ClientAppException", "RayActorError")


class NodeClients:
    """Which node is which client, and each client's ranks (held by `HetLoRAStrategy` as ``strategy.nodes``).

    Owns ``node_clients`` (node -> client id), ``unidentified`` (node -> why it is not sampled), ``node_max_rank``
    (client -> the ``max-rank`` it reported), ``initial_ranks`` and ``client_ranks`` (the ranks of the next round).

    Example:
        ```py
        >>> from peft_hetlora.federated.policies import RankPolicy
        >>> nodes = NodeClients(RankPolicy("constant"), roster=None, r_min=2, r_max=8, seed=0, query_timeout=1.0,
        ...                     sleep=lambda s: None)
        >>> nodes.ensure_rank("a", spec=None); nodes.client_ranks
        {'a': 8}
        ```
    """

    def __init__(self, rank_policy: RankPolicy, *, roster: list[str] | None, r_min: int, r_max: int, seed: int,
                 query_timeout: float, sleep: Callable[[float], None]) -> None:
        self.rank_policy = rank_policy
        self.roster = roster
        self.r_min = r_min
        self.r_max = r_max
        self.seed = seed
        self.query_timeout = query_timeout
        self.sleep = sleep
        self.node_clients: dict[int, str] = {}
        self.node_max_rank: dict[str, int] = {}
        self.unidentified: dict[int, str] = {}
        self.initial_ranks: dict[str, int] = {}
        self.client_ranks: dict[str, int] = {}

    def wait_for_nodes(self, grid: Grid, minimum: int) -> list[int]:
        """The node ids connected to ``grid`` once at least ``minimum`` are."""
        waited = 0
        while len(nodes := list(grid.get_node_ids())) < minimum:
            if waited % 30 == 0:
                logger.info("Waiting for nodes to connect: %d connected (minimum required: %d).", len(nodes), minimum)
            self.sleep(1.0)
            waited += 1
        return nodes

    def connected_clients(self, grid: Grid, minimum: int, spec: UploadSpec | None) -> dict[str, int]:
        """``client_id -> node_id`` of the connected, identified clients that may train."""
        nodes = self.wait_for_nodes(grid, minimum)
        unknown = [n for n in nodes if n not in self.node_clients]
        if unknown:
            self.identify(grid, unknown, set(nodes), spec)
        live = set(nodes)
        out = {cid: node for node, cid in self.node_clients.items() if node in live and cid in self.client_ranks}
        return dict(sorted(out.items()))

    def identify(self, grid: Grid, nodes: list[int], live: set[int], spec: UploadSpec | None) -> None:
        """Ask ``nodes`` for their client ids; a new client gets its initial rank."""
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
                self.ensure_rank(cid, spec)
            except ValueError as err:
                self.unidentified[node] = f"no rank for client {cid!r}: {err}"
                logger.warning("Node %s (client %s) gets no rank (%s); it is not sampled.", node, cid, err)
                continue
            self.node_clients[node] = cid
            self.unidentified.pop(node, None)
        for node in nodes:
            if node not in answered:
                self.unidentified[node] = "no answer to the identification query"


    def ensure_rank(self, cid: str, spec: UploadSpec | None) -> None:
        """Give client ``cid`` its initial rank (from the rank policy, capped by its ``max-rank``) if it has none."""
        if cid in self.client_ranks:
            return
        dims = dict(spec.modules) if spec is not None else None
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
