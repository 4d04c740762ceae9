"""Window training (docs/design.md#component-rule): a client trains a set I of global components, the rest of the
global frozen.

Every expected value is computed here from the raw global factors with numpy (or with torch autograd
on a hand-written formula), never with peft_hetlora helpers: a wrong slot, a lost frozen component,
a doubled merge or a gradient on a frozen part makes these tests fail.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

from peft_hetlora import HetLoRAConfig, export_lora
from peft_hetlora.utils.errors import HetLoRAError, RankError

try:  # pytest puts tests/ on sys.path when tests/ is not a package ...
    from tiny_models import TwoLinear, one_thread_per_module, randomize_adapter, tiny_gpt2, token_batch  # noqa: F401  (autouse fixture)
except ImportError:  # ... and the repository root when it is
    from tests.tiny_models import TwoLinear, one_thread_per_module, randomize_adapter, tiny_gpt2, token_batch  # noqa: F401  (autouse fixture)


R_MAX, ALPHA = 8, 12
SCALE = ALPHA / R_MAX
TARGETS = ["lin0", "lin1"]
MODULES = ("lin0", "lin1")
X = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
WINDOWS = [[0, 1, 2], [5, 1, 7], [7], [6, 7, 0, 1], list(range(8)), [3]]


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def global_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    """A rank-r_max global adapter with every component non-zero (B random, not LoRA's zero init)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"lin0": (12, 10), "lin1": (10, 6)}
    state = {}
    for name, (d_in, d_out) in shapes.items():
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(R_MAX, d_in, generator=gen) * 0.4
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(d_out, R_MAX, generator=gen) * 0.4
    return state


def client(rank: int = 4, seed: int = 0, **config) -> PeftModel:
    torch.manual_seed(seed)
    model = get_peft_model(
        TwoLinear(), HetLoRAConfig(r=R_MAX, rank=rank, lora_alpha=ALPHA, target_modules=TARGETS, **config)
    )
    randomize_adapter(model, seed=seed + 50)  # whatever the client held before must not leak into the window
    return model


def base_weights(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        name: (np64(getattr(model.base_model.model, name).base_layer.weight),
               np64(getattr(model.base_model.model, name).base_layer.bias))
        for name in MODULES
    }


def hand_forward(base, factors, x: np.ndarray) -> np.ndarray:
    """lin1(tanh(lin0(x))) with delta W_m = s * sum_j B_m[:, j] A_m[j] over the given components."""
    h = x
    for i, name in enumerate(MODULES):
        w, bias = base[name]
        a, b = factors[name]
        h = h @ w.T + bias + SCALE * (h @ a.T) @ b.T
        if i == 0:
            h = np.tanh(h)
    return h


def global_factors(state, components=range(R_MAX)):
    idx = list(components)
    return {
        name: (np64(state[f"base_model.model.{name}.lora_A.weight"])[idx],
               np64(state[f"base_model.model.{name}.lora_B.weight"])[:, idx])
        for name in MODULES
    }


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("frozen", ["factors", "merged"])
@pytest.mark.parametrize("window", WINDOWS)
def test_forward_is_the_whole_global_for_any_window(window, frozen):
    state = global_weights()
    model = client(rank=len(window))
    base = base_weights(model)  # the untouched base, read before any merge
    assert model.set_components(window, state, frozen=frozen) == sorted(window)
    assert model.get_components() == sorted(window)
    assert model.frozen_components() == [j for j in range(R_MAX) if j not in window]
    expected = hand_forward(base, global_factors(state), np64(X))
    np.testing.assert_allclose(np64(model(X)), expected, rtol=1e-5, atol=1e-5)
    # the trainable slots hold exactly the window's global components, in ascending global order
    for name in MODULES:
        layer = getattr(model.base_model.model, name)
        a_g, b_g = global_factors(state, sorted(window))[name]
        np.testing.assert_array_equal(np64(layer.lora_A["default"].weight), a_g)
        np.testing.assert_array_equal(np64(layer.lora_B["default"].weight), b_g)


def test_frozen_none_is_the_window_alone_and_a_shorter_global_pads_with_zeros():
    state = global_weights()
    model = client(rank=3)
    base = base_weights(model)
    model.set_components([1, 4, 6], state, frozen="none")
    np.testing.assert_allclose(np64(model(X)), hand_forward(base, global_factors(state, [1, 4, 6]), np64(X)),
                               rtol=1e-5, atol=1e-5)
    # a global at rank 5: components 5.. are zero; window slot 6 starts like LoRA (B zero) and adds nothing
    short = {k: (v[:5] if k.endswith("lora_A.weight") else v[:, :5]) for k, v in state.items()}
    model.set_components([1, 6], short)
    assert model.frozen_components() == [0, 2, 3, 4]
    np.testing.assert_allclose(np64(model(X)), hand_forward(base, global_factors(state, range(5)), np64(X)),
                               rtol=1e-5, atol=1e-5)
    layer = model.base_model.model.lin0
    assert torch.count_nonzero(layer.lora_B["default"].weight[:, 1]) == 0
    assert torch.count_nonzero(layer.lora_A["default"].weight[1]) > 0


def test_conv1d_merged_equals_frozen_factors():
    torch.manual_seed(0)
    outputs = {}
    ids = token_batch()
    for frozen in ("reference", "factors", "merged"):
        model = get_peft_model(tiny_gpt2(), HetLoRAConfig(r=R_MAX, rank=3 if frozen != "reference" else R_MAX,
                                                          lora_alpha=ALPHA, target_modules=["c_attn", "c_fc"]))
        if frozen == "reference":  # the full global trained as a plain rank-r_max client
            randomize_adapter(model, seed=9)
            state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
        else:
            model.set_components([0, 4, 7], state, frozen=frozen)
        outputs[frozen] = model(ids).logits.detach()
    torch.testing.assert_close(outputs["factors"], outputs["reference"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["merged"], outputs["reference"], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- gradients and training
@pytest.mark.parametrize("frozen", ["factors", "merged"])
def test_gradients_reach_only_the_window_and_match_autograd_of_the_hand_formula(frozen):
    state = global_weights()
    window = [6, 2, 3]
    model = client(rank=3)
    base = {name: tuple(torch.from_numpy(t).float() for t in wb) for name, wb in base_weights(model).items()}
    model.set_components(window, state, frozen=frozen)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(trainable) == sorted(f"base_model.model.{m}.lora_{f}.default.weight" for m in MODULES for f in "AB")
    assert all(min(p.shape) == 3 for p in trainable.values())  # parameters (so optimizer state) stay at k
    assert not any("frozen" in n for n, _ in model.named_parameters())
    model(X).pow(2).sum().backward()
    # hand formula: window components are leaves, the others constants
    order = sorted(window)
    leaves, h = {}, X
    for i, name in enumerate(MODULES):
        a_g, b_g = state[f"base_model.model.{name}.lora_A.weight"], state[f"base_model.model.{name}.lora_B.weight"]
        a_w = a_g[order].clone().requires_grad_(True)
        b_w = b_g[:, order].clone().requires_grad_(True)
        rest = [j for j in range(R_MAX) if j not in window]
        leaves[name] = (a_w, b_w)
        w, bias = base[name]
        h = h @ w.T + bias + SCALE * ((h @ a_w.T) @ b_w.T + (h @ a_g[rest].T) @ b_g[:, rest].T)
        if i == 0:
            h = torch.tanh(h)
    h.pow(2).sum().backward()
    for name in MODULES:
        layer = getattr(model.base_model.model, name)
        torch.testing.assert_close(layer.lora_A["default"].weight.grad, leaves[name][0].grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.lora_B["default"].weight.grad, leaves[name][1].grad, rtol=1e-4, atol=1e-5)
        assert layer.base_layer.weight.grad is None
        if frozen == "factors":
            assert not layer.lora_frozen_A["default"].requires_grad


@pytest.mark.parametrize("frozen", ["factors", "merged"])
def test_steps_move_only_the_window_and_the_model_stays_global_with_it_replaced(frozen):
    state = global_weights()
    window = [0, 5]
    model = client(rank=2)
    base = base_weights(model)
    model.set_components(window, state, frozen=frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 2 * (12 + 10 + 10 + 6)
    for _ in range(3):
        opt.zero_grad()
        model(X).pow(2).mean().backward()
        opt.step()
    trained = {}
    for name in MODULES:
        layer = getattr(model.base_model.model, name)
        a_t, b_t = np64(layer.lora_A["default"].weight), np64(layer.lora_B["default"].weight)
        assert not np.allclose(a_t, global_factors(state, window)[name][0])  # the window moved
        a_full, b_full = (t.copy() for t in global_factors(state)[name])
        a_full[window], b_full[:, window] = a_t, b_t
        trained[name] = (a_full, b_full)
        if frozen == "factors":  # the frozen part is still the global's
            rest = [j for j in range(R_MAX) if j not in window]
            np.testing.assert_array_equal(np64(layer.lora_frozen_A["default"]), global_factors(state, rest)[name][0])
            np.testing.assert_array_equal(np64(layer.lora_frozen_B["default"]), global_factors(state, rest)[name][1])
    np.testing.assert_allclose(np64(model(X)), hand_forward(base, trained, np64(X)), rtol=1e-5, atol=1e-5)
    model.drop_frozen()  # end of the round: the base is the base again
    for name, (w, _bias) in base_weights(model).items():
        np.testing.assert_allclose(w, base[name][0], rtol=0, atol=1e-6)
    assert model.frozen_components() == []
    window_only = {name: (a[window], b[:, window]) for name, (a, b) in trained.items()}
    np.testing.assert_allclose(np64(model(X)), hand_forward(base, window_only, np64(X)), rtol=1e-5, atol=1e-5)


def test_merged_and_factor_variants_train_identically():
    state = global_weights()
    finals = {}
    for frozen in ("factors", "merged"):
        model = client(rank=3)
        model.set_components([1, 3, 7], state, frozen=frozen)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            model(X).pow(2).mean().backward()
            opt.step()
        finals[frozen] = (model(X).detach(), {k: v.clone() for k, v in get_peft_model_state_dict(model).items()})
    torch.testing.assert_close(finals["factors"][0], finals["merged"][0], rtol=1e-5, atol=1e-5)
    for key, value in finals["factors"][1].items():
        torch.testing.assert_close(value, finals["merged"][1][key], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- save / load / prune / export
def test_save_writes_only_the_window_and_load_places_it_back(tmp_path):
    state = global_weights()
    model = client(rank=4)
    model.set_components([7, 2, 4], state)
    model.save_pretrained(str(tmp_path / "a"))
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert not any("frozen" in k or "rank_mask" in k for k in saved)
    for name in MODULES:
        a_g, b_g = global_factors(state, [2, 4, 7])[name]
        np.testing.assert_array_equal(np64(saved[f"base_model.model.{name}.lora_A.weight"]), a_g)
        np.testing.assert_array_equal(np64(saved[f"base_model.model.{name}.lora_B.weight"]), b_g)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["components"] == [2, 4, 7] and config["rank"] == 3
    # a fresh process-like load: the window's slots and labels come back; frozen parts are never saved
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TwoLinear(), str(tmp_path / "a"))
    assert loaded.get_components() == [2, 4, 7] and loaded.frozen_components() == []
    base = base_weights(loaded)
    np.testing.assert_allclose(np64(loaded(X)), hand_forward(base, global_factors(state, [2, 4, 7]), np64(X)),
                               rtol=1e-5, atol=1e-5)
    # into an existing client of a larger budget, then saved again unchanged
    other = client(rank=6, seed=4)
    other.load_adapter(str(tmp_path / "a"), adapter_name="win", is_trainable=True)
    other.set_adapter("win")
    assert other.get_components() == [2, 4, 7] and other.get_rank() == 3
    other.save_pretrained(str(tmp_path / "b"), selected_adapters=["win"])
    assert json.loads((tmp_path / "b" / "win" / "adapter_config.json").read_text())["components"] == [2, 4, 7]
    # back to the prefix: labels reset
    other.clear_components()
    assert other.get_components() == [0, 1, 2] and other.peft_config["win"].components is None


def test_self_pruning_drops_the_tail_of_the_window(tmp_path):
    state = global_weights()
    model = client(rank=4, prune_gamma=0.5, r_min=1)
    model.set_components([6, 1, 3, 5], state)
    reference = float(model.tail_norm()) + 1.0  # pretend the tail shrank during the round
    assert model.prune(reference) == 2
    assert model.get_components() == [1, 3]  # the window's highest components go first
    assert model.frozen_components() == [0, 2, 4, 7]  # frozen components are not touched by pruning
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["components"] == [1, 3]
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved["base_model.model.lin0.lora_A.weight"].shape == (2, 12)
    # the hand tail of the window: slots t..k with t = min(floor(0.5 * 4), 3) = 2 -> components 5 and 6
    expected = sum(np.linalg.norm(b[:, [5, 6]]) * np.linalg.norm(a[[5, 6]]) for a, b in global_factors(state).values())
    fresh = client(rank=4, prune_gamma=0.5)
    fresh.set_components([6, 1, 3, 5], state)
    assert float(fresh.tail_norm()) == pytest.approx(expected, rel=1e-5)


def test_window_cannot_grow_but_can_be_reset():
    model = client(rank=4)
    model.set_components([2, 3], global_weights())
    with pytest.raises(ValueError, match="cannot grow"):
        model.set_rank(3)
    model.set_components([0, 1, 2, 3], global_weights())
    assert model.get_rank() == 4


def test_export_lora_of_a_window_client_is_the_whole_global(tmp_path):
    state = global_weights()
    model = client(rank=3)
    base = base_weights(model)
    model.set_components([1, 2, 6], state)
    export_lora(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == R_MAX
    torch.manual_seed(0)
    plain = PeftModel.from_pretrained(TwoLinear(), str(tmp_path / "lora"))
    np.testing.assert_allclose(np64(plain(X)), hand_forward(base, global_factors(state), np64(X)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("indices", "match"),
    [
        ([1, 1], "unique"),
        ([8], r"\[0, r_max=8\)"),
        ([-1], r"\[0, r_max=8\)"),
        ([True], "integers"),
        ([0, 1, 2, 3, 4], "between 1 and 4"),
        ([], "between 1 and 4"),
        ("01", "list of integers"),
    ],
)
def test_bad_component_sets_are_refused_with_what_to_do(indices, match):
    model = client(rank=4)
    with pytest.raises(RankError, match=match) as info:
        model.set_components(indices, global_weights())
    assert isinstance(info.value, HetLoRAError)


def test_bad_global_and_mode_are_refused():
    model = client(rank=4)
    state = global_weights()
    with pytest.raises(ValueError, match="frozen must be one of"):
        model.set_components([0], state, frozen="folded")
    with pytest.raises(ValueError, match="no factors for lin1"):
        model.set_components([0], {k: v for k, v in state.items() if "lin1" not in k})
    wide = dict(state)
    wide["base_model.model.lin0.lora_A.weight"] = torch.zeros(R_MAX, 13)
    with pytest.raises(ValueError, match="different base model"):
        model.set_components([0], wide)
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        model.set_components([0], state)


def test_peft_merge_and_unmerge_include_the_frozen_factors():
    state = global_weights()
    model = client(rank=2)
    base = base_weights(model)
    model.set_components([3, 4], state)
    expected = hand_forward(base, global_factors(state), np64(X))
    merged = model.merge_and_unload()
    np.testing.assert_allclose(np64(merged(X)), expected, rtol=1e-5, atol=1e-5)
