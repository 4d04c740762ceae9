"""Register HETLORA with PEFT the moment PEFT is imported, without importing PEFT (or torch) ourselves.

`import peft_hetlora` must make `PeftModel.from_pretrained` / `AutoPeftModelForCausalLM` understand
HETLORA adapters, yet `hetlora --help` and `import peft_hetlora.federated` must stay free of PEFT,
transformers and torch (they take seconds to import). So the package installs a tiny import hook:
when `peft` (or a `peft_hetlora` submodule that pulls it in) finishes loading, the HETLORA type is
registered; if PEFT is already loaded, registration happens at once.

Example:
    ```py
    >>> import peft_hetlora          # cheap: PEFT is not imported yet
    >>> from peft import PeftType    # importing PEFT registers HETLORA
    >>> "HETLORA" in PeftType.__members__
    True
    ```
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

_PACKAGE = "peft_hetlora."
_state = {"registered": False, "busy": False}


def _loading(name: str, finished: str | None) -> bool:
    """Whether module `name` is in sys.modules with its body still running (`finished` counts as done)."""
    module = sys.modules.get(name)
    if name == finished or module is None:
        return False
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def try_register(finished: str | None = None) -> bool:
    """Register HETLORA with PEFT if PEFT is loaded and no `peft_hetlora` module is mid-import.

    `finished` names a module whose body has just run (its import is still formally in progress).
    Returns whether HETLORA is registered.
    """
    if _state["registered"] or _state["busy"]:
        return _state["registered"]
    if sys.modules.get("peft") is None or _loading("peft", finished):
        return False
    if any(name.startswith(_PACKAGE) and _loading(name, finished) for name in list(sys.modules)):
        return False  # the outermost peft_hetlora module registers when it finishes
    _state["busy"] = True
    try:
        from .registration import register

        register()
        _state["registered"] = True
    finally:
        _state["busy"] = False
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _RegisterAfterImport)]
    return True


class _RegisterAfterLoad:
    """Loader proxy: runs the real loader, puts it back on the module, then tries to register."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        try_register(finished=module.__name__)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Meta-path finder that wraps the loaders of `peft` and `peft_hetlora.*` (nothing else)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if _state["registered"] or (fullname != "peft" and not fullname.startswith(_PACKAGE)):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterLoad(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now if PEFT is loaded, else register as soon as it is (idempotent)."""
    if try_register():
        return
    if not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
