"""Run a HetLoRA federation as a Flower simulation (Ray virtual clients), or the same experiment in-process.

`run_flower_simulation` is what ``hetlora simulate --engine flower`` calls: one `HetLoRAStrategy` ServerApp, one
HetLoRA `ClientApp` per virtual SuperNode (partition ``i`` is client ``client_ids[i]``),
`flwr.simulation.run_simulation` with bounded Ray resources. `run_inprocess_simulation` runs the same experiment
without Flower, as a thin call into the simulator's one in-process loop (`run_round`: a
`Coordinator` over a store) with `train_local_round` clients. Both take the federation's settings as one
`FederationSettings` record (or keywords that build it, `simulation_settings`) and the local training as one
`LocalTrainingConfig`, so they give the same global adapter bit for bit (what the tests check) and their wall times
compare the engines (the benchmark).

Example:
    ```py
    from peft_hetlora import HetLoRAConfig
    from hetlora_bench.engines import run_flower_simulation
    from hetlora_bench.toy import ToyTask

    result = run_flower_simulation(
        ToyTask(num_examples=16), num_clients=10,
        adapter_config=HetLoRAConfig(r=8, r_min=2, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        ranks="uniform", method="hetlora", rounds=2, local_steps=2, seed=0,
    )
    result.rounds[-1]["metrics"]["train_loss"], result.final_state_dict.keys()
    ```
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from peft_hetlora.federated import (
    AdapterStore,
    ClientUpdate,
    Coordinator,
    FederationSettings,
    LocalStore,
    RankPolicy,
    get_aggregation,
    truncate,
)
from peft_hetlora.federated.round import ClientReport, RoundPlan, default_method_and_selection
from peft_hetlora.federated.stores import json_text
from peft_hetlora.federated.upload import encode_message, parse_message_format, validate_upload
from peft_hetlora.flower import (
    ClientTask,
    LocalTrainingConfig,
    PartitionClientIds,
    initial_global_state,
)
from peft_hetlora.flower import records as rec
from peft_hetlora.flower.local_round import TaskFn, evaluate_global, train_local_round
from peft_hetlora.utils import ADAPTER_FILE, CLIENT_FILE

logger = logging.getLogger(__name__)


@dataclass
class FederationRun:
    """The outcome of a simulated federation (Flower or in-process).

    Attributes:
        engine: ``"flower"`` or ``"inprocess"``.
        rounds: one summary per round (the coordinator's ``summary.json`` fields: accepted, rejected, failed,
            weights, clients, client_ranks, metrics with ``train_loss``, ``mean_rank_out``, ``seconds``, ...).
        final_state_dict: the final global adapter (r_max, float32).
        initial_state_dict: the global adapter of round 0.
        evaluation: ``server_round -> metrics`` (``central/eval-loss`` after each round, 0 = before training;
            ``federated/eval-loss`` when clients evaluate).
        client_ranks: every client's rank after the last round.
        client_ids: client id of each partition.
        wall_seconds: the whole run, engine start-up included.
        updates: ``round -> accepted ClientUpdates`` when ``keep_updates=True``.
    """

    engine: str
    rounds: list[dict[str, Any]]
    final_state_dict: dict[str, torch.Tensor]
    initial_state_dict: dict[str, torch.Tensor]
    evaluation: dict[int, dict[str, Any]]
    client_ranks: dict[str, int]
    client_ids: list[str]
    wall_seconds: float
    updates: dict[int, list[ClientUpdate]] = field(default_factory=dict)

    def round_seconds(self) -> list[float]:
        """Wall time of each round (configure -> aggregate)."""
        return [float(r["metrics"]["seconds"]) for r in self.rounds]


@dataclass
class DatasetTask:
    """``task_fn`` over a list of client datasets: partition ``i`` trains on ``datasets[i]`` with ``model_fn()``.

    Example:
        ```py
        >>> task_fn = DatasetTask(model_fn=tiny_llama, datasets=[ds_a, ds_b])  # doctest: +SKIP
        ```
    """

    model_fn: Callable[[], nn.Module]
    datasets: Sequence[Any]
    data_collator: Callable | None = None
    eval_datasets: Sequence[Any] | None = None

    def __call__(self, partition_id: int, node_config: Mapping[str, Any]) -> ClientTask:
        if not 0 <= partition_id < len(self.datasets):
            raise ValueError(f"partition-id {partition_id} outside [0, {len(self.datasets)}): start the node with a "
                             "partition-id of this simulation.")
        return ClientTask(
            model=self.model_fn(),
            train_dataset=self.datasets[partition_id],
            eval_dataset=self.eval_datasets[partition_id] if self.eval_datasets is not None else None,
            data_collator=self.data_collator,
        )


def central_evaluate(
    model_fn: Callable[[], nn.Module],
    dataset: Any,
    adapter_config: Any,
    *,
    batch_size: int = 8,
    data_collator: Callable | None = None,
) -> Callable[[int, Mapping[str, torch.Tensor]], dict[str, float]]:
    """``evaluate(round, global_state) -> {"eval-loss", "eval-perplexity"}`` of the global adapter at r_max.

    Example:
        ```py
        >>> evaluate = central_evaluate(tiny_llama, held_out, config)  # doctest: +SKIP
        >>> evaluate(0, initial_state)["eval-loss"]  # doctest: +SKIP
        4.56
        ```
    """
    config = rec.federation_adapter_config(adapter_config)

    def evaluate(server_round: int, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        task = ClientTask(model=model_fn(), data_collator=data_collator)
        loss, _ = evaluate_global(task, state, adapter_config=config, rank=int(config["r"]), batch_size=batch_size,
                                  dataset=dataset)
        return {"eval-loss": float(loss), "eval-perplexity": math.exp(min(loss, 700.0))}

    return evaluate


@dataclass
class _Setup:
    task_fn: TaskFn
    client_ids: list[str]
    config: dict[str, Any]
    training: LocalTrainingConfig
    initial: dict[str, torch.Tensor]
    evaluate: Callable[[int, Mapping[str, torch.Tensor]], dict[str, float]] | None
    settings: FederationSettings


def simulation_settings(
    settings: FederationSettings | None = None,
    *,
    client_ids: Sequence[str],
    method: str | None = None,
    ranks: RankPolicy | str | Mapping[str, int] | None = None,
    r_min: int | None = None,
    clients_per_round: int | None = None,
    seed: int | None = None,
    clip_norm: float | str | None = None,
    next_rank: str | None = None,
    dp: Any = None,
) -> FederationSettings:
    """The `FederationSettings` record of a simulation (both engines run it): ``settings``, or the record the
    keywords give (``ranks`` is the rank policy), with the simulation's clients and ``clients_per_round`` (default:
    all) filled in.

    Example:
        ```py
        >>> s = simulation_settings(client_ids=["a", "b", "c"], method="hetlora", ranks={"a": 2, "b": 4, "c": 8})
        >>> s.clients, s.clients_per_round, s.rank_policy.kind
        (('a', 'b', 'c'), 3, 'explicit')
        ```
    """
    given = {"method": method, "rank_policy": ranks, "r_min": r_min, "clients_per_round": clients_per_round,
             "seed": seed, "clip_norm": clip_norm, "next_rank": next_rank, "dp": dp}
    given = {name: value for name, value in given.items() if value is not None}
    if settings is None:
        settings = FederationSettings.from_kwargs(**given)
    elif given:
        raise TypeError(f"Pass the settings record or the setting keywords, not both (got {sorted(given)}).")
    clients = settings.clients or tuple(client_ids)
    return settings.replace(clients=clients, clients_per_round=min(settings.clients_per_round or len(clients),
                                                                    len(clients)))


def _setup(task_fn, model_fn, client_datasets, client_ids, num_clients, adapter_config, settings, setting_kwargs,
           training, local_steps, initial_state_dict, eval_dataset, data_collator, eval_batch_size) -> _Setup:
    if task_fn is None:
        if model_fn is None or client_datasets is None:
            raise ValueError("Pass task_fn=..., or model_fn=... together with client_datasets=...")
        if isinstance(client_datasets, Mapping):
            client_ids = list(client_ids or client_datasets)
            datasets = [client_datasets[c] for c in client_ids]
        else:
            datasets = list(client_datasets)
        task_fn = DatasetTask(model_fn, datasets, data_collator)
        num_clients = len(datasets)
    if client_ids is None:
        if num_clients is None:
            raise ValueError("With task_fn=..., pass num_clients=... or client_ids=[...] (one per partition).")
        client_ids = [f"client-{i}" for i in range(num_clients)]
    client_ids = [str(c) for c in client_ids]
    if len(set(client_ids)) != len(client_ids):
        raise ValueError("client_ids must be unique.")
    settings = simulation_settings(settings, client_ids=client_ids, **setting_kwargs)
    strangers = sorted(set(settings.clients) - set(client_ids))
    if strangers:
        raise ValueError(f"The settings name clients without a partition ({strangers[:3]}); name the simulation's "
                         "client_ids.")
    config = rec.federation_adapter_config(adapter_config, settings.r_min)
    settings = settings.replace(r_min=int(config["r_min"]))
    training = training or LocalTrainingConfig()
    if local_steps is not None:
        training = dataclasses.replace(training, local_steps=int(local_steps))
    base_fn = model_fn if model_fn is not None else (lambda: task_fn(0, {rec.PARTITION_ID: 0}).model)
    initial = (dict(initial_state_dict) if initial_state_dict is not None
               else initial_global_state(base_fn(), config, settings.seed or 0))
    evaluate = None
    if eval_dataset is not None:
        evaluate = central_evaluate(base_fn, eval_dataset, config, batch_size=eval_batch_size,
                                    data_collator=data_collator)
    return _Setup(task_fn, client_ids, config, training, initial, evaluate, settings)


def run_flower_simulation(
    task_fn: TaskFn | None = None,
    *,
    adapter_config: Any,
    settings: FederationSettings | None = None,
    model_fn: Callable[[], nn.Module] | None = None,
    client_datasets: Mapping[str, Any] | Sequence[Any] | None = None,
    client_ids: Sequence[str] | None = None,
    num_clients: int | None = None,
    ranks: RankPolicy | str | Mapping[str, int] | None = None,
    r_min: int | None = None,
    method: str | None = None,
    rounds: int = 1,
    clients_per_round: int | None = None,
    local_steps: int | None = None,
    training: LocalTrainingConfig | None = None,
    seed: int | None = None,
    initial_state_dict: Mapping[str, torch.Tensor] | None = None,
    eval_dataset: Any = None,
    eval_batch_size: int = 8,
    data_collator: Callable | None = None,
    fraction_evaluate: float = 0.0,
    min_replies: int = 1,
    clip_norm: float | str | None = None,
    next_rank: str | None = None,
    dp: Any = None,
    message_format: str = "fp32",
    store: AdapterStore | None = None,
    num_cpus: int | None = None,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    round_timeout: float = 3600.0,
    keep_updates: bool = False,
    verbose: bool = False,
) -> FederationRun:
    """Simulate a HetLoRA federation with Flower: one virtual SuperNode per client, Ray actors doing the training.

    Args:
        task_fn: ``task_fn(partition_id, node_config) -> ClientTask`` (with ``num_clients`` or ``client_ids``); or
            pass ``model_fn`` and ``client_datasets`` (``{client_id: dataset}`` or a list) instead.
        adapter_config: the federation's `HetLoRAConfig` (``r`` = r_max, ``lora_alpha``, ``target_modules``, ...).
        settings: the federation's `FederationSettings` record (method, ranks, sampling, seed, clip, next-rank rule,
            DP, windows, message formats), as `HetLoRAStrategy.from_settings` takes it; or give these keywords
            instead (`simulation_settings`):
        ranks: initial rank policy (`RankPolicy`, a name, or ``{client_id: rank}``; default uniform, fedavg constant).
        method: a registered aggregation method (``peft_hetlora.federated.AGGREGATION_METHODS``); None: the one
            default of a federation that names none (`round.default_method_and_selection`).
        r_min, clients_per_round (default: all), seed (default 0), clip_norm (the influence bound,
            docs/aggregation.md), next_rank (``"rank_out"``, the default, or ``"initial"``), dp (a
            `peft_hetlora.federated.aggregation.privacy.DPConfig`; docs/privacy.md).
        rounds, local_steps / training (`LocalTrainingConfig`): the experiment's length and local training.
        message_format: how the clients encode their replies (``"fp32"``, ``"bf16"``, ``"fp16"``,
            ``"int8-block<B>"``; `make_client_app`).
        initial_state_dict: global adapter of round 0 at r_max (default: `initial_global_state` with the seed).
        eval_dataset: held-out data for a central evaluation of the global adapter before and after every round.
        fraction_evaluate: fraction of clients evaluating the global adapter on their ``eval_dataset`` each round.
        store: mirror every round to a `LocalStore` / `HubStore` (coordinator layout).
        num_cpus: CPUs Ray may use (default: all); cpus_per_client / gpus_per_client: resources of one virtual
            client, so ``num_cpus / cpus_per_client`` clients train at once.
        keep_updates: return each round's validated client updates (``FederationRun.updates``).
        round_timeout: seconds a round may take; also how long the virtual nodes may take to answer the first
            identification query (Ray starts its actors slowly on a loaded machine).

    Returns:
        `FederationRun` with per-round summaries and the final global state dict.

    Example:
        ```py
        >>> run = run_flower_simulation(ToyTask(), num_clients=10, adapter_config=config, rounds=2)  # doctest: +SKIP
        >>> [r["metrics"]["num_accepted"] for r in run.rounds]  # doctest: +SKIP
        [10, 10]
        ```
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation
    except ImportError as err:
        raise ImportError('run_flower_simulation needs Flower with Ray: pip install "peft-hetlora[flower]" '
                          "(or use run_inprocess_simulation, which needs no Flower).") from err

    from peft_hetlora.flower.client_app import make_client_app
    from peft_hetlora.flower.strategy import HetLoRAStrategy

    setup = _setup(task_fn, model_fn, client_datasets, client_ids, num_clients, adapter_config, settings,
                   dict(method=method, ranks=ranks, r_min=r_min, clients_per_round=clients_per_round, seed=seed,
                        clip_norm=clip_norm, next_rank=next_rank, dp=dp),
                   training, local_steps, initial_state_dict, eval_dataset, data_collator, eval_batch_size)
    n_clients = len(setup.client_ids)
    strategy = HetLoRAStrategy.from_settings(
        setup.config, setup.settings, min_train_nodes=1, min_available_nodes=n_clients,
        fraction_evaluate=fraction_evaluate, min_evaluate_nodes=1 if fraction_evaluate else 0,
        min_replies=min_replies, training=setup.training, store=store, keep_updates=keep_updates,
        query_timeout=round_timeout,
    )
    evaluate_fn = None
    if setup.evaluate is not None:
        from flwr.app import MetricRecord

        def evaluate_fn(server_round, arrays):
            return MetricRecord(setup.evaluate(server_round, rec.arrays_to_state_dict(arrays)))

    holder: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        holder["result"] = strategy.start(
            grid=grid, initial_arrays=rec.state_dict_to_arrays(setup.initial), num_rounds=rounds,
            timeout=round_timeout, evaluate_fn=evaluate_fn,
        )

    client_app = make_client_app(setup.task_fn, client_id_fn=PartitionClientIds(setup.client_ids),
                                 training_defaults=setup.training, message_format=message_format)
    total_cpus = num_cpus or os.cpu_count() or 1
    init_args: dict[str, Any] = {"num_cpus": total_cpus, "include_dashboard": False}
    if gpus_per_client > 0:
        init_args["num_gpus"] = torch.cuda.device_count()
    backend_config = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
        "init_args": init_args,
    }
    started = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n_clients,
                   backend_config=backend_config, verbose_logging=verbose)
    wall = time.perf_counter() - started
    if "result" not in holder:
        raise RuntimeError("The Flower simulation ended without a result; see the Flower log above for the error.")
    return FederationRun(
        engine="flower",
        rounds=list(strategy.history),
        final_state_dict=dict(strategy.global_state),
        initial_state_dict=setup.initial,
        evaluation=dict(strategy.evaluation),
        client_ranks=dict(strategy.client_ranks),
        client_ids=setup.client_ids,
        wall_seconds=wall,
        updates=dict(strategy.round_updates),
    )


