"""HetLoRA on Flower: the strategy, the client app and the Ray simulation.

Most tests drive the real `HetLoRAStrategy` and the real `ClientApp` through `InlineGrid`, a grid that hands each
message to the ClientApp in this process (no Ray, fast). One module-scoped Ray simulation (11 virtual SuperNodes:
10 clients of mixed ranks and one failing device, 2 rounds) checks the engine end to end against the in-process run
and against the numpy reference (tests/reference.py) on the very updates the strategy received.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest

pytest.importorskip("flwr")

import reference as np_ref  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from robust_reference import robust_global  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402

from hetlora_bench.engines import run_flower_simulation, run_inprocess_simulation  # noqa: E402
from hetlora_bench.toy import ToyTask  # noqa: E402
from peft_hetlora import HetLoRAConfig  # noqa: E402
from peft_hetlora.federated.stores import LocalStore  # noqa: E402
from peft_hetlora.flower import (  # noqa: E402
    HetLoRAStrategy,
    LocalTrainingConfig,
    PartitionClientIds,
    initial_global_state,
    make_client_app,
)
from peft_hetlora.flower import records as rec  # noqa: E402

pytestmark = [
    pytest.mark.flower,
    pytest.mark.filterwarnings("ignore:Tip. In future versions of Ray:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*run_simulation.*deprecated"),
]

R_MAX = 8
CONFIG = HetLoRAConfig(r=R_MAX, r_min=2, lora_alpha=16, target_modules=["q_proj", "v_proj"], prune_lambda=0.01)
TRAINING = LocalTrainingConfig(local_steps=1, batch_size=4)
TASK = ToyTask(num_examples=8, seq_len=16, model_fn=functools.partial(tiny_llama, 0))


def client_ids(n: int) -> list[str]:
    return [f"client-{i}" for i in range(n)]


@pytest.fixture(scope="module")
def initial() -> dict[str, torch.Tensor]:
    state = initial_global_state(tiny_llama(0), CONFIG, seed=0)
    generator = torch.Generator().manual_seed(5)  # B is zero at init; give it values so truncation/weights show
    return {k: (torch.randn(v.shape, generator=generator) * 0.1 if ".lora_B." in k else v) for k, v in state.items()}


@pytest.fixture(autouse=True)
def task_identity():
    """Messages built outside a Flower runtime need the process's task identity (the ServerApp runtime sets it)."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # older Flower: messages need no process identity
        yield
        return
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class InlineGrid:
    """A Flower grid that runs the ClientApp in this process: node ids -> node configs, optional faults.

    `drop`: client ids whose replies never arrive; `tamper`: client id -> function(reply content) -> content.
    """

    def __init__(self, app, node_configs: dict[int, dict], drop=(), tamper=None):
        self.app = app
        self.node_configs = node_configs
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=dict(c), state=RecordDict(), run_config={})
                         for n, c in node_configs.items()}
        self.drop = set(drop)
        self.tamper = tamper or {}
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.node_configs)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            cid = PartitionClientIds(client_ids(100))(self.node_configs[node])
            if cid in self.drop and msg.metadata.message_type == "train":
                continue
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as err:  # what the SuperNode reports when the ClientApp raises
                reply = Message(Error(code=2, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if cid in self.tamper and reply.has_content() and msg.metadata.message_type == "train":
                reply = Message(self.tamper[cid](reply.content), reply_to=msg)
            replies.append(reply)
        return replies


def stub_client_app(n: int, fail=(), prune=()) -> ClientApp:
    """A ClientApp that answers like the HetLoRA one without training: received factors + seeded noise.

    Partitions in `fail` raise; those in `prune` drop their last component (rank_out = rank_in - 1).
    """
    app = ClientApp()
    ids = PartitionClientIds(client_ids(n))

    @app.query()
    def query(msg, context):
        return Message(RecordDict({"hetlora": ConfigRecord({"client-id": ids(context.node_config)})}), reply_to=msg)

    @app.train()
    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        if pid in fail:
            raise RuntimeError(f"simulated device failure on partition {pid}")
        config = msg.content["config"]
        rank = int(config["rank"])
        out_rank = rank - 1 if pid in prune else rank
        generator = torch.Generator().manual_seed(1000 * int(config["round"]) + pid)
        state = {}
        for key, value in rec.arrays_to_state_dict(msg.content["arrays"]).items():
            value = value[:out_rank] if ".lora_A." in key else value[:, :out_rank]
            state[key] = value + 0.05 * torch.randn(value.shape, generator=generator)
        metrics = MetricRecord({"num-examples": 10 + pid, "rank-in": rank, "rank-out": out_rank, "train-loss": 1.5})
        return Message(RecordDict({"arrays": rec.state_dict_to_arrays(state), "metrics": metrics}), reply_to=msg)

    return app


def inline_grid(n: int, node_offset: int = 100, task=TASK, app=None, **kwargs) -> InlineGrid:
    app = app or make_client_app(task, client_id_fn=PartitionClientIds(client_ids(n)), training_defaults=TRAINING)
    configs = {node_offset + 7 * i: {"partition-id": i, "num-partitions": n} for i in range(n)}
    return InlineGrid(app, configs, **kwargs)


def strategy_for(n: int, ranks: dict[str, int], **kwargs) -> HetLoRAStrategy:
    kwargs.setdefault("method", "hetlora")  # these tests pin the paper's prefix rule (the default assigns windows)
    return HetLoRAStrategy(CONFIG, rank_policy=ranks, clients=client_ids(n), min_available_nodes=n,
                           training=TRAINING, keep_updates=True, **kwargs)


def numpy_global(updates, method: str, previous=None):
    """The new global and the client weights from the independent numpy reference (docs/design.md#aggregation,
    #methods)."""
    s = 16 / R_MAX
    sizes = np.array([u.num_examples for u in updates], dtype=np.float64)
    if method == "hetlora":
        factors, extras, p = np_ref.hetlora(updates, R_MAX, s)
    elif method in ("zero_pad", "fedavg"):
        factors, extras, p = np_ref.zero_pad(updates, R_MAX, s)
    elif method in ("median", "trimmed_mean"):
        sizes = np_ref.capped_sizes(sizes, 10.0)
        return robust_global(updates, R_MAX, method, previous=previous), dict(
            zip([u.client_id for u in updates], sizes / sizes.sum()))
    elif method == "rankwise":
        factors, extras = np_ref.rankwise(updates, R_MAX, s, previous=previous), {}
        p = np.array([np_ref.norm(np_ref.np_modules(u.state_dict), s) for u in updates])
        p = p / p.sum()
    else:  # flexlora: compared through the product B A (singular vectors have a sign freedom)
        dense = np_ref.flexlora_dense(updates)
        capped = np_ref.capped_sizes(sizes, 10.0)
        p = capped / capped.sum()
        return {name: np_ref.best_rank_k(w, R_MAX) for name, w in dense.items()}, dict(
            zip([u.client_id for u in updates], p))
    state = dict(extras)
    for name, (a, b) in factors.items():
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = a, b
    return state, dict(zip([u.client_id for u in updates], p))


def assert_matches_reference(published, updates, method: str = "hetlora", previous=None, weights=None):
    expected, expected_weights = numpy_global(updates, method, previous)
    if method == "flexlora":
        for name, product in expected.items():
            got = published[f"{name}.lora_B.weight"].double() @ published[f"{name}.lora_A.weight"].double()
            np.testing.assert_allclose(got.numpy(), product, rtol=1e-4, atol=1e-6, err_msg=name)
    else:
        assert set(published) == set(expected)
        for key, value in expected.items():
            np.testing.assert_allclose(published[key].double().numpy(), value, rtol=1e-5, atol=1e-6, err_msg=key)
    if weights is not None:
        assert weights == pytest.approx(expected_weights, rel=1e-5)


def assert_state_equal(a, b):
    assert set(a) == set(b)
    unequal = [key for key in a if not torch.equal(a[key], b[key])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:2]}"


def assert_state_close(a, b, atol=1e-6):
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=atol, rtol=1e-5, msg=key)


