"""Publishing global adapters to a store, the coordinator's way: a temporary folder, then one publish.

A global t is written as it will be published (adapter at r_max in float32, ``adapter_config.json``, ``round.json``
with round t's plan) into a temporary folder whose name carries this process's id, so a restart after a kill removes
it (`temp_files`); a full disk is a `StoreFullError` that says how to resume. On start, the latest global is
published again (idempotent), which repairs a root left stale by a kill between ``rounds/T/global/`` and the root.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ...utils.constants import ADAPTER_FILE, CONFIG_FILE, ROUND_FILE, SERVER_STATE_FILE
from ...utils.errors import StoreFullError
from ..stores import json_text, remove_abandoned, temp_prefix

logger = logging.getLogger(__name__)

__all__ = ["GLOBAL_TEMP_KIND", "GlobalPublisher", "read_json"]

GLOBAL_TEMP_KIND = "hetlora-global-"


def read_json(path: Path) -> dict:
    """A JSON file the coordinator wrote or a saved adapter's config (trusted: not a client's upload).

    Example:
        ```py
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.json"; _ = p.write_text('{"r": 8}')
        >>> read_json(p)
        {'r': 8}
        ```
    """
    return json.loads(path.read_text())


def _write_json(path: Path, data: Mapping) -> None:
    path.write_text(json_text(data, indent=2, sort_keys=True) + "\n")


class GlobalPublisher:
    """Writes and publishes globals with their plan to one store, and repairs an interrupted publish; the
    `Coordinator` holds one (``coordinator.publisher``).

    Example:
        ```py
        >>> GlobalPublisher(store=None).resumed
        False
        ```
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self.resumed = False

    def publish(self, round_idx: int, state_dict: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any],
                round_info: Mapping[str, Any]) -> str:
        """Write global `round_idx` (adapter at r_max + adapter_config.json + round.json) to the store."""
        with self.global_folder(round_idx, state_dict, adapter_config, round_info) as folder:
            return self.publish_folder(round_idx, folder)

    def publish_folder(self, round_idx: int, folder: Path) -> str:
        """Publish a folder written by `global_folder` (or a staged copy of one) as global `round_idx`."""
        info = read_json(folder / ROUND_FILE)
        revision = self.store.publish_global(round_idx, folder)
        logger.info("Published global %d (revision %s); participants: %s", round_idx, revision,
                    ", ".join(f"{c}@r{info['ranks'][c]}" for c in info["participants"]))
        return revision

    @contextlib.contextmanager
    def global_folder(self, round_idx: int, state_dict: Mapping[str, torch.Tensor],
                      adapter_config: Mapping[str, Any], round_info: Mapping[str, Any],
                      server_state: Mapping[str, torch.Tensor] | None = None) -> Iterator[Path]:
        """A temporary folder holding global `round_idx` as it will be published (removed afterwards).

        Its name carries this process's id, so a restart after a kill removes it (`temp_files`). ``server_state``
        (the server step's momentum / moments / residual) goes beside the adapter as `SERVER_STATE_FILE`,
        so it is published (and staged) in the same atomic step as the global it belongs to.
        """
        with tempfile.TemporaryDirectory(prefix=temp_prefix(GLOBAL_TEMP_KIND, f"r{round_idx}")) as tmp:
            folder = Path(tmp)
            try:
                tensors = {k: state_dict[k].detach().to("cpu", torch.float32).contiguous() for k in sorted(state_dict)}
                save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
                _write_json(folder / CONFIG_FILE, adapter_config)
                _write_json(folder / ROUND_FILE, round_info)
                if server_state is not None:
                    state = {k: server_state[k].detach().to("cpu").contiguous() for k in sorted(server_state)}
                    save_file(state, str(folder / SERVER_STATE_FILE), metadata={"format": "pt"})
            except OSError as e:
                if e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                    raise
                err = StoreFullError(
                    f"The temporary folder {tempfile.gettempdir()} is full while writing global {round_idx}: free "
                    "some space (or point TMPDIR at a larger disk) and run the same command again to resume."
                )
                err.errno = errno.ENOSPC
                raise err from e
            yield folder

    def resume(self) -> None:
        """Once per publisher: remove what killed writers left, and finish an interrupted publish.

        A kill (or a full disk) between writing `rounds/<T>/global/` and refreshing the store's root leaves the
        root at an older round; publishing the latest round again is idempotent and refreshes it.
        """
        if self.resumed:
            return
        cleaner = getattr(self.store, "clean_temporary_files", None)
        removed = list(cleaner()) if callable(cleaner) else []
        removed += remove_abandoned(tempfile.gettempdir(), (GLOBAL_TEMP_KIND,))
        if removed:
            logger.info("Removed %d temporary file(s) left by killed writers.", len(removed))
        latest = self.store.latest_global()
        if latest is not None:
            self.store.publish_global(latest.round, latest.path)
        self.resumed = True
