"""The base model as a checked fact: which weights a federation's adapters were trained against.

HetLoRA's factors (Cho et al., arXiv 2401.06432) are corrections to one base model's weights; averaged
over clients that loaded different bases (say the Hub's bf16 SmolLM2 and the de-quantised Q4_1 GGUF of
`smollm2-135m`), they mean nothing. So `hetlora init` records the base's identity in `federation.json`
(`base_model_identity`) and a client is refused before its first step when its base differs
(`check_base_model`, called by `get_federated_model`).

What is hashed (`weights_sha256`, format 1): the weights that the adapter corrects, i.e. the `weight` of
every module the adapter config targets (`target_modules`, `layers_to_transform`, `exclude_modules`;
biases, norms and embeddings are not hashed), in the order of their module names (sorted), each fed to
SHA-256 as `"<name>:<shape>:<dtype>\\n"` followed by its raw little-endian bytes in that dtype. The record
holds one hash per half/full precision (`float32`, `bfloat16`, `float16`: the weights cast with
`Tensor.to`), so a client that loads the same checkpoint in bf16 or fp16 matches exactly. On
SmolLM2-135M's q_proj and v_proj of all 30 layers (13.3 M weights, a busy 2-core CPU), the record (three
hashes) takes 1 to 2.5 s and a client's check (one hash) about 0.1 s. A client whose base is
quantised on load (bitsandbytes 4/8-bit) cannot be compared bit for bit: the check is skipped with one
notice. A `federation.json` written before the record existed is not checked (one notice).

Example:
    ```py
    >>> import torch
    >>> from peft_hetlora import HetLoRAConfig
    >>> base = torch.nn.Sequential()
    >>> base.add_module("q_proj", torch.nn.Linear(2, 2, bias=False))
    >>> _ = torch.nn.init.ones_(base.q_proj.weight)
    >>> record = base_identity(base, HetLoRAConfig(r=2, target_modules=["q_proj"]), name="ones")
    >>> import hashlib, struct  # the layout, by hand: name, shape, dtype, then the raw bytes
    >>> hand = hashlib.sha256(b"q_proj:[2, 2]:float32\\n" + struct.pack("<4f", 1, 1, 1, 1)).hexdigest()
    >>> record["modules"], record["weights_sha256"]["float32"] == hand
    (1, True)
    >>> check_base_model(base, HetLoRAConfig(r=2, target_modules=["q_proj"]), record)  # same base: no error
    ```
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .utils.errors import ConfigMismatchError, FederationMismatch

__all__ = [
    "BASE_IDENTITY_FIELD",
    "BaseModelMismatchError",
    "base_identity",
    "check_base_model",
    "federation_base_identity",
    "record_base_identity",
    "targeted_weights",
    "weights_sha256",
]

logger = logging.getLogger(__name__)

#: the key of federation.json that holds the record
BASE_IDENTITY_FIELD = "base_model_identity"
_FORMAT = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BaseModelMismatchError(ConfigMismatchError):
    """A client's base model is not the one its federation was created from (another checkpoint or dtype)."""


_NOTICES_GIVEN: dict[str, bool] = {}
"""The one-time notices already logged in this process (a notice repeated per client says nothing new)."""

