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

import torch
from safetensors.torch import save_file

from ..utils.errors import StoreFullError
from .protocol import ADAPTER_FILE, CONFIG_FILE, ROUND_FILE, plan_round
from .stores import json_text, remove_abandoned, temp_prefix

logger = logging.getLogger(__name__)

__all__ = ["GLOBAL_TEMP_KIND", "GlobalPublisher"]

GLOBAL_TEMP_KIND = "hetlora-global-"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _write_json(path: Path, data: Mapping) -> None:
    path.write_text(json_text(data, indent=2, sort_keys=True) + "\n")


class GlobalPublisher:
    """Mixin of `Coordinator`: writes and publishes globals with their plan, repairs an interrupted publish.

    Expects ``self.store``, ``self.federation``, ``self.clock``, ``self._resumed`` and the settings properties.
    """

    def _publish(self, round_idx: int, state_dict: Mapping[str, torch.Tensor], client_ranks: Mapping[str, int]) -> str:
        """Write global `round_idx` (adapter at r_max + adapter_config.json + round.json) to the store."""
        with self._global_folder(round_idx, state_dict, client_ranks) as folder:
            return self._publish_folder(round_idx, folder)

    def _publish_folder(self, round_idx: int, folder: Path) -> str:
        info = _read_json(folder / ROUND_FILE)
        revision = self.store.publish_global(round_idx, folder)
        logger.info("Published global %d (revision %s); participants: %s", round_idx, revision,
                    ", ".join(f"{c}@r{info['ranks'][c]}" for c in info["participants"]))
        return revision

    @contextlib.contextmanager
    def _global_folder(
        self, round_idx: int, state_dict: Mapping[str, torch.Tensor], client_ranks: Mapping[str, int]
    ) -> Iterator[Path]:
        """A temporary folder holding global `round_idx` as it will be published (removed afterwards).

        Its name carries this process's id, so a restart after a kill removes it (`temp_files`).
        """
        plan = plan_round(round_idx, self.clients, client_ranks, clients_per_round=self.clients_per_round,
                          seed=self.seed, sampling_rate=self.dp.sampling_rate if self.dp is not None else None,
                          opened_at=self.clock(), final=round_idx >= self.rounds,
                          component_selection=self.component_selection, anchor=self.anchor, r_max=self.r_max)
        round_info = plan.to_json(self.round_settings(), deadline_s=self._setting("deadline_s"))
        with tempfile.TemporaryDirectory(prefix=temp_prefix(GLOBAL_TEMP_KIND, f"r{round_idx}")) as tmp:
            folder = Path(tmp)
            try:
                tensors = {k: state_dict[k].detach().to("cpu", torch.float32).contiguous() for k in sorted(state_dict)}
                save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
                _write_json(folder / CONFIG_FILE, self.federation["adapter_config"])
                _write_json(folder / ROUND_FILE, round_info)
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

    def _resume(self) -> None:
        """Once per coordinator: remove what killed writers left, and finish an interrupted publish.

        A kill (or a full disk) between writing `rounds/<T>/global/` and refreshing the store's root leaves the
        root at an older round; publishing the latest round again is idempotent and refreshes it.
        """
        if self._resumed:
            return
        cleaner = getattr(self.store, "clean_temporary_files", None)
        removed = list(cleaner()) if callable(cleaner) else []
        removed += remove_abandoned(tempfile.gettempdir(), (GLOBAL_TEMP_KIND,))
        if removed:
            logger.info("Removed %d temporary file(s) left by killed writers.", len(removed))
        latest = self.store.latest_global()
        if latest is not None:
            self.store.publish_global(latest.round, latest.path)
        self._resumed = True