# --------------------------------------------------------------------------------------------------- in-process grid
def test_configure_train_sends_each_client_the_global_truncated_to_its_rank(initial):
    ranks = {"client-0": 2, "client-1": 8, "client-2": 5}
    strategy = strategy_for(3, ranks)
    grid = inline_grid(3)
    messages = list(strategy.configure_train(1, ArrayRecord(initial), ConfigRecord(), grid))
    assert len(messages) == 3
    by_node = {m.metadata.dst_node_id: m for m in messages}
    for node, node_config in grid.node_configs.items():
        cid = f"client-{node_config['partition-id']}"
        config = by_node[node].content["config"]
        sent = rec.arrays_to_state_dict(by_node[node].content["arrays"])
        k = ranks[cid]
        assert config["client-id"] == cid and config["rank"] == k and config["r-max"] == R_MAX
        assert json.loads(config["adapter-config"])["peft_type"] == "HETLORA"
        for key, value in initial.items():
            expected = value[:k] if ".lora_A." in key else value[:, :k]  # A: first k rows, B: first k columns
            assert torch.equal(sent[key], expected), key
    assert strategy.node_clients == {n: f"client-{c['partition-id']}" for n, c in grid.node_configs.items()}


def test_round_aggregates_with_aggregate_and_ranks_follow_clients_to_new_nodes(initial):
    ranks = {"client-0": 2, "client-1": 4, "client-2": 8}
    strategy = strategy_for(3, ranks, method="hetlora", fraction_evaluate=1.0, min_evaluate_nodes=3)
    task = ToyTask(num_examples=8, eval_examples=4, seq_len=16, model_fn=functools.partial(tiny_llama, 0))
    strategy.start(grid=inline_grid(3, task=task), initial_arrays=ArrayRecord(initial), num_rounds=1)
    summary = strategy.history[0]
    assert summary["accepted"] == ["client-0", "client-1", "client-2"] and not summary["failed"]
    updates = strategy.round_updates[0]
    assert {u.client_id: u.state_dict["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0]
            for u in updates} == {cid: summary["clients"][cid]["rank_out"] for cid in ranks}
    assert_matches_reference(strategy.global_state, updates, "hetlora", weights=summary["weights"])
    # Federated evaluation of the new global on the three clients (4 held-out sequences each, at their ranks).
    assert math.isfinite(strategy.evaluation[1]["federated/eval-loss"])
    assert strategy.evaluation[1]["federated/num-examples"] == 12

    # The same clients come back as new Flower nodes (new node ids, other order): each keeps its own rank.
    moved = inline_grid(3, node_offset=900)
    moved.node_configs = dict(reversed(list(moved.node_configs.items())))
    messages = strategy.configure_train(2, ArrayRecord(strategy.global_state), ConfigRecord(), moved)
    sent = {m.content["config"]["client-id"]: m.content["config"]["rank"] for m in messages}
    assert sent == {cid: summary["clients"][cid]["rank_out"] for cid in ranks}
    assert set(strategy.node_clients) >= set(moved.node_configs)


def test_the_strategy_is_a_fedavg_that_holds_its_helpers(initial):
    """Composition, not mixins: the strategy's node map, ranks, upload spec and revisions are its helpers' state."""
    from flwr.serverapp.strategy import FedAvg

    from peft_hetlora.flower.evaluation import FederatedEvaluation
    from peft_hetlora.flower.mirror import StoreMirror
    from peft_hetlora.flower.nodes import NodeClients
    from peft_hetlora.flower.replies import ReplyValidator

    assert HetLoRAStrategy.__bases__ == (FedAvg,)
    ranks = {"client-0": 2, "client-1": 4, "client-2": 8}
    strategy = strategy_for(3, ranks)
    assert isinstance(strategy.nodes, NodeClients) and isinstance(strategy.replies, ReplyValidator)
    assert isinstance(strategy.mirror, StoreMirror) and isinstance(strategy.evaluator, FederatedEvaluation)
    messages = strategy.configure_train(1, ArrayRecord(initial), ConfigRecord(), inline_grid(3))
    assert {m.content["config"]["client-id"]: m.content["config"]["rank"] for m in messages} == ranks
    assert strategy.node_clients is strategy.nodes.node_clients and len(strategy.node_clients) == 3
    assert strategy.client_ranks is strategy.nodes.client_ranks and strategy.client_ranks == ranks
    # the upload spec is the first global's shapes: lora_A is (r, d_in), lora_B is (d_out, r)
    dims = {}
    for key, value in initial.items():
        name, kind = key.split(".lora_")
        dims.setdefault(name, [None, None])[0 if kind.startswith("A") else 1] = (
            value.shape[1] if kind.startswith("A") else value.shape[0])
    assert strategy.spec is strategy.replies.spec
    assert {k: tuple(v) for k, v in strategy.spec.modules.items()} == {k: tuple(v) for k, v in dims.items()}
    assert strategy.mirror.revisions == {0: "flower-round-0"}


def test_rank_client_sampling_plans_each_round_from_the_clients_ranks(initial, tmp_path):
    """client_sampling="rank" (docs/methods.md#client-sampling) goes through the one `plan_round`: each round's
    participants are the seeded rank-proportional draw over the connected clients and their current ranks."""
    from peft_hetlora.federated.aggregation.privacy import DPConfig
    from peft_hetlora.federated.policies import rank_sample_clients

    ranks = {"client-0": 2, "client-1": 2, "client-2": 2, "client-3": 6, "client-4": 8}
    strategy = strategy_for(5, ranks, method="flexlora_held", clients_per_round=2, client_sampling="rank", seed=3)
    grid = inline_grid(5)
    for server_round in (1, 2, 3, 4):
        messages = strategy.configure_train(server_round, ArrayRecord(initial), ConfigRecord(), grid)
        sent = sorted(m.content["config"]["client-id"] for m in messages)
        assert sent == rank_sample_clients(sorted(ranks), ranks, 2, seed=3, round_idx=server_round - 1)
    ranked = strategy_for(5, ranks, method="flexlora_held", clients_per_round=2, client_sampling="rank", seed=3)
    ranked.start(grid=inline_grid(5, app=stub_client_app(5)), initial_arrays=ArrayRecord(initial), num_rounds=1)
    assert ranked.history[0]["client_sampling"] == "rank"
    store = LocalStore(tmp_path / "fed", create=True)  # a mirrored round.json names the policy, as the coordinator's
    mirrored = strategy_for(5, ranks, method="flexlora_held", clients_per_round=2, client_sampling="rank", seed=3,
                            store=store)
    mirrored.start(grid=inline_grid(5, app=stub_client_app(5)), initial_arrays=ArrayRecord(initial), num_rounds=1)
    info = json.loads((store.get_global(0).path / "round.json").read_text())
    assert info["client_sampling"] == "rank"
    assert info["participants"] == rank_sample_clients(sorted(ranks), ranks, 2, seed=3, round_idx=0)
    assert "client_sampling" not in strategy_history_of_uniform(initial)  # uniform summaries are as before
    dp = DPConfig(clip=0.5, noise_multiplier=1.0, delta=1e-5, sampling_rate=0.5, expected_clients=2)
    with pytest.raises(ValueError, match="Poisson"):
        strategy_for(5, ranks, method="rankwise", dp=dp, client_sampling="rank")


def test_rank_sampling_rounds_turns_flower_rounds_uniform_after_n(initial, tmp_path):
    """``rank_sampling_rounds`` goes through the one `plan_round` under Flower too: server rounds 1 .. N draw by rank,
    later ones uniformly, and each round's summary names the policy that drew it."""
    from peft_hetlora.federated.policies import rank_sample_clients, sample_clients

    ranks = {"client-0": 2, "client-1": 2, "client-2": 2, "client-3": 6, "client-4": 8}
    strategy = strategy_for(5, ranks, method="flexlora_held", clients_per_round=2, client_sampling="rank", seed=3,
                            rank_sampling_rounds=2)
    grid = inline_grid(5)
    for server_round in (1, 2, 3, 4):
        messages = strategy.configure_train(server_round, ArrayRecord(initial), ConfigRecord(), grid)
        sent = sorted(m.content["config"]["client-id"] for m in messages)
        t = server_round - 1
        expected = (rank_sample_clients(sorted(ranks), ranks, 2, seed=3, round_idx=t) if t < 2
                    else sample_clients(sorted(ranks), 2, seed=3, round_idx=t))
        assert sent == expected
    ran = strategy_for(5, ranks, method="flexlora_held", clients_per_round=2, client_sampling="rank", seed=3,
                       rank_sampling_rounds=1)
    ran.start(grid=inline_grid(5, app=stub_client_app(5)), initial_arrays=ArrayRecord(initial), num_rounds=2)
    assert ran.history[0]["client_sampling"] == "rank"
    assert "client_sampling" not in ran.history[1]  # a uniform round's summary is as before
    with pytest.raises(ValueError, match="set client_sampling='rank'"):
        strategy_for(5, ranks, method="flexlora_held", rank_sampling_rounds=2)


def strategy_history_of_uniform(initial) -> dict:
    strategy = strategy_for(3, {"client-0": 2, "client-1": 4, "client-2": 8})
    strategy.start(grid=inline_grid(3, app=stub_client_app(3)), initial_arrays=ArrayRecord(initial), num_rounds=1)
    return strategy.history[0]


@pytest.mark.parametrize("method", ["hetlora", "zero_pad", "flexlora", "rankwise", "fedavg", "median"])
def test_every_method_matches_the_numpy_reference(initial, method):
    ranks = {"client-0": 4, "client-1": 4, "client-2": 4} if method == "fedavg" else {
        "client-0": 2, "client-1": 6, "client-2": 8}
    strategy = strategy_for(3, ranks, method=method)
    prune = () if method == "fedavg" else (2,)
    strategy.start(grid=inline_grid(3, app=stub_client_app(3, prune=prune)), initial_arrays=ArrayRecord(initial),
                   num_rounds=1)
    assert strategy.history[0]["accepted"] == ["client-0", "client-1", "client-2"]
    assert_matches_reference(strategy.global_state, strategy.round_updates[0], method, previous=initial,
                             weights=strategy.history[0]["weights"])


def test_failed_dropped_and_invalid_replies_are_reported_and_the_round_completes(initial):
    def nan_arrays(content):
        state = rec.arrays_to_state_dict(content["arrays"])
        first = next(iter(state))
        state[first] = torch.full_like(state[first], float("nan"))
        return RecordDict({"arrays": rec.state_dict_to_arrays(state), "metrics": content["metrics"]})

    def wrong_rank(content):
        metrics = dict(content["metrics"])
        metrics["rank-out"] = 3  # declares rank 3 but uploads its real rank 4
        return RecordDict({"arrays": content["arrays"], "metrics": MetricRecord(metrics)})

    ranks = {f"client-{i}": r for i, r in enumerate([2, 4, 8, 6, 4])}
    strategy = strategy_for(5, ranks)
    grid = inline_grid(5, app=stub_client_app(5, fail=(1,)), drop={"client-2"},
                       tamper={"client-3": nan_arrays, "client-4": wrong_rank})
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=1)

    summary = strategy.history[0]
    assert summary["accepted"] == ["client-0"]
    assert "simulated device failure on partition 1" in summary["failed"]["client-1"]
    assert summary["failed"]["client-2"] == "no reply before the round timeout"
    assert "non-finite" in summary["rejected"]["client-3"]
    assert "rank" in summary["rejected"]["client-4"]
    metrics = result.train_metrics_clientapp[1]
    assert metrics["num-failed"] == 2 and metrics["num-rejected"] == 2 and metrics["num-accepted"] == 1
    assert metrics["failed/client-1"] == 1 and metrics["failed/client-2"] == 1 and metrics["rejected/client-3"] == 1
    assert_matches_reference(strategy.global_state, strategy.round_updates[0], "hetlora")
    # Clients that did not deliver keep their rank.
    assert {c: strategy.client_ranks[c] for c in ("client-1", "client-2", "client-3")} == {
        "client-1": 4, "client-2": 8, "client-3": 6}