def run_round(
    coordinator: Coordinator, round_idx: int, train_client: Callable[[RoundPlan, str], None]
) -> tuple[RoundPlan, dict[str, Any]]:
    """One round of an in-process federation, the simulator's one loop body: every participant of round
    `round_idx` that has not uploaded yet trains and uploads to the coordinator's store (``train_client(plan,
    client_id)``; a client that does not upload is left out), then the `Coordinator` closes the round
    (`round.close_round`) with the uploads there are. A round an earlier invocation closed is not trained again.
    Returns the plan and the round's ``summary.json``.

    Used by ``hetlora simulate`` (`runner.run_federated_arm`: Trainer + `FederatedClientCallback` clients) and by
    `run_inprocess_simulation` (the Flower engine's reference: `train_local_round` clients).

    Example:
        ```py
        >>> plan, summary = run_round(coordinator, 0, lambda plan, cid: upload_a_round(cid))  # doctest: +SKIP
        >>> summary["accepted"]  # doctest: +SKIP
        ['a', 'b']
        ```
    """
    store = coordinator.store
    closed = store.latest_global().round > round_idx  # closed by an invocation that stopped before recording it
    plan = coordinator.open_round(round_idx)
    if not closed:
        for cid in tqdm(plan.participants, desc=f"round {round_idx} clients", leave=False, unit="client",
                        disable=None):
            if cid not in store.list_client_uploads(round_idx):
                train_client(plan, cid)
        if coordinator.step(wait=False) == "waiting":  # every participant had its turn: close with what came
            coordinator.close_round(round_idx)
    return plan, store.read_summary(round_idx)


