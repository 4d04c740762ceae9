"""The `flexlora_core` simulator arm: its coordinator settings and what its clients download and hold."""

from __future__ import annotations

from hetlora_bench.arm_setup import arm_coordinator_settings
from hetlora_bench.arms import ARMS, SimulationConfig
from hetlora_bench.runner import held_rank


def test_the_core_arm_asks_the_coordinator_for_cores():
    cfg = SimulationConfig.from_sources(profile="quick")
    settings = arm_coordinator_settings(cfg, "flexlora_core", 8, {"a": 2, "b": 8}, 0)
    assert settings.method == "flexlora_held" and settings.client_training == "core"
    assert arm_coordinator_settings(cfg, "flexlora_held", 8, {"a": 2, "b": 8}, 0).client_training is None


def test_a_core_client_downloads_the_whole_global_and_holds_its_core_rank():
    spec = ARMS["flexlora_core"]
    dims = [(576, 576), (576, 192)]
    assert held_rank(spec, 16, 2) == 16  # download: all of it (the bases and their seed come from all of it)
    # held: the budget rule by hand, w = 768: 7 x 768 + 4 x 49 = 5572 <= 4 x 2 x 768 = 6144; r = 8: 6400 > 6144
    assert held_rank(spec, 16, 2, dims) == 7
    assert held_rank(spec, 16, 16, dims) == 16  # a capable client trains factors at r_max
    assert held_rank(ARMS["flexlora_held"], 16, 2, dims) == 2  # a prefix client holds its prefix
