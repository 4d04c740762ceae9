"""The simulator's records: one `FederationSettings` per arm that both engines resolve alike, one training record."""

from __future__ import annotations

import dataclasses

import pytest

from hetlora_bench.arm_setup import arm_coordinator_settings, arm_ranks
from hetlora_bench.arms import ARMS, DEFAULT_METHODS, PROFILES, SimulationConfig, honest_clients, runs_on_flower
from peft_hetlora.federated import FederationSettings
from peft_hetlora.flower import LocalTrainingConfig

FEDERATED = [arm for arm, spec in ARMS.items() if spec["aggregation"] is not None]


def test_every_profile_sets_each_training_setting_explicitly():
    """A profile does not follow the library's `LocalTrainingConfig` defaults silently (the main job keeps its
    numbers whatever the library's defaults become)."""
    for name, profile in PROFILES.items():
        for field in ("local_steps", "batch_size", "learning_rate", "eval_batch_size"):
            assert field in profile, (name, field)


@pytest.mark.parametrize("profile", list(PROFILES))
def test_the_training_record_carries_the_configs_settings(profile):
    cfg = SimulationConfig.from_sources(profile=profile)
    training = cfg.training(prune=True, nested=True, use_cpu=True)
    assert isinstance(training, LocalTrainingConfig)
    assert (training.local_steps, training.batch_size, training.learning_rate, training.eval_batch_size,
            training.bf16) == (cfg.local_steps, cfg.batch_size, cfg.learning_rate, cfg.eval_batch_size, cfg.bf16)
    assert training.prune and training.nested and training.use_cpu
    # the settings the record leaves at the library's defaults are those the runner trained with before
    defaults = LocalTrainingConfig()
    assert (training.gradient_accumulation_steps, training.weight_decay, training.max_grad_norm,
            training.lr_scheduler_type, training.warmup_steps) == (
        defaults.gradient_accumulation_steps, 0.0, 1.0, "constant", 0)
    # and the record round-trips through the ConfigRecord form the Flower server sends
    assert LocalTrainingConfig.from_config(training.to_config()) == training


def test_the_simulators_fields_default_to_the_one_training_record():
    fields = {f.name: f.default for f in dataclasses.fields(SimulationConfig)}
    defaults = LocalTrainingConfig()
    for name in ("local_steps", "batch_size", "learning_rate", "eval_batch_size", "bf16"):
        assert fields[name] == getattr(defaults, name), name


@pytest.mark.parametrize("arm", FEDERATED)
def test_each_arm_is_one_settings_record(arm):
    cfg = SimulationConfig.from_sources(profile="quick")
    ranks0 = {f"c{i}": r for i, r in enumerate([2, 3, 5, 8, 8, 4])}
    r_arm, ranks = arm_ranks(cfg, arm, ranks0)
    settings = arm_coordinator_settings(cfg, arm, r_arm, ranks, seed=7)
    spec = ARMS[arm]
    assert isinstance(settings, FederationSettings)
    assert settings.method == spec["aggregation"] and settings.r_max == r_arm
    assert settings.clients == tuple(sorted(ranks)) and settings.rank_policy.assign(
        sorted(ranks), r_min=1, r_max=r_arm) == ranks
    assert settings.clients_per_round == min(cfg.clients_per_round, len(ranks)) and settings.seed == 7
    assert settings.component_selection == spec.get("selection")
    assert (settings.dp is not None) == ("dp_epsilon" in spec)
    # the record is what federation.json stores: it survives the round trip (DP: the same clip and noise)
    back = FederationSettings.from_json(settings.to_json())
    assert back.replace(dp=None) == settings.replace(dp=None)
    if settings.dp is not None:
        for key in ("clip", "noise_multiplier", "sampling_rate", "expected_coverage", "delta"):
            assert back.dp.to_dict()[key] == settings.dp.to_dict()[key], key


@pytest.mark.parametrize("arm", [a for a in FEDERATED if runs_on_flower(a)])
def test_both_engines_resolve_an_arms_record_to_the_same_round_settings(arm, tmp_path):
    pytest.importorskip("flwr")
    import torch

    from peft_hetlora.federated import Coordinator, LocalStore
    from peft_hetlora.flower import HetLoRAStrategy

    cfg = SimulationConfig.from_sources(profile="quick")
    r_arm, ranks = arm_ranks(cfg, arm, {f"c{i}": r for i, r in enumerate([2, 3, 5, 8, 8, 4])})
    settings = arm_coordinator_settings(cfg, arm, r_arm, ranks, seed=7)
    adapter_config = {"peft_type": "HETLORA", "r": r_arm, "r_min": settings.r_min, "lora_alpha": 2.0 * r_arm,
                      "target_modules": ["q_proj"], "rank_scaling": "fixed"}
    coordinator = Coordinator(LocalStore(tmp_path / "fed", create=True), settings, progress=False)
    coordinator.init(state_dict={"base_model.model.q_proj.lora_A.weight": torch.zeros(r_arm, 4),
                                 "base_model.model.q_proj.lora_B.weight": torch.zeros(4, r_arm)},
                     adapter_config=adapter_config)
    strategy = HetLoRAStrategy.from_settings(adapter_config, settings)
    on_flower = dataclasses.replace(strategy.round_settings(), engine=None)
    in_process = dataclasses.replace(coordinator.round_settings(), engine=None)
    assert on_flower == in_process
    assert strategy.initial_ranks == {} and coordinator.federation["initial_ranks"] == ranks
    assert strategy.rank_policy.assign(sorted(ranks), r_min=settings.r_min, r_max=r_arm) == ranks


def test_the_flower_engine_runs_the_default_arms_and_refuses_attackers_by_capability():
    cfg = SimulationConfig.from_sources(profile="quick", overrides={"engine": "flower"})
    assert cfg.methods == DEFAULT_METHODS and "window_fedavg" in cfg.methods
    for arm in ("window_coverage", "nested", "dp_eps4", "top_flexlora"):
        assert SimulationConfig.from_sources(profile="quick", overrides={"engine": "flower", "methods": [arm]})
    assert SimulationConfig.from_sources(profile="quick", overrides={"engine": "flower", "message_format": "bf16"})
    attacked = [arm for arm in ARMS if not honest_clients(arm)]
    assert attacked and all(ARMS[arm].get("attack") for arm in attacked)
    with pytest.raises(ValueError, match=attacked[0]):
        SimulationConfig.from_sources(profile="quick", overrides={"engine": "flower", "methods": [attacked[0]]})
