"""HetLoRAConfig validation, PEFT registration and config persistence."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

import peft_hetlora
from peft_hetlora import HetLoRAConfig, HetLoRAModel
from peft_hetlora.federated.settings import scaling_from_config
from peft_hetlora.utils import CONFIG_FILE, FEDERATION_FILE, scaling_for
from peft_hetlora.utils.errors import ConfigMismatchError

try:  # pytest puts tests/ on sys.path when tests/ is not a package ...
    from tiny_models import TwoLinear, one_thread_per_module  # noqa: F401  (autouse fixture)
except ImportError:  # ... and the repository root when it is
    from tests.tiny_models import TwoLinear, one_thread_per_module  # noqa: F401  (autouse fixture)


TARGETS = ["lin0", "lin1"]


def make(**kwargs) -> HetLoRAConfig:
    kwargs.setdefault("target_modules", TARGETS)
    return HetLoRAConfig(**kwargs)


# ----------------------------------------------------------------------------- defaults
def test_defaults():
    config = make(r=16)
    assert config.rank == 16 and config.r_min == 1
    assert config.rank_scaling == "fixed" and config.prune_gamma == 0.99 and config.prune_lambda == 0.0
    assert config.peft_type == PeftType.HETLORA == "HETLORA"
    assert isinstance(config, LoraConfig)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"r": 16, "lora_alpha": 32}, 2.0), ({"r": 16, "lora_alpha": 32, "rank_scaling": "rslora"}, 8.0)],
)
def test_scaling_is_rank_independent(kwargs, expected):
    for rank in (1, 4, 16):
        assert make(rank=rank, **kwargs).scaling == pytest.approx(expected)


@given(alpha=st.floats(0.125, 512, allow_nan=False), r_max=st.integers(1, 4096), rslora=st.booleans())
def test_one_scale_rule_for_the_tuner_and_the_server(alpha, r_max, rslora):
    """The leaf's formula, the config's property and the server's reading of federation.json all equal the hand
    formula alpha / r_max (rsLoRA: alpha / sqrt(r_max)) (docs/design.md#scale-rule)."""
    rule = "rslora" if rslora else "fixed"
    hand = alpha / (math.sqrt(r_max) if rslora else r_max)
    assert scaling_for(alpha, r_max, rule) == pytest.approx(hand, rel=1e-12)
    assert scaling_from_config({"lora_alpha": alpha, "rank_scaling": rule}, r_max) == pytest.approx(hand, rel=1e-12)
    config = make(r=min(r_max, 64), lora_alpha=alpha, rank_scaling=rule)
    assert config.scaling == pytest.approx(alpha / (math.sqrt(config.r) if rslora else config.r), rel=1e-12)


# ----------------------------------------------------------------------------- from_federation
def test_from_federation_reads_federation_json_and_keeps_local_choices(tmp_path):
    adapter = {"r": 8, "lora_alpha": 16, "target_modules": ["lin0", "lin1"], "r_min": 2, "peft_type": "HETLORA",
               "rank": 8, "inference_mode": True}
    (tmp_path / FEDERATION_FILE).write_text(json.dumps({"adapter_config": adapter}))
    config = HetLoRAConfig.from_federation(tmp_path, rank=3, prune_lambda=0.5)
    assert (config.r, config.rank, config.r_min, config.lora_alpha) == (8, 3, 2, 16)
    assert config.prune_lambda == 0.5 and config.inference_mode is False
    assert sorted(config.target_modules) == ["lin0", "lin1"]
    with pytest.raises(ConfigMismatchError, match="lora_alpha=32 contradicts"):
        HetLoRAConfig.from_federation(tmp_path, rank=3, lora_alpha=32)
    with pytest.raises(ValueError, match="r_min"):
        HetLoRAConfig.from_federation(tmp_path, rank=1)  # below the federation's r_min=2


def test_from_federation_reads_a_saved_global_adapter(tmp_path):
    HetLoRAConfig(r=4, rank=4, lora_alpha=8, target_modules=["lin0"]).save_pretrained(str(tmp_path))
    assert (tmp_path / CONFIG_FILE).is_file()
    config = HetLoRAConfig.from_federation(tmp_path)
    assert (config.r, config.rank, config.lora_alpha) == (4, 4, 8)
    with pytest.raises(ConfigMismatchError, match="neither"):
        HetLoRAConfig.from_federation(tmp_path / "missing")


# ----------------------------------------------------------------------------- invalid values
@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"r": 8, "rank": 0}, "rank", "between 1 and r=8"),
        ({"r": 8, "rank": -3}, "rank", "between 1 and r=8"),
        ({"r": 8, "rank": 9}, "rank", "between 1 and r=8"),
        ({"r": 8, "r_min": 9}, "r_min", "between 1 and r=8"),
        ({"r": 8, "r_min": 0}, "r_min", "between 1 and r=8"),
        ({"r": 8, "rank": 2, "r_min": 3}, "rank", "r_min"),
        ({"r": 8, "rank": 2.5}, "rank", "integer"),
        ({"r": 8, "rank": "4"}, "rank", "integer"),
        ({"r": 8, "rank": True}, "rank", "integer"),
        ({"r": 8, "r_min": 1.0}, "r_min", "integer"),
        ({"r": 8, "r_min": False}, "r_min", "integer"),
        ({"r": 0}, "r", "positive"),
        ({"r": 8.0}, "r", "integer"),
        ({"r": 8, "prune_gamma": 0.0}, "prune_gamma", "(0, 1)"),
        ({"r": 8, "prune_gamma": 1.0}, "prune_gamma", "(0, 1)"),
        ({"r": 8, "prune_gamma": -0.5}, "prune_gamma", "(0, 1)"),
        ({"r": 8, "prune_gamma": 1.5}, "prune_gamma", "(0, 1)"),
        ({"r": 8, "prune_gamma": math.nan}, "prune_gamma", "(0, 1)"),
        ({"r": 8, "prune_gamma": "0.9"}, "prune_gamma", "(0, 1)"),
        ({"r": 8, "prune_lambda": -1e-3}, "prune_lambda", ">= 0"),
        ({"r": 8, "prune_lambda": math.nan}, "prune_lambda", ">= 0"),
        ({"r": 8, "prune_lambda": math.inf}, "prune_lambda", ">= 0"),
        ({"r": 8, "prune_lambda": True}, "prune_lambda", ">= 0"),
        ({"r": 8, "rank_scaling": "rank"}, "rank_scaling", "'fixed', 'rslora'"),
    ],
)
def test_invalid_values_name_field_and_range(kwargs, field, allowed):
    with pytest.raises(ValueError) as info:
        make(**kwargs)
    message = str(info.value)
    assert f"`{field}`" in message, message
    assert allowed in message, message


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"lora_bias": True}, "lora_bias"),
        ({"rank_pattern": {"lin0": 2}}, "rank_pattern"),
        ({"alpha_pattern": {"lin0": 2}}, "alpha_pattern"),
        ({"use_rslora": True}, "rank_scaling='rslora'"),
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"init_lora_weights": "olora"}, "olora"),
        ({"init_lora_weights": "mica"}, "mica"),
        ({"init_lora_weights": "lora_ga"}, "lora_ga"),
        ({"alora_invocation_tokens": [1, 2], "task_type": "CAUSAL_LM"}, "alora_invocation_tokens"),
    ],
)
def test_unsupported_options_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("(", r"\(")):
        make(r=8, **kwargs)


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_plain_inits_are_accepted(init):
    assert make(r=8, rank=4, init_lora_weights=init).init_lora_weights == init


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_refused_inits_would_change_the_initial_output(init):
    """Why the weight-driven inits are refused: under LoRA they rewrite the base weight with alpha / rank."""
    torch.manual_seed(0)
    base, x = TwoLinear(), torch.randn(3, 12)
    expected = base(x)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, init_lora_weights=init))
    layer = model.base_model.model.lin0
    layer.scaling["default"] = 16 / 8  # what HetLoRA would use for r_max = 8
    assert not torch.allclose(model(x), expected, atol=1e-3)


