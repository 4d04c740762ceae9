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
from .core import (
    CORE_SUFFIX,
    CoreBases,
    core_bases,
    core_budget,
    core_rank,
    core_seed,
    expand_core,
    held_factors,
)
from .core_model import CoreParametrization, core_state_dict, in_core_mode, start_core, stop_core
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
    "CORE_SUFFIX",
    "FACTOR_SUFFIXES",
    "CoreBases",
    "CoreParametrization",
    "check_components",
    "core_bases",
    "core_budget",
    "core_rank",
    "core_seed",
    "core_state_dict",
    "coverage_counts",
    "expand_core",
    "flat_a",
    "flat_b",
    "gather_components",
    "held_factors",
    "in_core_mode",
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
    "start_core",
    "stop_core",
    "truncate",
    "unique_indices",
    "update_norm",
]