class LateGrid(InlineGrid):
    """An inline grid whose nodes connect only after `polls` polls."""

    def __init__(self, grid: InlineGrid, polls: int):
        super().__init__(grid.app, grid.node_configs)
        self.polls = polls

    def get_node_ids(self):
        if self.polls > 0:
            self.polls -= 1
            return []
        return super().get_node_ids()


def test_node_wait_uses_the_injected_clock_and_logs_flower_round_numbers(initial, caplog):
    waits: list[float] = []
    ticks = iter(range(1000, 2000))
    strategy = strategy_for(2, {"client-0": 2, "client-1": 4}, sleep=waits.append, clock=lambda: float(next(ticks)))
    grid = LateGrid(inline_grid(2, app=stub_client_app(2)), polls=3)
    with caplog.at_level("INFO", logger="peft_hetlora.flower.strategy"):
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=1)
    assert waits == [1.0, 1.0, 1.0]  # three empty polls, no real sleep
    assert strategy.history[0]["accepted"] == ["client-0", "client-1"]
    assert "[ROUND 1/1] training client-0@r2, client-1@r4" in caplog.text and "Round 0" not in caplog.text


@pytest.mark.parametrize("next_rank", ["rank_out", "initial"])
def test_next_rank_rule_is_honoured(initial, next_rank):
    ranks = {"client-0": 4, "client-1": 6}
    strategy = strategy_for(2, ranks, next_rank=next_rank)
    strategy.start(grid=inline_grid(2, app=stub_client_app(2, prune=(0, 1))), initial_arrays=ArrayRecord(initial),
                   num_rounds=1)
    expected = {"client-0": 3, "client-1": 5} if next_rank == "rank_out" else ranks
    assert {c: strategy.client_ranks[c] for c in ranks} == expected