def test_unknown_target_modules_raise_peft_error():
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(TwoLinear(), HetLoRAConfig(r=4, target_modules=["does_not_exist"]))


def test_unsupported_layer_type_is_refused():
    class WithEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)

        def forward(self, x):
            return self.emb(x)

    with pytest.raises(ValueError, match="nn.Linear or transformers Conv1D"):
        get_peft_model(WithEmbedding(), HetLoRAConfig(r=4, target_modules=["emb"]))


# ----------------------------------------------------------------------------- registration
def test_registration_is_idempotent():
    before = PeftType.HETLORA
    members = list(PeftType)
    reloaded = importlib.reload(peft_hetlora)
    importlib.reload(peft_hetlora.registration)
    peft_hetlora.registration.register()
    assert peft_hetlora.registration.HETLORA_PEFT_TYPE is peft_hetlora.HETLORA_PEFT_TYPE is before
    assert PeftType.HETLORA is before
    assert list(PeftType) == members and members.count(PeftType.HETLORA) == 1
    assert PeftType("HETLORA") is PeftType["HETLORA"] is PeftType.HETLORA
    assert "HETLORA" in PeftType.__members__
    assert isinstance(PeftType.HETLORA, PeftType) and PeftType.HETLORA.value == "HETLORA"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HETLORA] is reloaded.HetLoRAConfig is HetLoRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HETLORA] is HetLoRAModel
    # after the reload the package still builds models
    model = get_peft_model(TwoLinear(), reloaded.HetLoRAConfig(r=4, rank=2, target_modules=TARGETS))
    assert model.get_rank() == 2


