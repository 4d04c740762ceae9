"""A HetLoRA model in *core mode*: every module trains only a square core inside the global's subspace.

`start_core` turns each HetLoRA layer of a PEFT model into ``delta W = s U_c C V_c^T`` (`core.core_bases`):
``lora_A`` holds ``V_c^T`` frozen, ``lora_B.weight`` becomes a torch parametrisation ``U_c @ C`` whose only
trainable tensor is the ``r_c x r_c`` core ``C`` (starting at ``diag(S_c) / s``). The parametrised parameter is the
*same* ``Parameter`` object the layer had, so an optimizer built before the round (the Trainer builds it before its
callbacks' ``on_train_begin``) trains the core. While in core mode ``state_dict`` / ``save_pretrained`` write the
ordinary held factors ``lora_B = U_c C`` (rank ``r_c``) and loading them back recovers ``C = U_c^T B``, so a
checkpoint is a normal HetLoRA adapter and a resumed round continues from it. `core_state_dict` gives the upload
(``<module>.lora_core.weight``); `stop_core` leaves the held factors as plain trainable factors.

Example:
    ```py
    >>> bases = start_core(peft_model, global_weights, r_c=8)  # doctest: +SKIP
    >>> trainer.train()  # only the cores move  # doctest: +SKIP
    >>> upload = core_state_dict(peft_model)  # {"...q_proj.lora_core.weight": (8, 8), ...}  # doctest: +SKIP
    >>> stop_core(peft_model)  # doctest: +SKIP
    ```
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .core import CORE_SUFFIX, CoreBases, core_bases, core_seed

__all__ = ["CoreParametrization", "core_state_dict", "in_core_mode", "start_core", "stop_core"]

_PEFT_PREFIX = "base_model.model."


class CoreParametrization(nn.Module):
    """``lora_B.weight = [U_c C | 0]`` (``d_out x allocated``) from the trainable core ``C`` (``r_c x r_c``).

    ``basis`` is a non-persistent buffer (rebuilt from the global, never saved); `right_inverse` maps a weight back to
    its core, ``C = U_c^T W[:, :r_c]``.

    Example:
        >>> import torch
        >>> p = CoreParametrization(torch.eye(4, 2), allocated=3)
        >>> p(torch.ones(2, 2)).shape, p.right_inverse(torch.ones(4, 3)).shape
        (torch.Size([4, 3]), torch.Size([2, 2]))
    """

    def __init__(self, basis: torch.Tensor, allocated: int) -> None:
        super().__init__()
        self.register_buffer("basis", basis, persistent=False)
        self.allocated = int(allocated)

    def forward(self, core: torch.Tensor) -> torch.Tensor:
        b = self.basis @ core
        extra = self.allocated - b.shape[1]
        return torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1) if extra > 0 else b

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        r_c = self.basis.shape[1]
        return self.basis.T @ weight[:, :r_c]


def _tuner(model: Any) -> Any:
    seen = model
    for _ in range(6):  # PeftModel -> tuner; DDP / accelerate / torch.compile / activation-cache wrappers
        if hasattr(seen, "hetlora_layers"):
            return seen
        seen = (getattr(seen, "base_model", None) or getattr(seen, "module", None)
                or getattr(seen, "_orig_mod", None))
        if seen is None:
            break
    raise TypeError(f"core mode needs a HetLoRA PEFT model, got {type(model).__name__}.")


def _module_key(name: str, weights: Mapping[str, torch.Tensor]) -> str:
    for key in (f"{_PEFT_PREFIX}{name}", name):
        if f"{key}.lora_A.weight" in weights:
            return key
    raise KeyError(f"the global adapter has no factors for module {name!r}")


def _save_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """While in core mode, `state_dict` holds the held factor ``lora_B.weight = U_c C`` instead of the core."""
    for key in [k for k in state_dict if k.startswith(prefix + "parametrizations.")]:
        del state_dict[key]
    if parametrize.is_parametrized(module, "weight"):
        state_dict[prefix + "weight"] = module.weight.detach()


def _load_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Loading a held factor ``lora_B.weight`` into core mode sets the core ``C = U_c^T B``."""
    key = prefix + "weight"
    if key in state_dict and parametrize.is_parametrized(module, "weight"):
        param = module.parametrizations.weight[0]
        weight = state_dict.pop(key).to(param.basis.device, param.basis.dtype)
        state_dict[prefix + "parametrizations.weight.original"] = param.right_inverse(weight)


def in_core_mode(model: Any, adapter_name: str | None = None) -> bool:
    """Whether `start_core` is in effect on the model's HetLoRA layers.

    Example:
        >>> in_core_mode(peft_model)  # doctest: +SKIP
        False
    """
    tuner = _tuner(model)
    adapter = adapter_name or tuner.active_adapters[0]
    return any(parametrize.is_parametrized(layer.lora_B[adapter], "weight")
               for _, layer in tuner.hetlora_layers(adapter))