def test_min_replies_carries_the_global_over(initial):
    strategy = strategy_for(2, {"client-0": 2, "client-1": 4}, min_replies=2)
    strategy.start(grid=inline_grid(2, app=stub_client_app(2, fail=(0,))), initial_arrays=ArrayRecord(initial),
                   num_rounds=1)
    assert "min_replies=2" in strategy.history[0]["note"]
    assert_state_close(strategy.global_state, initial, atol=0)


def test_max_rank_reported_by_a_node_caps_its_rank(initial):
    strategy = HetLoRAStrategy(CONFIG, method="hetlora", rank_policy="constant", min_available_nodes=2,
                               training=TRAINING)
    app = make_client_app(TASK, training_defaults=TRAINING)
    grid = InlineGrid(app, {1: {"partition-id": 0}, 2: {"partition-id": 1, "max-rank": 3}})
    messages = strategy.configure_train(1, ArrayRecord(initial), ConfigRecord(), grid)
    assert {m.content["config"]["client-id"]: m.content["config"]["rank"] for m in messages} == {
        "client-0": R_MAX, "client-1": 3}


def test_store_mirrors_rounds_in_the_coordinator_layout(initial, tmp_path):
    store = LocalStore(tmp_path / "fed", create=True)
    ranks = {"client-0": 2, "client-1": 8}
    strategy = strategy_for(2, ranks, store=store)
    strategy.start(grid=inline_grid(2, app=stub_client_app(2, prune=(1,))), initial_arrays=ArrayRecord(initial),
                   num_rounds=2)

    federation = store.read_federation()
    assert federation["engine"] == "flower" and federation["r_max"] == R_MAX and federation["method"] == "hetlora"
    assert federation["initial_ranks"] == ranks
    assert [store.latest_global().round] == [2]
    for t in range(3):
        folder = store.get_global(t).path
        info = json.loads((folder / "round.json").read_text())
        assert info["round"] == t and info["final"] == (t == 2)
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "HETLORA"
        if t < 2:
            assert info["participants"] == ["client-0", "client-1"]
            assert info["ranks"] == strategy.history[t]["assigned_ranks"]
            summary = store.read_summary(t)
            coordinator_keys = {"round", "method", "global_revision", "participants", "assigned_ranks", "accepted",
                                "rejected", "weights", "clients", "client_ranks", "metrics", "aggregation"}
            assert coordinator_keys <= set(summary)
            assert summary["global_revision"] == store.get_global(t).revision
    final = load_file(str(store.latest_global().path / "adapter_model.safetensors"))
    assert_state_close(final, strategy.global_state, atol=0)
    # The pruned client's next rank is the rank it reported.
    assert store.get_global(1).path.joinpath("round.json").read_text().count('"client-1": 7') == 1


