"""Several federated rounds from one Trainer script."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .client_view import client_get_global, client_latest_global
from .federated_client import FederatedClientCallback
from .processes import agree, is_main_process

logger = logging.getLogger(__name__)


def run_client_rounds(
    trainer: Any,
    client: FederatedClientCallback,
    *,
    max_rounds: int,
    poll_interval: float = 5.0,
    timeout: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    resume: bool = False,
) -> list[int]:
    """Run up to `max_rounds` local rounds: wait for each new global, train if selected, upload.

    Each round re-enters `trainer.train()` (fresh optimizer moments and LR schedule, as in FL
    practice). Rounds this client already uploaded (say, before a crash) are not redone. With
    `resume=True` a round with a checkpoint of its own in `trainer.args.output_dir` (a client killed
    mid-round) continues from it (`client.resumable_checkpoint`); checkpoints of earlier rounds are
    passed over. Under `torchrun` / `accelerate launch` every process runs this loop and follows the main
    process's view of the store. Returns the rounds this client trained.

    Example:
        ```py
        >>> client = FederatedClientCallback(LocalStore("runs/fed"), "alice")  # doctest: +SKIP
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[client])  # doctest: +SKIP
        >>> run_client_rounds(trainer, client, max_rounds=10)  # doctest: +SKIP
        [0, 1, 3, 6]
        ```
    """
    if client not in trainer.callback_handler.callbacks:
        raise ValueError("Add the FederatedClientCallback to the trainer (callbacks=[client]) before running rounds.")
    trained: list[int] = []
    seen: set[int] = set()
    deadline = None if timeout is None else clock() + timeout
    main = is_main_process()
    while len(seen) < max_rounds:
        # a multi-process client's processes take every decision from the main process's view (in lockstep)
        latest = client_latest_global(client.store) if main else None
        round_idx, expired = agree(
            (None if latest is None else latest.round, deadline is not None and clock() > deadline) if main else None
        )
        if round_idx is None or round_idx in seen:
            if expired:
                logger.warning("No new global adapter within %.0f s; stopping after rounds %s.", timeout, trained)
                break
            sleep(poll_interval)
            continue
        seen.add(round_idx)
        latest = client_get_global(client.store, round_idx)
        info = client._read_round_info(latest)
        if client.federation_finished(latest.round, info):
            logger.info(
                "Global %d is the federation's final adapter; client %s is done.", latest.round, client.client_id
            )
            break
        if not client.is_participant(info):
            logger.info("Client %s not selected in round %d.", client.client_id, latest.round)
            continue
        if agree(client.already_uploaded(latest.round) if main else None):
            logger.info("Client %s already uploaded round %d.", client.client_id, latest.round)
            continue
        checkpoint = agree(client.resumable_checkpoint(trainer.args.output_dir) if resume and main else None)
        if checkpoint is not None:
            logger.info("Client %s resumes round %d from %s.", client.client_id, latest.round, checkpoint)
        trainer.train(resume_from_checkpoint=checkpoint)
        trained.append(latest.round)
        if deadline is not None:
            deadline = clock() + timeout
    return trained