def test_peft_type_survives_json_and_pickle():
    import pickle

    assert pickle.loads(pickle.dumps(PeftType.HETLORA)) is PeftType.HETLORA
    assert json.loads(json.dumps({"t": PeftType.HETLORA})) == {"t": "HETLORA"}


# ----------------------------------------------------------------------------- persistence
def test_adapter_config_json_says_hetlora(tmp_path):
    model = get_peft_model(TwoLinear(), make(r=8, rank=4))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HETLORA"
    assert saved["r"] == 8 and saved["rank"] == 4


def test_config_round_trip(tmp_path):
    config = make(
        r=16,
        rank=6,
        r_min=2,
        lora_alpha=24,
        rank_scaling="rslora",
        prune_gamma=0.8,
        prune_lambda=0.05,
        lora_dropout=0.1,
        base_model_name_or_path="some/folder",
    )
    config.save_pretrained(tmp_path)
    for loader in (HetLoRAConfig.from_pretrained, PeftConfig.from_pretrained):
        loaded = loader(str(tmp_path))
        assert type(loaded) is HetLoRAConfig
        assert loaded.peft_type == PeftType.HETLORA
        for name in (
            "r",
            "rank",
            "r_min",
            "lora_alpha",
            "rank_scaling",
            "prune_gamma",
            "prune_lambda",
            "lora_dropout",
        ):
            assert getattr(loaded, name) == getattr(config, name), name
        assert set(loaded.target_modules) == set(TARGETS)
        assert loaded.scaling == pytest.approx(24 / 4)


def test_config_loaded_from_dict_is_validated():
    good = make(r=8, rank=4).to_dict()
    assert HetLoRAConfig.from_peft_type(**good).rank == 4
    bad = dict(good, rank=12)
    with pytest.raises(ValueError, match="`rank`"):
        HetLoRAConfig.from_peft_type(**bad)