# --------------------------------------------------------------------------------------------------- Ray simulation
N_GOOD = 10
SIM_RANKS = {f"client-{i}": [2, 4, 8, 6, 3][i % 5] for i in range(N_GOOD + 1)}
SIM_TASK = ToyTask(num_examples=8, seq_len=16, model_fn=functools.partial(tiny_llama, 0), fail_partitions=(N_GOOD,))
SIM_SETTINGS = dict(num_clients=N_GOOD + 1, adapter_config=CONFIG, ranks=SIM_RANKS, method="hetlora", rounds=2,
                    training=TRAINING, seed=3, keep_updates=True)


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    """One Flower simulation (Ray, 2 CPUs, 1 CPU per virtual client) and the same experiment in-process."""
    store = LocalStore(tmp_path_factory.mktemp("flower-store"), create=True)
    flower = run_flower_simulation(SIM_TASK, store=store, num_cpus=2, cpus_per_client=1.0, **SIM_SETTINGS)
    reference = run_inprocess_simulation(SIM_TASK, num_threads=1, **SIM_SETTINGS)
    return flower, reference, store


def test_simulation_of_eleven_nodes_completes_two_rounds_with_mixed_ranks(simulation):
    flower, _, _ = simulation
    assert len(flower.rounds) == 2
    for summary in flower.rounds:
        assert summary["accepted"] == sorted(f"client-{i}" for i in range(N_GOOD))
        assert len(set(summary["assigned_ranks"].values())) >= 4
    assert flower.rounds[0]["assigned_ranks"] == SIM_RANKS


