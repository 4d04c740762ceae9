"""HetLoRA layers: LoRA factors allocated at the client's rank, used through a prefix rank mask.

The active components are always a prefix (the first k rows of A, the first k columns of B), so the
mask and slicing coincide: forward and backward compute with `A[:k]`, `B[:, :k]` only and a rank-k
client pays what a rank-k LoRA pays whatever r_max is.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.other import transpose
from torch import nn

from .config import scaling_for, tail_start


def _sync_active_rank_from_mask(module: HetLoRALinear, incompatible_keys: Any) -> None:
    """Load-state-dict post hook: the mask is the persistent record of the active rank."""
    for adapter_name, mask in module.lora_rank_mask.items():
        module._active_rank[adapter_name] = int(mask.sum().item())


class HetLoRALinear(LoraLinear):
    """A LoRA `Linear` (also for transformers `Conv1D`) with HetLoRA's rank state.

    Per adapter it keeps `r_max` (the federation's rank, which fixes the scale), `r` (the allocated
    rank) and a persistent boolean prefix mask `lora_rank_mask` whose length is the allocated rank and
    whose number of `True` entries is the active rank.

    Example:
        ```py
        >>> layer = model.base_model.model.model.layers[0].self_attn.q_proj  # doctest: +SKIP
        >>> layer.set_active_rank("default", 2); layer.get_active_rank("default")  # doctest: +SKIP
        2
        ```
    """

    other_param_names = LoraLinear.other_param_names + ("r_max", "lora_rank_mask", "_active_rank")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: Any, **kwargs: Any) -> None:
        if "lora_rank_mask" not in self._buffers and not hasattr(self, "lora_rank_mask"):
            self.lora_rank_mask = BufferDict({}, persistent=True)
            self.r_max: dict[str, int] = {}
            self._active_rank: dict[str, int] = {}
            # children (the mask's BufferDict) load after `_load_from_state_dict`: re-derive the rank once all loaded
            self.register_load_state_dict_post_hook(_sync_active_rank_from_mask)
        r_max = int(r)
        rank = int(getattr(config, "rank", None) or r_max)
        if rank > r_max:
            raise ValueError(f"HetLoRA rank {rank} exceeds r={r_max} (r_max); use a rank between 1 and {r_max}.")
        super().update_layer(adapter_name, rank, lora_alpha=lora_alpha, config=config, **kwargs)
        self.r_max[adapter_name] = r_max
        self.scaling[adapter_name] = scaling_for(lora_alpha, r_max, getattr(config, "rank_scaling", "fixed"))
        device = self.lora_A[adapter_name].weight.device
        if device.type == "meta":  # low_cpu_mem_usage: PEFT moves non-meta "lora_" modules, so the mask needs data
            device = self.get_base_layer().weight.device
        self.lora_rank_mask[adapter_name] = torch.ones(rank, dtype=torch.bool, device=device)
        self._active_rank[adapter_name] = rank

    # ----------------------------------------------------------------- rank state
    def get_active_rank(self, adapter_name: str) -> int:
        """Number of active (leading) components of `adapter_name`."""
        return self._active_rank[adapter_name]

    def set_active_rank(self, adapter_name: str, rank: int) -> None:
        """Make the first `rank` components active, growing the allocation if `rank` exceeds it.

        Shrinking only moves the mask (parameters and optimizer state stay as they are). Growing
        re-allocates the factors at `rank`: kept components are copied, new ones start like LoRA's
        (A random, B zero) so the adapter's output does not change.
        """
        r_max = self.r_max[adapter_name]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r_max:
            raise ValueError(f"rank must be an integer between 1 and r_max={r_max}, got {rank!r}.")
        if adapter_name in self.merged_adapters and rank != self._active_rank[adapter_name]:
            # unmerge subtracts the delta of the *current* rank: changing it while merged corrupts the base weight
            raise ValueError(
                f"Adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() before changing "
                "its rank, then merge again."
            )
        allocated = self.r[adapter_name]
        if rank > allocated:
            self._grow(adapter_name, rank)
        active = self._active_rank[adapter_name]
        if rank > active:
            self._reset_components(adapter_name, active, rank)
        mask = self.lora_rank_mask[adapter_name]
        mask.zero_()
        mask[:rank] = True
        self._active_rank[adapter_name] = rank

    def _grow(self, adapter_name: str, rank: int) -> None:
        old_a, old_b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        allocated = old_a.shape[0]
        new_a = nn.Linear(self.in_features, rank, bias=False, device=old_a.device, dtype=old_a.dtype)
        new_b = nn.Linear(rank, self.out_features, bias=False, device=old_b.device, dtype=old_b.dtype)
        with torch.no_grad():
            new_a.weight[:allocated] = old_a
            new_b.weight.zero_()
            new_b.weight[:, :allocated] = old_b
        new_a.weight.requires_grad_(old_a.requires_grad)
        new_b.weight.requires_grad_(old_b.requires_grad)
        self.lora_A[adapter_name] = new_a
        self.lora_B[adapter_name] = new_b
        self.r[adapter_name] = rank
        self.lora_rank_mask[adapter_name] = torch.zeros(rank, dtype=torch.bool, device=old_a.device)
        self.lora_rank_mask[adapter_name][: self._active_rank[adapter_name]] = True

    def _reset_components(self, adapter_name: str, start: int, stop: int) -> None:
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            fresh = torch.empty(stop - start, a.shape[1], device=a.device, dtype=a.dtype)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
            a[start:stop] = fresh
            b[:, start:stop] = 0

    def active_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`(A[:k], B[:, :k])` for the active rank k, as views that carry gradient."""
        k = self._active_rank[adapter_name]
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if k == a.shape[0]:
            return a, b
        return a[:k], b[:, :k]

    def tail_norm(self, adapter_name: str, gamma: float) -> torch.Tensor:
        """||B[:, t:k]||_F * ||A[t:k, :]||_F with t = tail_start(k, gamma), differentiable, in float32."""
        k = self._active_rank[adapter_name]
        t = tail_start(k, gamma)
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        return torch.linalg.vector_norm(b[:, t:k].float()) * torch.linalg.vector_norm(a[t:k].float())

    # ----------------------------------------------------------------- compute
    def _lora_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b = self.active_factors(adapter_name)
        x = self._cast_input_dtype(x, a.dtype)
        return F.linear(F.linear(self.lora_dropout[adapter_name](x), a), b) * self.scaling[adapter_name]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a, b = self.active_factors(adapter)
        cast_to_fp32 = a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16)
        if cast_to_fp32:
            a, b = a.float(), b.float()
        delta = transpose(b @ a, self.fan_in_fan_out) * self.scaling[adapter]
        return delta.to(self.lora_B[adapter].weight.dtype) if cast_to_fp32 else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        for active_adapter in self.active_adapters:
            if active_adapter in self.lora_A:
                result = result + self._lora_delta(x, active_adapter)
        return result.to(result_dtype)

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for adapter in set(adapter_names):
            if adapter == "__base__" or adapter not in self.lora_A:
                continue
            rows = [i for i, name in enumerate(adapter_names) if name == adapter]
            result[rows] += self._lora_delta(x[rows], adapter).to(result_dtype)
        return result

    def __repr__(self) -> str:
        return "hetlora." + super().__repr__().removeprefix("lora.")
