"""The settings record (issue 23): one frozen `FederationSettings`, validated once, serialised as federation.json.

The coordinator built from the record publishes byte for byte what the keyword form publishes (methods x rounds,
clip, DP, windows), and a federation.json written before the record existed still resumes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from coordinator_fakes import Clock, FakeClients, initial_adapter, make_coordinator
from hypothesis import given, settings
from hypothesis import strategies as st
from test_method_capabilities import flower_task_identity  # noqa: F401  (a fixture, registered by import)

from peft_hetlora.federated import Coordinator, FederationSettings, LocalStore, RankPolicy
from peft_hetlora.federated.aggregation.privacy import DPConfig
from peft_hetlora.utils.errors import AggregationError, HetLoRAError

OPTIONS = dict(method="hetlora", r_max=4, r_min=1, clients=["a", "b", "c", "d"], clients_per_round=3, rounds=2,
               seed=7, rank_policy={"a": 1, "b": 2, "c": 3, "d": 4})
DP = DPConfig(clip=0.5, noise_multiplier=1.0, delta=1e-5, sampling_rate=1.0, expected_clients=4)
ARMS = {
    "hetlora_clip": dict(method="hetlora", clip_norm=0.5),
    "rankwise_dp": dict(method="rankwise", dp=DP, dp_noise_seed=True, clients_per_round=4),
    "component_windows": dict(method="component", component_selection="coverage", anchor=1),
    "default_method": dict(method=None, clip_norm="off"),
    "fedavg": dict(method="fedavg", rank_policy=RankPolicy("constant", rank=2)),
    "rank_sampling": dict(method="flexlora_held", client_sampling="rank"),
}


def published(store: LocalStore, rounds: int) -> list[tuple[bytes, bytes, str]]:
    """Every global's adapter bytes, round.json bytes and summary (the decision record) of a finished run."""
    out = []
    for t in range(rounds + 1):
        folder = Path(store.get_global(t).path)
        summary = json.dumps(store.read_summary(t), sort_keys=True) if t < rounds else ""
        out.append(((folder / "adapter_model.safetensors").read_bytes(), (folder / "round.json").read_bytes(),
                    summary))
    return out


def run_old_style(root: Path, init: Path, options: dict) -> LocalStore:
    store = LocalStore(root, create=True)
    fake = FakeClients(store, root.parent / f"{root.name}-work", prune={"c"})
    coord = make_coordinator(store, fake, **options)
    coord.init(init)
    coord.run()
    return store


def run_new_style(root: Path, init: Path, options: dict) -> LocalStore:
    store = LocalStore(root, create=True)
    fake = FakeClients(store, root.parent / f"{root.name}-work", prune={"c"})
    record = FederationSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    coord = Coordinator(store, record, clock=Clock(), sleep=fake.sleep, poll_interval_s=1.0, progress=False)
    assert coord.settings is record
    coord.init(init)
    coord.run()
    return store


@pytest.mark.parametrize("arm", list(ARMS))
def test_the_record_and_the_keyword_form_publish_the_same_bytes(tmp_path, arm):
    options = {**OPTIONS, **ARMS[arm]}
    if options.get("method") == "fedavg":
        options["clients_per_round"] = 3
    init = initial_adapter(tmp_path / "init", r_max=4)
    old = run_old_style(tmp_path / "old", init, options)
    new = run_new_style(tmp_path / "new", init, options)
    assert published(old, 2) == published(new, 2)
    assert json.loads((old.path / "federation.json").read_text())["method"] == (
        options["method"] or "flexlora_held")


def test_an_old_federation_json_still_resumes(tmp_path):
    """A federation.json written before method, component selection, anchor, message formats and client sampling were
    recorded."""
    init = initial_adapter(tmp_path / "init", r_max=4)
    reference = run_old_style(tmp_path / "ref", init, {**OPTIONS, "rounds": 2})
    store = LocalStore(tmp_path / "old", create=True)
    fake = FakeClients(store, tmp_path / "old-work", prune={"c"})
    first = make_coordinator(store, fake, **{**OPTIONS, "rounds": 1})
    first.init(init)
    first.run()
    record = json.loads((store.path / "federation.json").read_text())
    for name in ("method", "component_selection", "anchor", "message_formats", "client_sampling"):
        record.pop(name)
    store.write_federation(record)
    loaded = FederationSettings.from_json(record)
    assert loaded.method is None and loaded.component_selection is None and loaded.client_sampling is None
    assert loaded.clients == tuple(OPTIONS["clients"])
    resumed = Coordinator(store, FederationSettings(rounds=2), clock=Clock(), sleep=fake.sleep,
                          poll_interval_s=1.0, progress=False)
    assert resumed.method == "hetlora"  # what a file without a method was written by
    assert resumed.component_selection == "prefix" and resumed.anchor == 0
    assert resumed.client_sampling == "uniform"  # what every federation did before the policy existed
    resumed.run()
    # the same globals (round.json of global 1 differs: it was the final round of the 1-round federation)
    assert [p[0] for p in published(store, 2)] == [p[0] for p in published(reference, 2)]
    assert [store.read_summary(t)["weights"] for t in range(2)] == [reference.read_summary(t)["weights"]
                                                                   for t in range(2)]


