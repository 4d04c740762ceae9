"""peft-hetlora: heterogeneous-rank LoRA (HetLoRA) for federated fine-tuning, as a native PEFT method.

Importing the package registers the `HETLORA` PEFT type, so `peft.get_peft_model`,
`PeftModel.from_pretrained` and `AutoPeftModelForCausalLM` work with `HetLoRAConfig` adapters.
The import itself is light: the PEFT-facing names load on first use, and the registration runs as
soon as `peft` is (or gets) imported. So `import peft_hetlora.federated` (the framework-free core)
imports neither peft, transformers nor flwr.

Example:
    ```py
    >>> import peft_hetlora
    >>> from peft import get_peft_model
    >>> config = peft_hetlora.HetLoRAConfig(r=16, rank=4, target_modules=["q_proj", "v_proj"])
    >>> model = get_peft_model(base_model, config)  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import HetLoRAConfig
    from .export import export_lora
    from .layer import HetLoRALinear
    from .model import HetLoRAModel
    from .registration import HETLORA_PEFT_TYPE

__version__ = "0.1.0"

__all__ = ["HETLORA_PEFT_TYPE", "HetLoRAConfig", "HetLoRALinear", "HetLoRAModel", "__version__", "export_lora"]

_LAZY = {
    "HETLORA_PEFT_TYPE": ".registration",
    "HetLoRAConfig": ".config",
    "HetLoRALinear": ".layer",
    "HetLoRAModel": ".model",
    "export_lora": ".export",
    "register": ".registration",
}
# When one of these finishes importing, registration is tried (it needs peft plus this package's config and model;
# while one of them is half-imported the attempt waits for the next trigger).
_TRIGGERS = frozenset(
    {"peft", *(f"{__name__}.{sub}" for sub in ("config", "layer", "model", "export", "registration"))}
)


def _ensure_registered() -> bool:
    """Register HETLORA with PEFT; False while a needed module is still half-imported (a later trigger retries)."""
    try:
        from . import config, model  # noqa: F401
        from .registration import register
        if not (hasattr(config, "HetLoRAConfig") and hasattr(model, "HetLoRAModel")):
            return False
        register()
    except ImportError as err:
        if "partially initialized" in str(err) or "cannot import name" in str(err):
            return False
        raise
    _RegisterAfterImport.uninstall()
    return True


class _LoaderAfter(importlib.abc.Loader):
    """Runs the wrapped loader, then tries the registration (other attributes go to the wrapped loader)."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):  # noqa: ANN001, D102
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001, D102
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        try:
            _ensure_registered()
        except Exception as err:  # noqa: BLE001 - never break the user's `import peft`
            warnings.warn(f"peft_hetlora could not register the HETLORA PEFT type: {err}", stacklevel=2)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """A post-import hook: when peft (or this package's config / model) finishes importing, register HETLORA."""

    _busy = False

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, D102
        if fullname not in _TRIGGERS or type(self)._busy:
            return None
        type(self)._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            type(self)._busy = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _LoaderAfter(spec.loader)
        return spec

    @classmethod
    def install(cls) -> None:
        if not any(isinstance(finder, cls) for finder in sys.meta_path):
            sys.meta_path.insert(0, cls())

    @classmethod
    def uninstall(cls) -> None:
        sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, cls)]


if "peft" in sys.modules:
    _ensure_registered()
else:
    _RegisterAfterImport.install()


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    _ensure_registered()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
