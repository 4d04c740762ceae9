"""HetLoRA layers: LoRA factors allocated at the client's rank, used through a prefix rank mask.

The active components are always a prefix of the trainable *slots* (the first k rows of A, the first
k columns of B), so the mask and slicing coincide: forward and backward compute with `A[:k]`,
`B[:, :k]` only and a rank-k client pays what a rank-k LoRA pays whatever r_max is.

Window training (docs/design.md#component-rule): by default slot i holds global component i (HetLoRA's prefix). After
`set_window` the slots hold an arbitrary set I of global components (ascending global index), and
the global's other components can be kept *frozen*, so the client's model is the global model:

* ``"factors"``: non-trainable, non-persistent buffers A_f (r_f x d_in), B_f (d_out x r_f) added in
  forward as s * B_f (A_f x) (never saved, never seen by an optimizer);
* ``"merged"``: W <- W + s * B_f A_f in the base weight, subtracted again by `drop_frozen`;
* ``"none"``: the frozen components are left out (the client's model is the window alone).

Nested training (PreLort, arXiv 2606.15963; Matryoshka representation learning, arXiv 2205.13147):
`set_truncation(k')` makes forward use only the first k' slots and, with frozen factors, only the
frozen components whose global index is below the first dropped slot's, i.e. the global truncated
at that index.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.other import transpose
from torch import nn

from .utils.ranks import MAX_RANK, check_rank
from .utils.scaling import scaling_for, tail_start

FROZEN_MODES = ("factors", "merged", "none")
FrozenMode = Literal["factors", "merged", "none"]


def _sync_active_rank_from_mask(module: HetLoRALinear, incompatible_keys: Any) -> None:
    """Load-state-dict post hook: the mask is the persistent record of the active rank."""
    for adapter_name, mask in module.lora_rank_mask.items():
        module._active_rank[adapter_name] = int(mask.sum().item())
        labels = module._components.get(adapter_name)
        if labels is not None:
            module._components[adapter_name] = labels[: module._active_rank[adapter_name]]


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

    other_param_names = LoraLinear.other_param_names + (
        "r_max",
        "lora_rank_mask",
        "_active_rank",
        "lora_frozen_A",
        "lora_frozen_B",
        "_components",
        "_frozen_index",
        "_frozen_merged",
        "_truncation",
    )
    #: whether frozen components can be merged into this layer's base weight (not for quantised bases)
    supports_frozen_merge: bool = True

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: Any, **kwargs: Any) -> None:
        if "lora_rank_mask" not in self._buffers and not hasattr(self, "lora_rank_mask"):
            self.lora_rank_mask = BufferDict({}, persistent=True)
            self.r_max: dict[str, int] = {}
            self._active_rank: dict[str, int] = {}
            # window training: global index of each slot (None = the prefix), frozen rest of the global
            self._components: dict[str, list[int] | None] = {}
            self.lora_frozen_A = BufferDict({}, persistent=False)
            self.lora_frozen_B = BufferDict({}, persistent=False)
            self._frozen_index: dict[str, list[int]] = {}
            self._frozen_merged: dict[str, bool] = {}
            self._truncation: dict[str, int | None] = {}
            # children (the mask's BufferDict) load after `_load_from_state_dict`: re-derive the rank once all loaded
            self.register_load_state_dict_post_hook(_sync_active_rank_from_mask)
        r_max = int(r)
        rank = int(getattr(config, "rank", None) or r_max)
        check_rank(rank, 1, r_max, what="HetLoRA rank", hi_name="r (r_max)")
        super().update_layer(adapter_name, rank, lora_alpha=lora_alpha, config=config, **kwargs)
        self.r_max[adapter_name] = r_max
        self.scaling[adapter_name] = scaling_for(lora_alpha, r_max, getattr(config, "rank_scaling", "fixed"))
        device = self.lora_A[adapter_name].weight.device
        if device.type == "meta":  # low_cpu_mem_usage: PEFT moves non-meta "lora_" modules, so the mask needs data
            device = self.get_base_layer().weight.device
        self.lora_rank_mask[adapter_name] = torch.ones(rank, dtype=torch.bool, device=device)
        self._active_rank[adapter_name] = rank
        components = getattr(config, "components", None)
        self._components[adapter_name] = None if components is None else sorted(int(j) for j in components)[:rank]
        self._frozen_index[adapter_name] = []
        self._frozen_merged[adapter_name] = False
        self._truncation[adapter_name] = None

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
        check_rank(rank, 1, r_max, what="rank", hi_name="r_max")
        if adapter_name in self.merged_adapters and rank != self._active_rank[adapter_name]:
            # unmerge subtracts the delta of the *current* rank: changing it while merged corrupts the base weight
            raise ValueError(
                f"Adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() before changing "
                "its rank, then merge again."
            )
        labels = self._components.get(adapter_name)
        if labels is not None and rank > len(labels):
            raise ValueError(
                f"This layer trains the window {labels} of the global adapter; it cannot grow to rank {rank}. "
                "Call set_components() with a larger window instead."
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
        if labels is not None:
            self._components[adapter_name] = labels[:rank]

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
        """`(A[:k], B[:, :k])` for the active rank k (or the nested truncation k' < k), as views with gradient."""
        k = self._active_rank[adapter_name]
        truncation = self._truncation.get(adapter_name)
        if truncation is not None:
            k = min(k, truncation)
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

    # ----------------------------------------------------------------- window training (docs/design.md#component-rule)
    def get_components(self, adapter_name: str) -> list[int]:
        """Global index of each active slot (ascending): the window, or `range(k)` for HetLoRA's prefix."""
        labels = self._components.get(adapter_name)
        k = self._active_rank[adapter_name]
        return list(range(k)) if labels is None else list(labels[:k])

    def frozen_components(self, adapter_name: str) -> list[int]:
        """Global indices held frozen (as factors or merged into the base weight), ascending."""
        return list(self._frozen_index.get(adapter_name, []))

    def frozen_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(A_f, B_f)` the forward adds as s * B_f A_f x, or None (none held, or merged into the base).

        Under a nested truncation k' < k only the frozen components below the first dropped slot's
        global index are kept, so the model is the global truncated at that index.
        """
        if adapter_name not in self.lora_frozen_A or self._frozen_merged.get(adapter_name):
            return None
        a_f, b_f = self.lora_frozen_A[adapter_name], self.lora_frozen_B[adapter_name]
        truncation = self._truncation.get(adapter_name)
        k = self._active_rank[adapter_name]
        if truncation is not None and truncation < k:
            cut = self.get_components(adapter_name)[truncation]
            keep = bisect_left(self._frozen_index[adapter_name], cut)
            if keep == 0:
                return None
            a_f, b_f = a_f[:keep], b_f[:, :keep]
        return a_f, b_f

    def set_window(
        self,
        adapter_name: str,
        components: Sequence[int],
        global_a: torch.Tensor,
        global_b: torch.Tensor,
        frozen: FrozenMode = "factors",
    ) -> None:
        """Train the global components `components` in the slots and keep the global's other ones frozen.

        `global_a` (R x d_in) and `global_b` (d_out x R) are this module's global factors (R <= r_max;
        components at or above R count as zero: a window slot there starts like LoRA, A random, B zero).
        Indices must be unique, in [0, r_max) and no more than the allocated rank; slots follow
        ascending global index. Any earlier frozen part is dropped (un-merged) first.
        """
        if frozen not in FROZEN_MODES:
            raise ValueError(f"frozen must be one of {FROZEN_MODES}, got {frozen!r}.")
        if adapter_name in self.merged_adapters:
            raise ValueError(
                f"Adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() before changing "
                "its components."
            )
        if frozen == "merged" and not self.supports_frozen_merge:
            raise ValueError(
                f"{type(self).__name__} has a quantised base: merging the frozen components would re-quantise it "
                "(lossy, and not undone exactly at the end of the round). Use frozen='factors'."
            )
        r_max = self.r_max[adapter_name]
        window = sorted(int(j) for j in components)
        rank = len(window)
        global_rank = global_a.shape[0]
        check_rank(global_rank, 0, r_max, what="rank of the global factors", hi_name="r_max")
        if global_b.shape[1] != global_rank:
            raise ValueError(f"global factors of rank {global_rank} / {global_b.shape[1]} do not fit r_max={r_max}.")
        self.drop_frozen(adapter_name)
        self._truncation[adapter_name] = None
        self._components[adapter_name] = None
        self.set_active_rank(adapter_name, rank)
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        known = [slot for slot, j in enumerate(window) if j < global_rank]
        with torch.no_grad():
            for start in range(rank):  # slots beyond the global's rank: LoRA's init (A random, B zero)
                if window[start] >= global_rank:
                    self._reset_components(adapter_name, start, start + 1)
            if known:
                rows = torch.tensor([window[slot] for slot in known], device=global_a.device)
                slots = torch.tensor(known, device=a.device)
                a[slots] = global_a.index_select(0, rows).to(a.device, a.dtype)
                b[:, slots] = global_b.index_select(1, rows.to(global_b.device)).to(b.device, b.dtype)
        self._components[adapter_name] = window
        if frozen == "none":
            return
        chosen = set(window)
        rest = [j for j in range(global_rank) if j not in chosen]
        if not rest:
            return
        index = torch.tensor(rest, device=global_a.device)
        a_f = global_a.index_select(0, index).to(a.device, a.dtype).contiguous()
        b_f = global_b.index_select(1, index.to(global_b.device)).to(b.device, b.dtype).contiguous()
        self.lora_frozen_A[adapter_name] = a_f
        self.lora_frozen_B[adapter_name] = b_f
        self._frozen_index[adapter_name] = rest
        if frozen == "merged":
            self._add_frozen_to_base(adapter_name, sign=1.0)
            self._frozen_merged[adapter_name] = True

    def _add_frozen_to_base(self, adapter_name: str, sign: float) -> None:
        a_f, b_f = self.lora_frozen_A[adapter_name], self.lora_frozen_B[adapter_name]
        weight = self.get_base_layer().weight
        with torch.no_grad():
            delta = transpose(b_f.float() @ a_f.float(), self.fan_in_fan_out) * (sign * self.scaling[adapter_name])
            weight.data = (weight.data.float() + delta.to(weight.device)).to(weight.dtype)

    def drop_frozen(self, adapter_name: str) -> None:
        """Forget the frozen components (subtracting them from the base weight when merged); slots stay."""
        if adapter_name not in self.lora_frozen_A:
            return
        if self._frozen_merged.get(adapter_name):
            self._add_frozen_to_base(adapter_name, sign=-1.0)
        del self.lora_frozen_A[adapter_name]
        del self.lora_frozen_B[adapter_name]
        self._frozen_index[adapter_name] = []
        self._frozen_merged[adapter_name] = False

    def clear_window(self, adapter_name: str) -> None:
        """Back to HetLoRA's prefix: drop the frozen part and label slot i as global component i."""
        self.drop_frozen(adapter_name)
        self._components[adapter_name] = None
        self._truncation[adapter_name] = None

    def set_truncation(self, adapter_name: str, rank: int | None) -> None:
        """Nested training: use only the first `rank` active slots (None: all) until changed."""
        if rank is not None:
            check_rank(rank, 1, MAX_RANK, what="truncation (a positive integer, or None)")
        if rank is not None and self._frozen_merged.get(adapter_name):
            raise ValueError("Nested truncation needs the frozen components as factors (frozen='factors').")
        self._truncation[adapter_name] = rank

    # ----------------------------------------------------------------- compute
    def _lora_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b = self.active_factors(adapter_name)
        x = self.lora_dropout[adapter_name](self._cast_input_dtype(x, a.dtype))
        frozen = self.frozen_factors(adapter_name)
        if frozen is not None:
            # one pass over x for trained and frozen components (cheaper than two thin matmuls); gradient
            # flows to the trained slices only, the frozen buffers need none
            a, b = torch.cat([a, frozen[0]], dim=0), torch.cat([b, frozen[1]], dim=1)
        return F.linear(F.linear(x, a), b) * self.scaling[adapter_name]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a, b = self.active_factors(adapter)
        frozen = self.frozen_factors(adapter)
        if frozen is not None:
            a, b = torch.cat([a, frozen[0]], dim=0), torch.cat([b, frozen[1]], dim=1)
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