def test_simulation_global_equals_in_process_aggregation_of_the_same_updates(simulation):
    flower, reference, store = simulation
    # Round by round: the global the strategy published is the numpy reference of the updates it received.
    for t in range(2):
        published = load_file(str(store.get_global(t + 1).path / "adapter_model.safetensors"))
        assert_matches_reference(published, flower.updates[t], "hetlora", weights=flower.rounds[t]["weights"])
    assert_state_close(flower.final_state_dict, published, atol=0)
    # And the whole Flower run equals the same experiment run by the simulator's in-process loop (a Coordinator over
    # a store; same settings record, seeds and local training; one torch thread, as each virtual client): bit for bit.
    for t in range(2):
        assert flower.rounds[t]["accepted"] == reference.rounds[t]["accepted"]
        assert flower.rounds[t]["client_ranks"] == reference.rounds[t]["client_ranks"]
        assert flower.rounds[t]["weights"] == reference.rounds[t]["weights"]
        assert [u.client_id for u in flower.updates[t]] == [u.client_id for u in reference.updates[t]]
        for a, b in zip(flower.updates[t], reference.updates[t]):
            assert a.rank == b.rank and a.num_examples == b.num_examples
            assert_state_equal(a.state_dict, b.state_dict)
    assert_state_equal(flower.final_state_dict, reference.final_state_dict)