def test_json_round_trip_and_validation_once():
    record = FederationSettings(method="rankwise", r_max=8, r_min=2, clients=("a", "b", "c"),
                                rank_policy={"a": 2, "b": 4, "c": 8}, clients_per_round=2, min_clients=1, rounds=3,
                                seed=5, scaling=2.0, clip_norm=1.5, max_upload_bytes=1 << 20, deadline_s=30.0,
                                next_rank="initial", dp=DP, message_formats=("int8-block64", "bf16"))
    assert record.message_formats == ("bf16", "int8-block64")  # normalised once
    assert record.rank_policy == RankPolicy("explicit", ranks={"a": 2, "b": 4, "c": 8})
    text = json.dumps(record.to_json())  # plain JSON
    assert FederationSettings.from_json(json.loads(text)) == record
    with pytest.raises(ValueError, match="Unknown method"):
        FederationSettings(method="nope")
    with pytest.raises(ValueError, match="unique"):
        FederationSettings(clients=("a", "a"))
    with pytest.raises(ValueError, match="deadline_s"):
        FederationSettings(deadline_s=-1.0)
    with pytest.raises(AggregationError, match="no differentially private form"):
        FederationSettings(method="hetlora", dp=DP)
    with pytest.raises(AggregationError, match="cannot aggregate"):
        FederationSettings(method="fedavg", component_selection="rolling")
    with pytest.raises(TypeError, match="not both"):
        Coordinator(LocalStore.__new__(LocalStore), record, method="hetlora")
    with pytest.raises(dataclasses_frozen_error()):
        record.rounds = 4  # type: ignore[misc]


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 50), st.floats(allow_nan=True),
                        st.text(max_size=12), st.lists(st.text(max_size=4), max_size=3))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["method", "r_max", "clients", "clients_per_round", "seed", "scaling",
                                        "clip_norm", "deadline_s", "next_rank", "component_selection", "anchor",
                                        "message_formats", "dp", "format", "client_sampling", "unknown"]),
                       JSON_VALUES, max_size=6))
def test_a_hostile_federation_json_is_refused_with_a_clear_error_or_read(record):
    try:
        loaded = FederationSettings.from_json(record)
    except (ValueError, TypeError, HetLoRAError) as err:
        assert str(err)  # a message that says what is wrong
        return
    assert FederationSettings.from_json(loaded.to_json()) == loaded


@pytest.mark.usefixtures("flower_task_identity")
def test_the_flower_strategy_from_the_record_publishes_what_the_keyword_form_publishes():
    import test_flower as tf
    import torch
    from flwr.app import ArrayRecord
    from tiny_models import tiny_llama

    from peft_hetlora.flower import HetLoRAStrategy, initial_global_state

    state = initial_global_state(tiny_llama(0), tf.CONFIG, seed=0)
    generator = torch.Generator().manual_seed(5)
    initial = {k: (torch.randn(v.shape, generator=generator) * 0.1 if ".lora_B." in k else v)
               for k, v in state.items()}
    ranks = {"client-0": 2, "client-1": 6, "client-2": 8}
    given = dict(method="rankwise", rank_policy=ranks, clients=tf.client_ids(3), seed=3, clip_norm=0.5,
                 next_rank="initial", message_formats=["fp32"])
    runtime = dict(min_available_nodes=3, training=tf.TRAINING, keep_updates=True)
    globals_ = []
    for strategy in (HetLoRAStrategy(tf.CONFIG, **given, **runtime),
                     HetLoRAStrategy.from_settings(tf.CONFIG, FederationSettings.from_kwargs(**given), **runtime)):
        strategy.start(grid=tf.inline_grid(3, app=tf.stub_client_app(3)), initial_arrays=ArrayRecord(initial),
                       num_rounds=2)
        assert [h["accepted"] for h in strategy.history] == [sorted(ranks)] * 2
        globals_.append((strategy.global_state, strategy.history))
        assert (strategy.method, strategy.clip_norm, strategy.next_rank, strategy.seed, strategy.message_formats,
                strategy.rank_policy) == ("rankwise", 0.5, "initial", 3, ("fp32",), RankPolicy.coerce(ranks))
    (first, history_a), (second, history_b) = globals_
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    assert [h["weights"] for h in history_a] == [h["weights"] for h in history_b]
    with pytest.raises(ValueError, match="coordinator settings"):
        HetLoRAStrategy.from_settings(tf.CONFIG, FederationSettings(deadline_s=5.0))
    with pytest.raises(ValueError, match="r_max"):
        HetLoRAStrategy.from_settings(tf.CONFIG, FederationSettings(r_max=tf.R_MAX * 2))