def _targets(config: Any, name: str, module: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists

    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not name:
        return False
    if config.target_modules == "all-linear":  # PEFT's shorthand: every linear layer but the output head
        return "lm_head" not in name.split(".") and type(module).__name__ in ("Linear", "Conv1D", "Linear4bit",
                                                                              "Linear8bitLt")
    return bool(check_target_module_exists(config, name))


def targeted_weights(base_model: torch.nn.Module, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """`(module name, weight)` of every module of `base_model` that `config` adapts, sorted by name.

    `base_model` is the plain model (before `get_peft_model`); a PeftModel is accepted too (its
    adapted layers' base weights are used, under the plain model's names).

    Example:
        ```py
        >>> import torch
        >>> from peft_hetlora import HetLoRAConfig
        >>> base = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(2, 3), "k_proj": torch.nn.Linear(2, 3)})
        >>> [name for name, _ in targeted_weights(base, HetLoRAConfig(r=2, target_modules=["q_proj"]))]
        ['q_proj']
        ```
    """
    model = base_model.get_base_model() if hasattr(base_model, "get_base_model") else base_model
    found: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_base_layer") and hasattr(module, "lora_A"):  # an adapted layer: its base's weight
            found[name] = module.get_base_layer().weight
        elif name.rsplit(".", 1)[-1] != "base_layer" and _targets(config, name, module):
            found.setdefault(name, module.weight)
    return iter(sorted(found.items()))


def weights_sha256(named_weights: Any, dtype: torch.dtype) -> str:
    """SHA-256 of `(name, weight)` pairs, each cast to `dtype` (see the module docstring for the byte layout).

    Example:
        ```py
        >>> import torch
        >>> import hashlib
        >>> weights_sha256([("q", torch.zeros(1, 1))], torch.bfloat16) == hashlib.sha256(
        ...     b"q:[1, 1]:bfloat16\\n" + bytes(2)).hexdigest()
        True
        ```
    """
    digest = hashlib.sha256()
    for name, weight in named_weights:
        tensor = weight.detach().to("cpu", dtype).contiguous()
        digest.update(f"{name}:{list(tensor.shape)}:{str(dtype).removeprefix('torch.')}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_identity(base_model: torch.nn.Module, config: Any, *, name: str | None,
                  revision: str | None = None) -> dict[str, Any]:
    """The `base_model_identity` record of `base_model` for an adapter built from `config`.

    Example:
        ```py
        >>> import torch
        >>> from peft_hetlora import HetLoRAConfig
        >>> base = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(2, 3)})
        >>> sorted(base_identity(base, HetLoRAConfig(r=2, target_modules=["q_proj"]), name="toy"))
        ['format', 'hashed', 'modules', 'name', 'revision', 'weights_sha256']
        ```
    """
    weights = list(targeted_weights(base_model, config))
    if not weights:
        raise ValueError("The adapter config targets no module of this base model (check target_modules).")
    if any(not w.is_floating_point() or w.device.type == "meta" for _, w in weights):
        raise ValueError("The base model's targeted weights are quantised or not loaded (meta device): load it in "
                         "float32, bfloat16 or float16 to create a federation.")
    return {
        "format": _FORMAT,
        "name": name,
        "revision": revision,
        "hashed": "weight of each targeted module, sorted by name, cast to the dtype (peft_hetlora.base_identity)",
        "modules": len(weights),
        "weights_sha256": {label: weights_sha256(weights, dtype) for label, dtype in _DTYPES.items()},
    }


def federation_base_identity(source: Any) -> Mapping[str, Any] | None:
    """The `base_model_identity` of a store's federation.json (or a folder holding one), or None.

    Example:
        ```py
        >>> federation_base_identity({"r_max": 8}) is None  # a federation.json from before the record
        True
        ```
    """
    if isinstance(source, Mapping):
        federation = source
    elif hasattr(source, "read_federation"):
        federation = source.read_federation() or {}
    else:
        import json
        from pathlib import Path

        path = Path(source) / "federation.json"
        federation = json.loads(path.read_text()) if path.is_file() else {}
    record = federation.get(BASE_IDENTITY_FIELD) if isinstance(federation, Mapping) else None
    return record if isinstance(record, Mapping) else None


def record_base_identity(store: Any, identity: Mapping[str, Any], *, write: bool = True) -> None:
    """Refuse a store whose federation.json records another base; with `write`, add `identity` where none is.

    What a coordinator started with a base model does (`hetlora init`, and the simulator's coordinators,
    `hetlora_bench.arm_setup.record_arm_base`): the record is written once, beside the settings, and a
    store created from other weights is refused with `FederationMismatch` before anything is published.
    A store without `federation.json` yet is left alone (`write` then has nothing to add to).

    Example:
        ```py
        >>> import tempfile, torch
        >>> from peft_hetlora import HetLoRAConfig
        >>> from peft_hetlora.federated import LocalStore
        >>> store = LocalStore(tempfile.mkdtemp(), create=True)
        >>> store.write_federation({"r_max": 2})
        >>> base = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(2, 2)})
        >>> record = base_identity(base, HetLoRAConfig(r=2, target_modules=["q_proj"]), name="toy")
        >>> record_base_identity(store, record)
        >>> federation_base_identity(store) == record
        True
        ```
    """
    federation = store.read_federation()
    stored = federation_base_identity(federation or {})
    if stored is not None and stored.get("weights_sha256") != identity["weights_sha256"]:
        raise FederationMismatch(
            f"The store's federation was created from another base model ({stored.get('name')!r}, weights "
            f"{str((stored.get('weights_sha256') or {}).get('float32'))[:16]}) than this one "
            f"({identity.get('name')!r}, weights {identity['weights_sha256']['float32'][:16]}): use the same base "
            "model, or start the new federation in another store."
        )
    if write and federation is not None and stored is None:
        store.write_federation({**federation, BASE_IDENTITY_FIELD: dict(identity)})


def check_base_model(base_model: torch.nn.Module, config: Any, record: Mapping[str, Any] | None) -> None:
    """Raise `BaseModelMismatchError` unless `base_model`'s targeted weights hash to the federation's record.

    `record` is federation.json's `base_model_identity` (None: a federation from before the record; one
    notice, no check). A base quantised on load cannot be compared bit for bit (one notice, no check).

    Example:
        ```py
        >>> import torch
        >>> from peft_hetlora import HetLoRAConfig
        >>> config = HetLoRAConfig(r=2, target_modules=["q_proj"])
        >>> torch.manual_seed(0) and None
        >>> mine, theirs = (torch.nn.ModuleDict({"q_proj": torch.nn.Linear(2, 2)}) for _ in range(2))
        >>> check_base_model(mine, config, base_identity(theirs, config, name="theirs"))
        Traceback (most recent call last):
        ...
        peft_hetlora.base_identity.BaseModelMismatchError: This client's base model is not the federation's: ...
        ```
    """
    if record is None:
        if not _NOTICES_GIVEN.get("no_record"):  # once per process: a simulator builds many clients of one federation
            _NOTICES_GIVEN["no_record"] = True
            logger.warning("This federation records no base model identity (created before it existed, or by a "
                           "coordinator given no base model): the client's base model is not checked.")
        return
    if not isinstance(record, Mapping) or not isinstance(record.get("weights_sha256"), Mapping):
        raise BaseModelMismatchError(
            f"The federation's {BASE_IDENTITY_FIELD} is malformed ({type(record).__name__} without a "
            "weights_sha256 table), so this client cannot check its base model: the operator should recreate "
            "it with `hetlora init` (or remove the field to skip the check)."
        )
    weights = list(targeted_weights(base_model, config))
    quantised = [w for _, w in weights if not w.is_floating_point() or w.device.type == "meta"]
    if quantised:
        logger.warning("The base model is quantised on load (or offloaded), so its weights cannot be compared with "
                       "the federation's hash; make sure it was loaded from %s.", record.get("name"))
        return
    dtypes = {w.dtype for _, w in weights}
    label = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    hashes = record["weights_sha256"]
    expected = hashes.get(label)
    if expected is None:
        label, expected = "float32", hashes.get("float32")
    mine = weights_sha256(weights, _DTYPES.get(label, torch.float32))
    if len(weights) != record.get("modules") or mine != expected:
        raise BaseModelMismatchError(
            f"This client's base model is not the federation's: its {len(weights)} adapted weights hash to "
            f"{mine[:16]} ({label}) but the federation was created from {record.get('name')!r} "
            f"({record.get('modules')} weights, {str(expected)[:16]}). Factors trained on another base mean "
            "something else to the server: load the base model the federation names (the same folder or "
            "`resolve_model` spec given to `hetlora init`), in float32, bfloat16 or float16."
        )