def test_simulation_failing_node_is_reported_and_rounds_complete(simulation):
    flower, reference, store = simulation
    bad = f"client-{N_GOOD}"
    for t, summary in enumerate(flower.rounds):
        assert list(summary["failed"]) == [bad]
        assert "simulated device failure" in summary["failed"][bad]
        assert summary["metrics"]["num_failed"] == 1 and summary["metrics"]["num_accepted"] == N_GOOD
        assert store.read_summary(t)["failed"] == summary["failed"]
        assert list(reference.rounds[t]["failed"]) == [bad]


def test_dp_rounds_on_flower_equal_the_plain_mean_without_noise_and_record_epsilon(initial, tmp_path):
    from peft_hetlora.federated.aggregation.privacy import DPConfig, privacy_spent

    dp = DPConfig(clip=1e9, noise_multiplier=0.0, delta=1e-5, sampling_rate=1.0, expected_clients=3)
    store = LocalStore(tmp_path / "fed", create=True)
    strategy = strategy_for(3, {"client-0": 2, "client-1": 6, "client-2": 8}, method="zero_pad", dp=dp, store=store)
    strategy.start(grid=inline_grid(3, app=stub_client_app(3, prune=(2,))), initial_arrays=ArrayRecord(initial),
                   num_rounds=1)
    summary = strategy.history[0]
    assert summary["accepted"] == client_ids(3) and summary["privacy"] == privacy_spent(dp, 1)
    assert all("norm" not in info for info in summary["clients"].values())
    factors, extras, _ = np_ref.weighted(strategy.round_updates[0], [1.0] * 3, R_MAX)  # uniform, public weights
    expected = dict(extras)
    for name, (a, b) in factors.items():
        expected[f"{name}.lora_A.weight"], expected[f"{name}.lora_B.weight"] = a, b
    for key, value in expected.items():
        np.testing.assert_allclose(strategy.global_state[key].double().numpy(), value, rtol=1e-5, atol=1e-6)
    assert store.read_federation()["dp"]["clip"] == 1e9 and store.read_summary(0)["privacy"]["rounds"] == 1