def run_inprocess_simulation(
    task_fn: TaskFn | None = None,
    *,
    adapter_config: Any,
    settings: FederationSettings | None = None,
    model_fn: Callable[[], nn.Module] | None = None,
    client_datasets: Mapping[str, Any] | Sequence[Any] | None = None,
    client_ids: Sequence[str] | None = None,
    num_clients: int | None = None,
    ranks: RankPolicy | str | Mapping[str, int] | None = None,
    r_min: int | None = None,
    method: str | None = None,
    rounds: int = 1,
    clients_per_round: int | None = None,
    local_steps: int | None = None,
    training: LocalTrainingConfig | None = None,
    seed: int | None = None,
    initial_state_dict: Mapping[str, torch.Tensor] | None = None,
    eval_dataset: Any = None,
    eval_batch_size: int = 8,
    data_collator: Callable | None = None,
    clip_norm: float | str | None = None,
    next_rank: str | None = None,
    dp: Any = None,
    message_format: str = "fp32",
    store: AdapterStore | None = None,
    keep_updates: bool = False,
    num_threads: int | None = None,
) -> FederationRun:
    """The same experiment as `run_flower_simulation`, in this process, without Flower: the simulator's one
    in-process loop (`run_round`: a `Coordinator` over a store, here a temporary `LocalStore`
    unless ``store`` is given) with `train_local_round` clients, one after another.

    The same settings record (`simulation_settings`), rank policy, seeded client sampling, windows, local training
    function and seeds as the Flower engine, and the same round engine (`round.close_round`, updates in client-id
    order), so the globals are equal (the tests check it) and the wall times compare the engines (the benchmark).
    A client whose task raises is reported in its round's ``failed`` and left out. ``num_threads`` sets torch's
    intra-op threads for the run (1 matches a Flower virtual client with one CPU, bit for bit on CPU).

    Example:
        ```py
        ref = run_inprocess_simulation(ToyTask(), num_clients=10, adapter_config=config, rounds=2)
        ```
    """
    setup = _setup(task_fn, model_fn, client_datasets, client_ids, num_clients, adapter_config, settings,
                   dict(method=method, ranks=ranks, r_min=r_min, clients_per_round=clients_per_round, seed=seed,
                        clip_norm=clip_norm, next_rank=next_rank, dp=dp),
                   training, local_steps, initial_state_dict, eval_dataset, data_collator, eval_batch_size)
    method = default_method_and_selection(setup.settings.method, setup.settings.component_selection,
                                          setup.settings.dp)[0]
    if get_aggregation(method).homogeneous and setup.training.prune:  # as HetLoRAStrategy: homogeneous never prune
        setup.training = dataclasses.replace(setup.training, prune=False)
    fmt = parse_message_format(message_format).name
    seed = setup.settings.seed or 0
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    started = time.perf_counter()
    # The Trainer runs gc.collect() after every local round; freezing the objects that exist now keeps those
    # collections proportional to the round's garbage rather than to this whole process's heap (the Flower
    # ClientApp does the same in its process).
    gc.collect()
    gc.freeze()
    with contextlib.ExitStack() as stack:
        if store is None:
            store = LocalStore(stack.enter_context(tempfile.TemporaryDirectory(prefix="hetlora-inprocess-")),
                               create=True)
        coordinator = Coordinator(store, setup.settings.replace(rounds=rounds), progress=False)
        stack.callback(gc.unfreeze)
        stack.callback(torch.set_num_threads, threads)
        coordinator.init(state_dict=setup.initial, adapter_config=setup.config)
        failed: dict[int, dict[str, str]] = {}

        def train_client(plan: RoundPlan, cid: str) -> None:
            t = plan.round
            state = load_file(str(Path(store.get_global(t).path) / ADAPTER_FILE))
            window = plan.components_of(cid)
            pid = setup.client_ids.index(cid)
            try:
                task = setup.task_fn(pid, {rec.PARTITION_ID: pid, "num-partitions": len(setup.client_ids)})
                out = train_local_round(task, state if window is not None else truncate(state, plan.ranks[cid]),
                                        adapter_config=setup.config, rank=plan.ranks[cid], training=setup.training,
                                        seed=rec.local_seed(seed, cid, t), components=window)
            except Exception as err:  # noqa: BLE001 - a failing client is reported, the round goes on
                failed.setdefault(t, {})[cid] = f"{type(err).__name__}: {err}"
                logger.warning("[ROUND %d/%d] client %s failed: %s", t + 1, rounds, cid, failed[t][cid])
                return
            trained = out.extra.get("components")
            report = ClientReport(cid, t, out.rank_in, out.rank_out, out.num_examples, out.train_loss,
                                  out.tail_norm_start, out.tail_norm_end, plan.revision,
                                  components=tuple(trained) if trained is not None else None, message_format=fmt)
            with tempfile.TemporaryDirectory(prefix=f"hetlora-{cid}-") as tmp:
                (Path(tmp) / ADAPTER_FILE).write_bytes(encode_message(out.state_dict, fmt))
                (Path(tmp) / CLIENT_FILE).write_text(json_text(report.to_json(), nonfinite="null"))
                store.upload_client(t, cid, tmp)

        history: list[dict[str, Any]] = []
        evaluation: dict[int, dict[str, Any]] = {}
        kept: dict[int, list[ClientUpdate]] = {}
        state = dict(setup.initial)
        if setup.evaluate is not None:
            evaluation[0] = {f"central/{k}": v for k, v in setup.evaluate(0, state).items()}
        for t in range(rounds):
            plan, summary = run_round(coordinator, t, train_client)
            state = load_file(str(Path(store.get_global(t + 1).path) / ADAPTER_FILE))
            history.append({**summary, "failed": failed.get(t, {})})
            if keep_updates:
                kept[t] = [_accepted_update(coordinator, plan, cid) for cid in summary["accepted"]]
            if setup.evaluate is not None:
                evaluation[t + 1] = {f"central/{k}": v for k, v in setup.evaluate(t + 1, state).items()}
        client_ranks = {**store.read_federation()["initial_ranks"], **(history[-1]["client_ranks"] if history else {})}
    return FederationRun(
        engine="inprocess",
        rounds=history,
        final_state_dict=state,
        initial_state_dict=setup.initial,
        evaluation=evaluation,
        client_ranks={cid: int(r) for cid, r in client_ranks.items()},
        client_ids=setup.client_ids,
        wall_seconds=time.perf_counter() - started,
        updates=kept,
    )


def _accepted_update(coordinator: Coordinator, plan: RoundPlan, client_id: str) -> ClientUpdate:
    """The validated upload of a client the coordinator accepted in round ``plan.round`` (read back from its store)."""
    spec = coordinator.upload_spec(plan.round)
    return validate_upload(coordinator.store.download_client(plan.round, client_id), spec, client_id=client_id,
                           round_idx=plan.round, assigned_rank=plan.ranks.get(client_id),
                           assigned_components=plan.components_of(client_id))
