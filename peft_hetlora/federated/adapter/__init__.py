"""PEFT's saved adapter key format and component index sets: the layer everyone shares, client side included.

`keys` reads and reshapes adapter state dicts (module names, ranks, truncate, pad, gather, norms); `components`
checks which components of the global adapter a client trained (docs/design.md#component-rule). Nothing here knows
about rounds, stores or aggregation methods.

Example:
    >>> import torch
    >>> from peft_hetlora.federated.adapter import module_ranks, pad, truncate
    >>> sd = {"m.lora_A.weight": torch.ones(4, 3), "m.lora_B.weight": torch.ones(2, 4)}
    >>> module_ranks(truncate(sd, 2)), module_ranks(pad(sd, 8))
    ({'m': 2}, {'m': 8})
"""

from .components import check_components, coverage_counts, is_int, is_prefix, unique_indices
from .keys import (
    FACTOR_SUFFIXES,
    flat_a,
    flat_b,
    gather_components,
    is_real,
    lora_module_names,
    module_rank,
    module_ranks,
    module_sq_norm,
    pad,
    pad_factors,
    split_lora_keys,
    truncate,
    update_norm,
)

__all__ = [
    "FACTOR_SUFFIXES",
    "check_components",
    "coverage_counts",
    "flat_a",
    "flat_b",
    "gather_components",
    "is_int",
    "is_prefix",
    "is_real",
    "lora_module_names",
    "module_rank",
    "module_ranks",
    "module_sq_norm",
    "pad",
    "pad_factors",
    "split_lora_keys",
    "truncate",
    "unique_indices",
    "update_norm",
]