def test_coverage_windows_on_flower_train_the_assigned_components_and_match_the_component_rule(initial):
    ranks = {"client-0": 2, "client-1": 3, "client-2": 4}
    strategy = strategy_for(3, ranks, method="component", component_selection="coverage")
    grid = inline_grid(3)
    messages = list(strategy.configure_train(1, ArrayRecord(initial), ConfigRecord(), grid))
    windows = {m.content["config"]["client-id"]: list(m.content["config"][rec.COMPONENTS]) for m in messages}
    assert {cid: len(w) for cid, w in windows.items()} == ranks
    assert sorted({j for w in windows.values() for j in w}) == list(range(R_MAX))  # 2 + 3 + 4 >= 8: all covered
    for m in messages:  # a window client keeps the rest of the global frozen: it receives all of it
        assert_state_close(rec.arrays_to_state_dict(m.content["arrays"]), initial, atol=0)

    strategy = strategy_for(3, ranks, method="component", component_selection="coverage")
    strategy.start(grid=inline_grid(3), initial_arrays=ArrayRecord(initial), num_rounds=1)
    summary = strategy.history[0]
    assert summary["accepted"] == sorted(ranks) and not summary["rejected"]
    updates = strategy.round_updates[0]
    # self-pruning under a window drops its tail (highest indices): the upload is the window's first rank_out
    assert {u.client_id: list(u.components or range(u.rank)) for u in updates} == {
        cid: w[: summary["clients"][cid]["rank_out"]] for cid, w in windows.items()}
    trained = [list(u.components or range(u.rank)) for u in updates]
    assert summary["coverage"] == [sum(j in w for w in trained) for j in range(R_MAX)]
    expected = np_ref.component_rule(updates, R_MAX, 16 / R_MAX, previous=initial)
    got = np_ref.np_modules(strategy.global_state)
    for name, (a, b) in expected.items():
        np.testing.assert_allclose(got[name][0], a, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got[name][1], b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_reply_with_components_outside_its_window_is_rejected(initial):
    ranks = {"client-0": 2, "client-1": 3, "client-2": 4}

    def shift(content):
        metrics = dict(content["metrics"])
        metrics[rec.COMPONENTS] = [R_MAX - 1 - i for i in range(len(metrics[rec.COMPONENTS]))]  # the top ones
        return RecordDict({"arrays": content["arrays"], "metrics": MetricRecord(metrics)})

    strategy = strategy_for(3, ranks, method="component", component_selection="rolling")  # round 0: prefixes
    strategy.start(grid=inline_grid(3, tamper={"client-1": shift}), initial_arrays=ArrayRecord(initial),
                   num_rounds=1)
    assert "not assigned" in strategy.history[0]["rejected"]["client-1"]
    assert strategy.history[0]["accepted"] == ["client-0", "client-2"]


def test_window_selection_needs_a_method_that_takes_components():
    with pytest.raises(ValueError, match="cannot aggregate"):
        HetLoRAStrategy(CONFIG, method="flexlora", component_selection="rolling")


def test_bf16_and_int8_replies_are_decoded_before_aggregation_and_lies_are_rejected(initial):
    from peft_hetlora.federated.upload import SCALE_SUFFIX

    ranks = {"client-0": 4, "client-1": 4, "client-2": 4}
    grid = inline_grid(3)
    grid.node_configs = {n: {**c, rec.MESSAGE_FORMAT: ("bf16", "int8-block64", "fp32")[c["partition-id"]]}
                         for n, c in grid.node_configs.items()}
    grid.contexts = {n: Context(run_id=1, node_id=n, node_config=dict(c), state=RecordDict(), run_config={})
                     for n, c in grid.node_configs.items()}
    strategy = strategy_for(3, ranks, method="hetlora")
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=1)
    summary = strategy.history[0]
    assert summary["accepted"] == sorted(ranks)
    assert {c: summary["clients"][c]["message_format"] for c in ranks} == {
        "client-0": "bf16", "client-1": "int8-block64", "client-2": "fp32"}
    assert summary["clients"]["client-0"]["upload_bytes"] < summary["clients"]["client-2"]["upload_bytes"]
    replies = {m.content["config"]["client-id"]: m for m in grid.sent if m.metadata.message_type == "train"}
    assert replies  # the decoded updates the strategy aggregated are float32 and close to what was sent
    for update in strategy.round_updates[0]:
        assert all(v.dtype == torch.float32 for v in update.state_dict.values())
    assert_matches_reference(strategy.global_state, strategy.round_updates[0], "hetlora",
                             weights=summary["weights"])

    def fp32_declared_bf16(content):  # declares bf16, sends float32
        arrays = rec.arrays_to_state_dict(content["arrays"])
        if content["message"]["message-format"] == "bf16":
            arrays = {k: v.view(torch.bfloat16).float() for k, v in arrays.items()}
        return RecordDict({"arrays": rec.state_dict_to_arrays(arrays), "metrics": content["metrics"],
                           "message": content["message"]})

    def nan_scale(content):
        arrays = rec.arrays_to_state_dict(content["arrays"])
        key = next(k for k in sorted(arrays) if k.endswith(SCALE_SUFFIX))
        arrays[key] = arrays[key].clone()
        arrays[key][0] = float("nan")
        return RecordDict({"arrays": rec.message_to_arrays(arrays), "metrics": content["metrics"],
                           "message": content["message"]})

    grid.tamper = {"client-0": fp32_declared_bf16, "client-1": nan_scale}
    strategy = strategy_for(3, ranks, method="hetlora", message_formats=["bf16", "int8", "fp32"])
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=1)
    summary = strategy.history[0]
    assert summary["accepted"] == ["client-2"]
    assert "declares message_format 'bf16'" in summary["rejected"]["client-0"]
    assert "NaN" in summary["rejected"]["client-1"]
