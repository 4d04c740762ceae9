"""`HetLoRAStrategy`: HetLoRA as a Flower Message-API strategy (a `FedAvg` subclass).

Per round ``t`` (Flower's ``server_round`` is ``t + 1``):

1. ``configure_train`` identifies new nodes (a ``query`` message: each node reports its stable client id, e.g.
   ``client-<partition-id>``, and optionally a ``max-rank``), so ranks follow clients, not Flower node ids; samples
   the round's clients with the coordinator's seeded `round.plan_round`; and sends every selected node the global
   adapter **truncated to that client's rank** with a `ConfigRecord` holding the rank, the adapter config and the
   local training settings.
2. ``aggregate_train`` turns each reply into a `ClientUpdate`, validated in memory with the coordinator's upload
   checks (`validation.validate_update`: keys, shapes for the declared rank, dtype, finite values, size, metadata),
   and closes the round with the coordinator's engine, `peft_hetlora.federated.round.close_round` (any
   registered method, ``previous`` = the current global; DP rounds with ``dp=``). Failed nodes (error replies, no
   reply) and rejected uploads are logged, listed in the round summary and counted in the returned `MetricRecord`;
   the round completes with the rest. A client's next rank follows the ``next_rank`` rule, as the coordinator's.
3. ``configure_evaluate`` / ``aggregate_evaluate`` evaluate the global adapter on the clients (at their ranks); a
   central ``evaluate_fn`` passed to ``start`` works as with any Flower strategy.

With ``store=`` (`LocalStore` or `HubStore`) every round is mirrored in the coordinator's layout: ``federation.json``,
``rounds/<t>/global/`` (adapter, ``adapter_config.json``, ``round.json`` with participants and ranks) and
``rounds/<t>/summary.json`` (written before global ``t + 1``), so the Hub view of a Flower federation is the
coordinator's.

The class subclasses only Flower's `FedAvg` and holds small helpers, one idea each: `nodes.NodeClients` (which node
is which client, initial ranks), `replies.ReplyValidator` (reply -> validated `ClientUpdate`), `mirror.StoreMirror`
(store layout and round summaries) and `evaluation.FederatedEvaluation` (the evaluate hooks call it); this module
keeps the train hooks.

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
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

import peft_hetlora.flower.records as rec
from peft_hetlora.federated.adapter import truncate
from peft_hetlora.federated.aggregation import (
    DEFAULT_INFLUENCE_BOUND,
    ClientUpdate,
    get_aggregation,
)
from peft_hetlora.federated.policies import DEFAULT_CLIENT_SAMPLING, RankPolicy, check_rank_sampling_rounds
from peft_hetlora.federated.round import (
    FEDERATION_FORMAT,
    NEXT_RANK_RULES,
    Rejection,
    RoundPlan,
    RoundSettings,
    check_selection,
    close_round,
    default_method_and_selection,
    parse_server_optimizer,
    plan_round,
)
from peft_hetlora.federated.settings import FederationSettings, scaling_from_config
from peft_hetlora.federated.stores import AdapterStore, json_text
from peft_hetlora.federated.upload import RejectedUpload, UploadSpec
from peft_hetlora.utils.constants import ROUND_FILE

from .evaluation import FederatedEvaluation
from .local_round import LocalTrainingConfig
from .mirror import StoreMirror, round_metrics
from .nodes import NodeClients, short_reason
from .replies import ReplyValidator

logger = logging.getLogger(__name__)

__all__ = ["NEXT_RANK_RULES", "ROUND_FILE", "HetLoRAStrategy", "short_reason"]


def _check_flower_settings(settings: FederationSettings, adapter_config: Any) -> None:
    """Refuse what a Flower run has no place for: the coordinator's settings, an ``r_max`` other than the config's."""
    coordinator_only = [name for name in ("min_clients", "max_upload_bytes", "deadline_s")
                        if getattr(settings, name) is not None]
    coordinator_only += [name for name in ("allow_per_module_ranks", "require_global_revision")
                         if getattr(settings, name)]
    if coordinator_only:
        raise ValueError(f"HetLoRAStrategy: {coordinator_only} are coordinator settings a Flower run has no place "
                         "for; leave them out of the record.")
    if settings.client_training not in (None, "factors"):
        raise ValueError(f"HetLoRAStrategy: client_training={settings.client_training!r} (core clients) runs on the "
                         "Coordinator only: Flower clients train and send factors (docs/methods.md#core-clients); use "
                         "hetlora coordinate / the in-process engine, or client_training='factors'.")
    r_max = adapter_config.get("r") if isinstance(adapter_config, Mapping) else getattr(adapter_config, "r", None)
    if settings.r_max is not None and settings.r_max != r_max:
        raise ValueError(f"HetLoRAStrategy: the record's r_max {settings.r_max} differs from the adapter config's r "
                         f"{r_max}.")


class HetLoRAStrategy(FedAvg):
    """Federated HetLoRA on Flower: per-client ranks, truncated distribution, validated heterogeneous aggregation.

    Args:
        adapter_config: the federation's `HetLoRAConfig` (or its dict / JSON): ``r`` is ``r_max``; clients get a copy
            with their own ``rank``.
        settings: the federation's settings record (`peft_hetlora.federated.FederationSettings`, the one the
            `Coordinator` takes; `from_settings` is the same call). Or give its fields as keywords (the keyword form
            builds the record, then goes the same way):

            - ``method``: aggregation method (``AGGREGATION_METHODS``; default ``DEFAULT_METHOD``,
              ``"flexlora_held"``, the study's winner; ``"component"`` when ``component_selection`` names windows;
              ``"hetlora"`` for the paper's rule).
            - ``r_min``: smallest rank (default: the config's ``r_min``).
            - ``rank_policy``: initial ranks: a `RankPolicy`, a policy name or ``{client_id: rank}`` (default:
              ``"uniform"``; ``"constant"`` at ``r_max`` for ``fedavg``). Without ``clients`` only per-client
              policies work (uniform, constant, explicit, budget).
            - ``clients``: optional roster of client ids; nodes reporting other ids are not selected.
            - ``clients_per_round``: clients sampled per round (default: ``max(fraction_train * connected,
              min_train_nodes)``).
            - ``seed``: seeds client sampling and the clients' local training seeds.
            - ``scaling``: ``s`` for norms and clipping (default ``lora_alpha / r_max``, or rsLoRA's).
            - ``clip_norm``: the influence bound, as in `Coordinator`: None (default) gives
              `influence.DEFAULT_INFLUENCE_BOUND` (``"adaptive"``); a number ``C`` fixes it; ``"off"`` turns it off.
            - ``next_rank``: ``"rank_out"`` (a client's next rank is what it reported after pruning) or
              ``"initial"``.
            - ``dp``: a `peft_hetlora.federated.aggregation.privacy.DPConfig`: rounds are aggregated with
              ``dp_aggregate`` (previous = the global sent), clients are Poisson-sampled at ``dp.sampling_rate``,
              summaries record ``privacy``; ``dp_noise_seed``: derive the DP noise from ``seed`` (reproducible tests
              only).
            - ``component_selection``: which global components each sampled client trains
              (docs/design.md#component-rule): ``"prefix"`` (HetLoRA: the global truncated to its rank; the default
              when ``method`` is given or with ``dp``), ``"rolling"`` or ``"coverage"`` (the default when no method
              is given; a window: the client receives the whole global and ``components`` in its ConfigRecord,
              trains those components with the rest frozen and returns them with their indices in its
              MetricRecord). Needs a method that accepts component-indexed uploads (the ``accepts_components``
              capability: `round.window_methods`) and no ``dp``; ``anchor``: components ``0 .. anchor-1`` are in
              every window.
            - ``client_sampling``: how each round's participants are drawn: ``"uniform"`` (the default) or ``"rank"``
              (in proportion to each client's current rank, docs/methods.md#client-sampling; not with ``dp``);
              ``rank_sampling_rounds``: with ``"rank"``, only the first N rounds are drawn by rank, the rest uniformly.
            - ``message_formats``: the compressed reply formats clients may declare (``message-format`` in their
              reply's ``message`` ConfigRecord: ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"int8-block<B>"``); None
              allows all. Replies are checked against their declaration and decoded to float32 before aggregation;
              the global goes out in fp32. ``max_examples``: the largest ``num-examples`` a reply may claim.

            The coordinator's own settings (``min_clients``, ``max_upload_bytes``, ``deadline_s``,
            ``allow_per_module_ranks``, ``require_global_revision``) and an ``r_max`` other than the config's ``r``
            are refused (ValueError).
        fraction_train, min_train_nodes, min_available_nodes, fraction_evaluate, min_evaluate_nodes: as in `FedAvg`.
        min_replies: accepted uploads needed to update the global adapter (else it is carried over unchanged).
        weighting: passed to `aggregate`.
        training: local training settings sent to the clients (`LocalTrainingConfig`).
        store: mirror every round to this `AdapterStore` in the coordinator's layout.
        query_timeout: seconds to wait for nodes to report their client id.
        keep_updates: keep each round's validated `ClientUpdate`s in ``round_updates`` (tests, debugging).
        clock, sleep: the wall clock (round timestamps) and the wait between node polls; tests inject fakes.

    The strategy subclasses only Flower's `FedAvg` and holds its helpers: ``nodes`` (`NodeClients`: which node is
    which client, the ranks), ``replies`` (`ReplyValidator`: the upload spec and the in-memory upload checks),
    ``mirror`` (`StoreMirror`: globals and ``round.json`` published, to ``store`` if any) and ``evaluator``
    (`FederatedEvaluation`).

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
        settings: FederationSettings | None = None,
        *,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 0,
        min_replies: int = 1,
        weighting: str = "per_client",
        training: LocalTrainingConfig | None = None,
        store: AdapterStore | None = None,
        query_timeout: float = 120.0,
        keep_updates: bool = False,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        **setting_kwargs: Any,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=rec.NUM_EXAMPLES,
        )
        # the keyword form builds the same record from the keywords
        settings = FederationSettings.given(settings, setting_kwargs, owner="HetLoRAStrategy")
        _check_flower_settings(settings, adapter_config)
        self.settings = settings
        method, component_selection = default_method_and_selection(settings.method, settings.component_selection,
                                                                   settings.dp)
        self.message_formats = settings.message_formats
        self.component_selection = component_selection
        self.anchor = int(settings.anchor or 0)
        # how each round's participants are drawn (issue 24: "rank" puts more capable clients in a round)
        self.client_sampling = settings.client_sampling or DEFAULT_CLIENT_SAMPLING
        self.rank_sampling_rounds = check_rank_sampling_rounds(settings.rank_sampling_rounds, self.client_sampling)
        # the server step after aggregation (issue 24); its state lives here and is mirrored beside each global
        self.server_optimizer = parse_server_optimizer(settings.server_optimizer)
        self.error_feedback = bool(settings.error_feedback)
        self.server_state: dict[str, torch.Tensor] | None = None
        self.dp = settings.dp
        self.dp_noise_seed = settings.dp_noise_seed
        self.adapter_config: dict[str, Any] = rec.federation_adapter_config(adapter_config, settings.r_min)
        self.r_max = int(self.adapter_config["r"])
        self.r_min = int(self.adapter_config["r_min"])
        check_selection(method, component_selection, self.anchor, r_max=self.r_max, dp=self.dp)
        self.method = method
        default_policy = RankPolicy(get_aggregation(method).default_rank_policy)
        self.rank_policy = settings.rank_policy if settings.rank_policy is not None else default_policy
        self.roster = list(settings.clients) if settings.clients is not None else None
        if self.roster is None and self.rank_policy.kind == "tiers":
            raise ValueError("The tiers rank policy splits a known set of clients: pass clients=[...] (the roster).")
        if settings.clients_per_round is not None and settings.clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {settings.clients_per_round}.")
        self.clients_per_round = settings.clients_per_round
        self.min_replies = max(1, int(min_replies))
        self.seed = int(settings.seed or 0)
        self.scaling = (float(settings.scaling) if settings.scaling is not None
                        else scaling_from_config(self.adapter_config, self.r_max))
        self.clip_norm = DEFAULT_INFLUENCE_BOUND if settings.clip_norm is None else settings.clip_norm
        self.weighting = weighting
        self.next_rank = settings.next_rank or "rank_out"
        self.training = training or LocalTrainingConfig()
        if get_aggregation(method).homogeneous and self.training.prune:  # every client stays at its rank
            self.training = dataclasses.replace(self.training, prune=False)
        self.store = store
        self.query_timeout = query_timeout
        self.max_examples = settings.max_examples
        self.keep_updates = keep_updates
        self._clock = clock

        self.nodes = NodeClients(self.rank_policy, roster=self.roster, r_min=self.r_min, r_max=self.r_max,
                                 seed=self.seed, query_timeout=query_timeout, sleep=sleep)
        self.replies = ReplyValidator(method=method, r_min=self.r_min, r_max=self.r_max,
                                      max_examples=self.max_examples, message_formats=self.message_formats)
        self.mirror = StoreMirror(store, clock=clock)
        self.evaluator = FederatedEvaluation(seed=self.seed)
        self.global_state: dict[str, torch.Tensor] | None = None
        self.num_rounds: int | None = None
        self.history: list[dict[str, Any]] = []
        self.round_updates: dict[int, list[ClientUpdate]] = {}
        self._pending: dict[int, dict[int, tuple[str, int]]] = {}
        self._plans: dict[int, dict[str, Any]] = {}
        self._round_started: dict[int, float] = {}

    # ------------------------------------------------------------------------------------------- the helpers' state
    @property
    def spec(self) -> UploadSpec | None:
        """What an upload must look like (fixed by the first global; `ReplyValidator.spec`)."""
        return self.replies.spec

    @property
    def evaluation(self) -> dict[int, dict[str, Any]]:
        """``round -> metrics`` of federated and central evaluation (`FederatedEvaluation.results`)."""
        return self.evaluator.results

    @property
    def node_clients(self) -> dict[int, str]:
        """``node_id -> client_id`` of the identified nodes (`NodeClients.node_clients`)."""
        return self.nodes.node_clients

    @node_clients.setter
    def node_clients(self, value: dict[int, str]) -> None:
        self.nodes.node_clients = value

    @property
    def unidentified(self) -> dict[int, str]:
        """``node_id -> reason`` of the nodes that are not sampled (`NodeClients.unidentified`)."""
        return self.nodes.unidentified

    @property
    def node_max_rank(self) -> dict[str, int]:
        """``client_id -> max-rank`` the clients reported (`NodeClients.node_max_rank`)."""
        return self.nodes.node_max_rank

    @property
    def initial_ranks(self) -> dict[str, int]:
        """``client_id -> initial rank`` (`NodeClients.initial_ranks`)."""
        return self.nodes.initial_ranks

    @property
    def client_ranks(self) -> dict[str, int]:
        """``client_id -> rank`` of the next round (`NodeClients.client_ranks`)."""
        return self.nodes.client_ranks

    @client_ranks.setter
    def client_ranks(self, value: dict[str, int]) -> None:
        self.nodes.client_ranks = value

    def _set_global(self, state: Mapping[str, torch.Tensor]) -> None:
        self.global_state = self.replies.checked_global(state)

    def _connected_clients(self, grid: Grid, minimum: int) -> dict[str, int]:
        return self.nodes.connected_clients(grid, minimum, self.spec)

    def _publish_round(self, t: int, participants: list[str], ranks: dict[str, int], final: bool = False,
                       components: dict[str, tuple[int, ...]] | None = None,
                       client_sampling: str = DEFAULT_CLIENT_SAMPLING) -> str:
        """Publish global t with its round.json (to the store if any); returns its revision."""
        return self.mirror.publish_round(
            t, participants, ranks, global_state=self.global_state, adapter_config=self.adapter_config,
            round_settings=self.round_settings() if self.store is not None else None,
            federation=lambda: self._federation(self.roster or sorted(self.client_ranks)),
            final=final, components=components, server_state=self.server_state, client_sampling=client_sampling)

    def _publish_final(self) -> None:
        if self.num_rounds is None or self.global_state is None or self.store is None:
            return
        if not self.history or self.history[-1]["round"] != self.num_rounds - 1:
            return
        self._publish_round(self.num_rounds, [], {}, final=True)

    def _federation(self, clients: Sequence[str]) -> dict[str, Any]:
        """The ``federation.json`` of the mirrored run."""
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
            "client_sampling": self.client_sampling,
            "rank_sampling_rounds": self.rank_sampling_rounds,
            "server_optimizer": self.server_optimizer.to_dict() if self.server_optimizer is not None else None,
            "error_feedback": self.error_feedback,
            "created_at": self._clock(),
        }

    @classmethod
    def from_settings(cls, adapter_config: Any, settings: FederationSettings, **runtime: Any) -> HetLoRAStrategy:
        """The strategy of a federation described by the one settings record (`federated.FederationSettings`):
        the same as ``HetLoRAStrategy(adapter_config, settings, **runtime)``.

        The record's method, ranks, clients, sampling, seed, scale, clip, next-rank rule, DP, windows, message formats
        and upload limit become the strategy's; ``r_max`` comes from ``adapter_config`` (a record that names another
        is refused) and the number of rounds is ``start(num_rounds=...)``'s. ``runtime`` takes the Flower and
        runtime keywords (``fraction_train``, ``min_available_nodes``, ``min_replies``, ``weighting``, ``training``,
        ``store``, ``query_timeout``, ``keep_updates``, ``clock``, ``sleep``, ...).

        Raises:
            ValueError: the record sets a setting a Flower run has no place for (``min_clients``,
                ``max_upload_bytes``, ``deadline_s``, ``allow_per_module_ranks``, ``require_global_revision``: the
                coordinator's), or an ``r_max`` other than the adapter config's ``r``.

        Example:
            ```py
            strategy = HetLoRAStrategy.from_settings(config, FederationSettings(method="rankwise", clients=ids))
            ```
        """
        return cls(adapter_config, settings, **runtime)

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
        # DP rounds: Poisson sampling at q, as the privacy accountant assumes
        planned = plan_round(t, pool, self.client_ranks, clients_per_round=n, seed=self.seed,
                             sampling_rate=self.dp.sampling_rate if self.dp is not None else None,
                             component_selection=self.component_selection, anchor=self.anchor, r_max=self.r_max,
                             client_sampling=self.client_sampling, rank_sampling_rounds=self.rank_sampling_rounds)
        participants, ranks, windows = planned.participants, planned.ranks, planned.components or {}
        self._plans[t] = {"participants": participants, "ranks": ranks, "components": planned.components,
                          "client_sampling": planned.client_sampling}
        self._round_started[t] = self._clock()
        revision = self._publish_round(t, participants, ranks, components=planned.components,
                                       client_sampling=planned.client_sampling)
        messages = []
        pending: dict[int, tuple[str, int]] = {}
        for cid in participants:
            node = connected[cid]
            rank = ranks[cid]
            window = windows.get(cid)
            # a window client keeps the rest of the global frozen: it needs all of it
            sent = self.global_state if window is not None else truncate(self.global_state, rank)
            extra = {rec.COMPONENTS: [int(j) for j in window]} if window is not None else {}
            content = RecordDict({
                self.arrayrecord_key: rec.state_dict_to_arrays(sent),
                self.configrecord_key: ConfigRecord({
                    **extra,
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
                    rec.ADAPTER_CONFIG: json_text(self.adapter_config, sort_keys=True),
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
        """Validate the replies in memory and close the round with `round.close_round`; returns the global."""
        t = server_round - 1
        replies = list(replies)
        pending = self._pending.pop(t, {})
        plan = self._plans.get(t, {"participants": [], "ranks": {}})
        windows = dict(plan.get("components") or {})
        failed: dict[str, str] = {}
        kept: dict[str, ClientUpdate] = {}
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

        def updates() -> Iterator[ClientUpdate | Rejection]:
            for cid, rank, msg in sorted(valid, key=lambda item: item[0]):
                try:
                    update = self.replies.validate(t, cid, rank, msg.content, arrays_key=self.arrayrecord_key,
                                                   revision=self.mirror.revisions.get(t),
                                                   assigned_components=windows.get(cid))
                except RejectedUpload as err:
                    logger.warning("[ROUND %d/%s] rejected %s: %s", *self._tag(t), cid, err.reason)
                    yield Rejection(cid, err.reason)
                    continue
                if self.keep_updates:
                    kept[cid] = update
                yield update

        plan = RoundPlan(t, list(plan["participants"]), dict(plan["ranks"]), self.mirror.revisions.get(t) or "",
                         components=plan.get("components"),
                         client_sampling=plan.get("client_sampling", self.client_sampling))
        outcome = close_round(
            plan, updates, self.global_state, self.round_settings(), client_ranks=self.client_ranks,
            initial_ranks=self.initial_ranks, max_ranks=self.node_max_rank, failed=failed,
            started=self._round_started.get(t), clock=self._clock, server_state=self.server_state,
        )
        self.server_state = outcome.server_state
        if "note" in outcome.summary:
            logger.warning("[ROUND %d/%s] %s.", *self._tag(t), outcome.summary["note"])
        if outcome.result is not None:
            self._set_global(outcome.state_dict)
        self.client_ranks = dict(outcome.client_ranks)
        if self.keep_updates:
            self.round_updates[t] = [u for u in kept.values() if u.client_id in outcome.summary["accepted"]]
        self.history.append(outcome.summary)
        if self.store is not None:
            self.store.write_summary(t, outcome.summary)
        return rec.state_dict_to_arrays(self.global_state), MetricRecord(round_metrics(outcome.summary))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send sampled clients the global adapter truncated to their current rank for federated evaluation."""
        if self.fraction_evaluate == 0.0:
            return []
        state = rec.arrays_to_state_dict(arrays)
        connected = self._connected_clients(grid, self.min_available_nodes)
        return self.evaluator.messages(
            server_round, state, connected, fraction=self.fraction_evaluate, min_nodes=self.min_evaluate_nodes,
            client_ranks=self.client_ranks, arrays_key=self.arrayrecord_key, config_key=self.configrecord_key,
            config={**dict(config), **self.training.to_config()},
            adapter_config=json_text(self.adapter_config, sort_keys=True))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' ``eval-loss``; failures are counted and logged."""
        return self.evaluator.aggregate(server_round, replies, self._tag(server_round - 1))

    def round_settings(self) -> RoundSettings:
        """The settings `round.close_round` closes this strategy's rounds with."""
        return RoundSettings(
            method=self.method, r_max=self.r_max, r_min=self.r_min, scaling=self.scaling, clip_norm=self.clip_norm,
            weighting=self.weighting, next_rank=self.next_rank, min_accepted=self.min_replies, dp=self.dp,
            seed=self.seed, dp_noise_seed=self.dp_noise_seed, engine="flower",
            component_selection=self.component_selection, anchor=self.anchor,
            server_optimizer=self.server_optimizer, error_feedback=self.error_feedback,
        )

    def _tag(self, t: int) -> tuple[int, str]:
        """Flower's ``[ROUND n/N]`` numbers for store round ``t`` (store rounds count from 0, Flower's from 1)."""
        return t + 1, str(self.num_rounds) if self.num_rounds is not None else "?"