def start_core(model: Any, global_weights: Mapping[str, torch.Tensor], r_c: int,
               adapter_name: str | None = None) -> dict[str, CoreBases]:
    """Put every HetLoRA layer in core mode at rank `r_c` inside the global `global_weights` (saved key format).

    The model's output is then the global truncated to ``r_c`` (each module's top ``r_c`` singular directions);
    only the cores are trainable. Windows and frozen components are cleared first. Returns ``{module key: bases}``
    (module keys as in the global, e.g. ``base_model.model.model.layers.0.self_attn.q_proj``).

    Example:
        >>> bases = start_core(peft_model, load_file("rounds/3/global/adapter_model.safetensors"), 8)  # doctest: +SKIP
    """
    tuner = _tuner(model)
    adapter = adapter_name or tuner.active_adapters[0]
    if in_core_mode(tuner, adapter):
        stop_core(tuner, adapter)
    tuner.clear_components(adapter)
    layers = list(tuner.hetlora_layers(adapter))
    old = {name: (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight) for name, layer in layers}
    tuner.set_rank(r_c, adapter)
    out: dict[str, CoreBases] = {}
    for name, layer in layers:
        key = _module_key(name, global_weights)
        a_g, b_g = global_weights[f"{key}.lora_A.weight"], global_weights[f"{key}.lora_B.weight"]
        bases = core_bases(a_g, b_g, r_c, seed=core_seed(key, a_g, b_g), scaling=float(layer.scaling[adapter]))
        out[key] = bases
        lin_a, lin_b = layer.lora_A[adapter], layer.lora_B[adapter]
        old_a, old_b = old[name]
        # keep the Parameter objects the optimizer holds (growing the rank re-allocated the layers)
        for linear, param in ((lin_a, old_a), (lin_b, old_b)):
            if linear.weight is not param:
                param.data = linear.weight.data
                linear.weight = param
        dtype, device = lin_a.weight.dtype, lin_a.weight.device
        with torch.no_grad():
            lin_a.weight.zero_()
            lin_a.weight[:r_c] = bases.v.T.to(device, dtype)
        lin_a.weight.requires_grad_(False)
        allocated = lin_b.weight.shape[1]
        basis = bases.u.to(device, dtype)
        parametrize.register_parametrization(lin_b, "weight", CoreParametrization(basis, allocated), unsafe=True)
        with torch.no_grad():
            lin_b.parametrizations.weight.original.copy_(bases.initial_core().to(device, dtype))
        lin_b.parametrizations.weight.original.requires_grad_(True)
        lin_b._core_hooks = (lin_b._register_state_dict_hook(_save_hook),
                             lin_b._register_load_state_dict_pre_hook(_load_hook, with_module=True))
    return out


def core_state_dict(model: Any, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The upload of a core client: ``{<module key>.lora_core.weight: C}`` (float32, CPU), keys in PEFT's saved format.

    Example:
        >>> sorted(core_state_dict(peft_model))[:1]  # doctest: +SKIP
        ['base_model.model.model.layers.0.self_attn.q_proj.lora_core.weight']
    """
    tuner = _tuner(model)
    adapter = adapter_name or tuner.active_adapters[0]
    out = {}
    for name, layer in tuner.hetlora_layers(adapter):
        lin_b = layer.lora_B[adapter]
        if not parametrize.is_parametrized(lin_b, "weight"):
            raise ValueError(f"module {name} is not in core mode; call start_core first.")
        core = lin_b.parametrizations.weight.original
        out[f"{_PEFT_PREFIX}{name}{CORE_SUFFIX}"] = core.detach().to("cpu", torch.float32).contiguous()
    return out


def stop_core(model: Any, adapter_name: str | None = None) -> None:
    """Leave core mode: ``lora_B`` keeps the held factor ``U_c C`` as a plain trainable parameter, ``lora_A``
    (``V_c^T``) is trainable again; the model's output does not change.

    Example:
        >>> stop_core(peft_model)  # doctest: +SKIP
    """
    tuner = _tuner(model)
    adapter = adapter_name or tuner.active_adapters[0]
    for _, layer in tuner.hetlora_layers(adapter):
        lin_b = layer.lora_B[adapter]
        if not parametrize.is_parametrized(lin_b, "weight"):
            continue
        for hook in getattr(lin_b, "_core_hooks", ()):
            hook.remove()
        lin_b._core_hooks = ()
        parametrize.remove_parametrizations(lin_b, "weight", leave_parametrized=True)
        lin_b.weight.requires_grad_(True)
        layer.lora_A[adapter].weight.requires_grad_(True)
