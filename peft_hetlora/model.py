"""`HetLoRAModel`: injection of HetLoRA layers and the model-level rank operations."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import HetLoRAConfig
from .layer import FROZEN_MODES, FrozenMode, HetLoRALinear
from .quantized_layers import dispatch_quantized
from .utils.errors import RankError
from .utils.ranks import check_rank, is_rank
from .utils.scaling import tail_start

_PEFT_MODEL_PREFIX = "base_model.model."


def _fit_rank(tensor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Truncate or zero-pad `tensor` along `dim` to `rank` entries."""
    current = tensor.shape[dim]
    if current >= rank:
        return tensor.narrow(dim, 0, rank)
    pad_shape = list(tensor.shape)
    pad_shape[dim] = rank - current
    return torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)


class HetLoRAModel(LoraModel):
    """The HetLoRA tuner: LoRA whose clients train a prefix of the rank-r_max factors.

    Created by `peft.get_peft_model` from a `HetLoRAConfig`; the PeftModel wrapping it exposes the
    methods below directly (`peft_model.set_rank(2)`).

    Example:
        ```py
        >>> import peft_hetlora
        >>> from peft import get_peft_model
        >>> config = peft_hetlora.HetLoRAConfig(r=8, rank=4, target_modules=["q_proj"])
        >>> model = get_peft_model(base, config)  # doctest: +SKIP
        >>> ref = model.tail_norm().item()  # doctest: +SKIP
        >>> # ... train one local round ...
        >>> new_rank = model.prune(ref)  # doctest: +SKIP
        ```
    """

    prefix: str = "lora_"
    #: set by `HetLoRACallback` so the regulariser is counted once per optimizer step
    gradient_accumulation_steps: int = 1

    # ----------------------------------------------------------------- injection
    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not supported: LoRA's weighted combination assumes every adapter uses all `r` components."""
        raise NotImplementedError(
            "HetLoRA does not support add_weighted_adapter: LoRA's implementation assumes each adapter holds all r "
            "components with scale lora_alpha / r. Combine HetLoRA adapters with peft_hetlora.federated.aggregate, "
            "or convert them with peft_hetlora.export_lora and combine the plain LoRA adapters."
        )

    def _check_new_adapter_config(self, config: HetLoRAConfig) -> None:
        if not isinstance(config, HetLoRAConfig):
            raise ValueError(f"HetLoRAModel needs a HetLoRAConfig, got {type(config).__name__}.")
        super()._check_new_adapter_config(config)

    @staticmethod
    def _create_new_module(lora_config: HetLoRAConfig, adapter_name: str, target: nn.Module, **kwargs: Any):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        kwargs.pop("parameter_name", None)
        quantized = dispatch_quantized(target, adapter_name, lora_config, **kwargs)
        if quantized is not None:
            return quantized
        for key in ("loaded_in_8bit", "loaded_in_4bit", "get_apply_tensor_subclass"):
            kwargs.pop(key, None)  # a float layer of a quantised model (e.g. one skipped by the quantiser)
        if isinstance(base, nn.Linear):
            lora_config.fan_in_fan_out = False
            return HetLoRALinear(target, adapter_name, config=lora_config, **kwargs)
        if isinstance(base, Conv1D):
            lora_config.fan_in_fan_out = True
            return HetLoRALinear(target, adapter_name, config=lora_config, is_target_conv_1d_layer=True, **kwargs)
        raise ValueError(
            f"HetLoRA cannot adapt {type(base).__name__} modules; target only torch.nn.Linear or transformers "
            "Conv1D layers (e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'), or their bitsandbytes "
            "8-bit / 4-bit and torchao int8 quantised versions."
        )

    # ----------------------------------------------------------------- layers
    def hetlora_layers(self, adapter_name: str | None = None) -> Iterator[tuple[str, HetLoRALinear]]:
        """Yield `(module_name, layer)` for every HetLoRA layer holding `adapter_name`."""
        adapter_name = self._resolve_adapter(adapter_name)
        for name, module in self.model.named_modules():
            if isinstance(module, HetLoRALinear) and adapter_name in module.lora_A:
                yield name, module

    def _resolve_adapter(self, adapter_name: str | None) -> str:
        if adapter_name is None:
            active = self.active_adapters
            if len(active) != 1:
                raise ValueError(f"Several adapters are active ({active}); pass adapter_name explicitly.")
            adapter_name = active[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter named {adapter_name!r}; known adapters: {sorted(self.peft_config)}.")
        return adapter_name

    # ----------------------------------------------------------------- rank API
    def get_rank(self, adapter_name: str | None = None) -> int | dict[str, int]:
        """Active rank of the adapter: an int, or a `{module_name: rank}` map if modules differ."""
        adapter_name = self._resolve_adapter(adapter_name)
        ranks = {name: layer.get_active_rank(adapter_name) for name, layer in self.hetlora_layers(adapter_name)}
        distinct = set(ranks.values())
        return distinct.pop() if len(distinct) == 1 else ranks

    def set_rank(self, rank: int | dict[str, int], adapter_name: str | None = None) -> None:
        """Set the active rank of every module (an int) or of some modules (`{module_name: rank}`).

        Ranks must lie in [1, r]; going below `r_min` is allowed here (it is pruning that respects
        r_min). Shrinking keeps parameters and optimizer state; growing beyond the allocation
        re-allocates the factors (do it between rounds, then build a new optimizer).
        """
        adapter_name = self._resolve_adapter(adapter_name)
        config = self.peft_config[adapter_name]
        layers = dict(self.hetlora_layers(adapter_name))
        if isinstance(rank, dict):
            unknown = sorted(set(rank) - set(layers))
            if unknown:
                raise ValueError(f"Unknown HetLoRA modules {unknown[:3]}; known: {sorted(layers)[:3]} ...")
            targets = rank
        else:
            targets = dict.fromkeys(layers, rank)
        for name, value in targets.items():
            check_rank(value, 1, config.r, what=f"rank for {name}", hi_name="r")
        for name, value in targets.items():
            layers[name].set_active_rank(adapter_name, value)
        self._sync_config(adapter_name)

    def _sync_config(self, adapter_name: str) -> None:
        """Keep `rank` and `components` of the config true to the layers, so save_pretrained describes them."""
        config = self.peft_config[adapter_name]
        current = self.get_rank(adapter_name)
        config.rank = current if isinstance(current, int) else max(current.values())
        windowed = [layer for _, layer in self.hetlora_layers(adapter_name) if layer._components.get(adapter_name)]
        if not windowed:
            config.components = None
            return
        longest = max(windowed, key=lambda layer: layer.get_active_rank(adapter_name))
        config.components = longest.get_components(adapter_name)

    # ----------------------------------------------------------------- window training (docs/design.md#component-rule)
    def set_components(
        self,
        indices: Sequence[int],
        global_state_dict: Mapping[str, torch.Tensor],
        adapter_name: str | None = None,
        frozen: FrozenMode = "factors",
    ) -> list[int]:
        """Train the global components `indices` and keep the global's other components frozen.

        This is window training (docs/design.md#component-rule, Fed-PLoRA arXiv 2602.16936 select-and-fold, FedRolex /
        HeteroFL rotating windows): the k = len(indices) trainable slots of every module take the
        global's components `indices` (in ascending global index: slot i holds `get_components()[i]`),
        and the other components of `global_state_dict` stay in the model, frozen, so the client's
        model is the global model while its trainable parameters and optimizer state stay at rank k:

        * `frozen="factors"`: non-trainable, non-persistent buffers added in forward (never saved,
          never in the optimizer; works on quantised bases);
        * `frozen="merged"`: merged into the base weights (float bases), subtracted by `drop_frozen()`;
        * `frozen="none"`: left out (the model is the window alone).

        `global_state_dict` is the global adapter in PEFT's saved key format (as published, rank
        R <= r_max; components at or above R count as zero). `indices` must be unique integers in
        [0, r_max), at most this client's allocated rank. Trainable parameters are updated in place, so
        an optimizer built on them stays valid (reset its state between rounds). `save_pretrained`
        then writes only the k trained components and `components` in `adapter_config.json`
        (`PeftModel.from_pretrained` or `load_adapter` under a *new* adapter name restores the labels;
        `load_adapter` into an existing name keeps that adapter's own config, as PEFT does).
        With `frozen="merged"`, `disable_adapter()` shows the base plus the frozen components.
        Returns the window in slot order.

        Example:
            ```py
            >>> model = get_peft_model(base, HetLoRAConfig(r=16, rank=4, target_modules=["q_proj"]))  # doctest: +SKIP
            >>> model.set_components([2, 9, 10, 15], global_weights)  # doctest: +SKIP
            [2, 9, 10, 15]
            >>> # ... train; upload get_peft_model_state_dict(model) with model.get_components() ...
            >>> model.drop_frozen()  # doctest: +SKIP
            ```
        """
        adapter_name = self._resolve_adapter(adapter_name)
        config = self.peft_config[adapter_name]
        if frozen not in FROZEN_MODES:
            raise ValueError(f"frozen must be one of {FROZEN_MODES}, got {frozen!r}.")
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Sequence):
            raise RankError(f"components must be a list of integers, got {type(indices).__name__}.")
        bad = [j for j in indices if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < config.r]
        if bad:
            raise RankError(f"components must be integers in [0, r_max={config.r}); got {bad[:5]}.")
        if len(set(indices)) != len(indices):
            raise RankError(f"components must be unique; got {list(indices)}.")
        layers = list(self.hetlora_layers(adapter_name))
        budget = min(layer.r[adapter_name] for _, layer in layers)
        if not 1 <= len(indices) <= budget:
            raise RankError(
                f"A client allocated at rank {budget} trains between 1 and {budget} components; got {len(indices)}. "
                "Ask the coordinator for a smaller window or create the model with a larger HetLoRAConfig(rank=...)."
            )
        factors = {}
        for name, layer in layers:
            key = next((k for k in (f"{_PEFT_MODEL_PREFIX}{name}", name) if f"{k}.lora_A.weight" in global_state_dict),
                       None)
            if key is None or f"{key}.lora_B.weight" not in global_state_dict:
                raise ValueError(
                    f"The global adapter has no factors for {name}; it must hold '<module>.lora_A.weight' and "
                    "'<module>.lora_B.weight' for every HetLoRA module (PEFT's saved key format)."
                )
            a, b = global_state_dict[f"{key}.lora_A.weight"], global_state_dict[f"{key}.lora_B.weight"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise ValueError(
                    f"The global's {name} factors have shapes {tuple(a.shape)} / {tuple(b.shape)}, this model needs "
                    f"(R, {layer.in_features}) / ({layer.out_features}, R): a different base model?"
                )
            if a.shape[0] != b.shape[1] or a.shape[0] > config.r:
                raise ValueError(f"The global's {name} factors have ranks {a.shape[0]} / {b.shape[1]} (r={config.r}).")
            factors[name] = (a, b)
        for name, layer in layers:
            layer.set_window(adapter_name, list(indices), *factors[name], frozen=frozen)
        self._sync_config(adapter_name)
        return self.peft_config[adapter_name].components

    def get_components(self, adapter_name: str | None = None) -> list[int] | dict[str, list[int]]:
        """Global indices of the active slots (slot order): a list, or `{module_name: list}` if modules differ.

        `list(range(k))` for HetLoRA's prefix; the (possibly pruned) window after `set_components`.

        Example:
            ```py
            >>> model.get_components()  # doctest: +SKIP
            [2, 9, 10, 15]
            ```
        """
        adapter_name = self._resolve_adapter(adapter_name)
        found = {name: layer.get_components(adapter_name) for name, layer in self.hetlora_layers(adapter_name)}
        distinct = {tuple(v) for v in found.values()}
        return list(distinct.pop()) if len(distinct) == 1 else found

    def frozen_components(self, adapter_name: str | None = None) -> list[int] | dict[str, list[int]]:
        """Global indices held frozen (as factors or merged), a list or `{module_name: list}` if modules differ."""
        adapter_name = self._resolve_adapter(adapter_name)
        found = {name: layer.frozen_components(adapter_name) for name, layer in self.hetlora_layers(adapter_name)}
        distinct = {tuple(v) for v in found.values()}
        return list(distinct.pop()) if len(distinct) == 1 else found

    def drop_frozen(self, adapter_name: str | None = None) -> None:
        """Forget the frozen components, restoring the base weights if they were merged (end of a round)."""
        adapter_name = self._resolve_adapter(adapter_name)
        for _, layer in self.hetlora_layers(adapter_name):
            layer.drop_frozen(adapter_name)

    def clear_components(self, adapter_name: str | None = None) -> None:
        """Back to HetLoRA's prefix: drop the frozen part; slot i is global component i again."""
        adapter_name = self._resolve_adapter(adapter_name)
        for _, layer in self.hetlora_layers(adapter_name):
            layer.clear_window(adapter_name)
        self._sync_config(adapter_name)

    def set_truncation(self, rank: int | None, adapter_name: str | None = None) -> None:
        """Nested training: forward uses only the first `rank` active components (None: all of them).

        With frozen factors, the frozen components whose global index lies above the first dropped
        one are left out too, so the model is the global truncated there (PreLort arXiv 2606.15963,
        Matryoshka representation learning arXiv 2205.13147). `HetLoRACallback(nested=True)` draws one
        truncation per optimizer step.

        Example:
            ```py
            >>> model.set_truncation(2); loss = model(**batch).loss; model.set_truncation(None)  # doctest: +SKIP
            ```
        """
        adapter_name = self._resolve_adapter(adapter_name)
        for _, layer in self.hetlora_layers(adapter_name):
            layer.set_truncation(adapter_name, rank)

    def union_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter the model computes: trained (active) plus frozen components, in global order.

        PEFT's saved key format; per module the rank is the number of components held. It is what
        `export_lora` writes for a PeftModel holding frozen components (for the *original* base
        model: merged frozen components are in this model's base weights too).
        """
        adapter_name = self._resolve_adapter(adapter_name)
        state = {}
        for name, layer in self.hetlora_layers(adapter_name):
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            k = layer.get_active_rank(adapter_name)
            labels = layer.get_components(adapter_name)
            rows = [(j, a[slot], b[:, slot]) for slot, j in enumerate(labels[:k])]
            if adapter_name in layer.lora_frozen_A:
                a_f, b_f = layer.lora_frozen_A[adapter_name], layer.lora_frozen_B[adapter_name]
                rows += [(j, a_f[i], b_f[:, i]) for i, j in enumerate(layer.frozen_components(adapter_name))]
            rows.sort(key=lambda row: row[0])
            key = f"{_PEFT_MODEL_PREFIX}{name.removeprefix(_PEFT_MODEL_PREFIX)}"
            state[f"{key}.lora_A.weight"] = torch.stack([row[1] for row in rows]).detach().clone()
            state[f"{key}.lora_B.weight"] = torch.stack([row[2] for row in rows], dim=1).detach().clone()
        return state

    def tail_norm(self, adapter_name: str | None = None) -> torch.Tensor:
        """sum_m ||B_m[:, t:k]||_F * ||A_m[t:k, :]||_F (docs/design.md#self-pruning), differentiable, float32
        scalar."""
        adapter_name = self._resolve_adapter(adapter_name)
        gamma = self.peft_config[adapter_name].prune_gamma
        terms = [layer.tail_norm(adapter_name, gamma) for _, layer in self.hetlora_layers(adapter_name)]
        if not terms:
            raise ValueError(f"Adapter {adapter_name!r} has no HetLoRA layers.")
        return torch.stack([term.to(terms[0].device) for term in terms]).sum()

    def prune(self, reference_tail_norm: float | torch.Tensor, adapter_name: str | None = None) -> int:
        """Apply the self-pruning rule: if `tail_norm()` < reference, each module's rank k becomes max(r_min, t).

        Returns the (largest) active rank after the step.
        """
        adapter_name = self._resolve_adapter(adapter_name)
        config = self.peft_config[adapter_name]
        reference = float(reference_tail_norm)
        with torch.no_grad():
            current = float(self.tail_norm(adapter_name))
        if current < reference:
            new_ranks = {}
            for name, layer in self.hetlora_layers(adapter_name):
                k = layer.get_active_rank(adapter_name)
                new_ranks[name] = min(k, max(config.r_min, tail_start(k, config.prune_gamma)))
            self.set_rank(new_ranks, adapter_name)
        rank = self.get_rank(adapter_name)
        return rank if isinstance(rank, int) else max(rank.values())

    # ----------------------------------------------------------------- training
    def regularizer(self, adapter_name: str | None = None) -> torch.Tensor | None:
        """lambda * tail_norm() for the active adapter, or None when lambda is 0."""
        adapter_name = self._resolve_adapter(adapter_name)
        lam = self.peft_config[adapter_name].prune_lambda
        if lam == 0:
            return None
        return lam * self.tail_norm(adapter_name)

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(model, config, adapter_name, **kwargs)
        # PeftModel calls the base model directly (no task_type) while PeftModelForCausalLM goes
        # through this tuner; a hook on the base model sees both routes exactly once.
        self._regularizer_hook = self.model.register_forward_hook(self._add_regularizer, with_kwargs=True)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        # the base model outlives the tuner after unload(): it must not keep calling this regulariser
        self._regularizer_hook.remove()
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any):
        return self.model(*args, **kwargs)

    def _add_regularizer(self, module: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> Any:
        loss = getattr(outputs, "loss", None)
        if not (self.training and isinstance(loss, torch.Tensor)):
            return outputs
        term = self.regularizer()
        if term is None:
            return outputs
        # With `num_items_in_batch` the Trainer does not divide micro-batch losses by the
        # accumulation steps, so do it here to count the term once per optimizer step.
        if kwargs.get("num_items_in_batch") is not None:
            term = term / max(1, int(self.gradient_accumulation_steps))
        outputs.loss = loss + term.to(loss.dtype)
        return outputs

    # ----------------------------------------------------------------- save / load
    @classmethod
    def _layer_lookup(cls, model: nn.Module) -> dict[str, HetLoRALinear]:
        lookup = {}
        for name, module in model.named_modules():
            if isinstance(module, HetLoRALinear):
                lookup[name] = module
                lookup[name.removeprefix(_PEFT_MODEL_PREFIX)] = module
                lookup[_PEFT_MODEL_PREFIX + name] = module
        return lookup

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Only the active components: a rank-k adapter saves what a rank-k LoRA saves."""
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        layers = cls._layer_lookup(model)
        result = {}
        for key, value in to_return.items():
            if ".lora_rank_mask." in key:
                continue
            for part, dim in ((".lora_A.", 0), (".lora_B.", 1)):
                if part in key:
                    layer = layers.get(key.split(part)[0])
                    if layer is not None and adapter_name in layer.lora_A:
                        value = value.narrow(dim, 0, layer.get_active_rank(adapter_name))
            result[key] = value
        return result

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Fit a saved adapter of any rank <= r_max to the allocated factors and set the active rank."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        layers = cls._layer_lookup(model)
        loaded_ranks: list[int] = []
        window = getattr(config, "components", None)
        window = None if window is None else sorted(int(j) for j in window)
        for key in list(remapped):
            if not key.endswith(f".lora_A.{adapter_name}.weight"):
                continue
            module_name = key[: -len(f".lora_A.{adapter_name}.weight")]
            layer = layers.get(module_name)
            b_key = f"{module_name}.lora_B.{adapter_name}.weight"
            if layer is None or adapter_name not in layer.lora_A or b_key not in remapped:
                continue
            saved_rank = remapped[key].shape[0]
            r_max = layer.r_max[adapter_name]
            if not is_rank(saved_rank, 1, r_max) or remapped[b_key].shape[1] != saved_rank:
                raise ValueError(
                    f"Adapter weights for {module_name} have rank {saved_rank} (B has {remapped[b_key].shape[1]} "
                    f"columns) but this model's HetLoRA adapter has r_max={r_max}; load it into a model created "
                    f"with HetLoRAConfig(r>={saved_rank}) or truncate it with peft_hetlora.federated.truncate."
                )
            allocated = layer.r[adapter_name]
            active = min(saved_rank, allocated)
            remapped[key] = _fit_rank(remapped[key], allocated, 0)
            remapped[b_key] = _fit_rank(remapped[b_key], allocated, 1)
            mask = torch.zeros(allocated, dtype=torch.bool)
            mask[:active] = True
            remapped[f"{module_name}.lora_rank_mask.{adapter_name}"] = mask
            if window is not None and len(window) < saved_rank:
                raise ValueError(
                    f"The adapter config lists {len(window)} components but {module_name} holds {saved_rank}; "
                    "the saved `components` must name the global index of every saved slot."
                )
            labels = None if window is None else window[:active]
            if labels is not None and set(labels) & set(layer.frozen_components(adapter_name)):
                layer.drop_frozen(adapter_name)  # the loaded slots replace components held frozen
            layer._components[adapter_name] = labels
            loaded_ranks.append(active)
        # keep `rank` in the config true to the loaded weights, so the next save_pretrained describes them
        if loaded_ranks:
            for target in (config, getattr(model, "peft_config", {}).get(adapter_name)):
                if isinstance(target, HetLoRAConfig):
                    target.rank = max(loaded_ranks)
                    target.components = None if window is None else window[: max(loaded_ranks)]
        return remapped
