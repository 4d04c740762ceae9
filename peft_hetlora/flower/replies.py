"""Flower replies -> validated `ClientUpdate`s, with the coordinator's upload checks; the global's upload spec."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from flwr.app import RecordDict

import peft_hetlora.flower.records as rec
from peft_hetlora.federated.adapter import module_ranks
from peft_hetlora.federated.aggregation import ClientUpdate, get_aggregation
from peft_hetlora.federated.upload import RejectedUpload, UploadSpec, validate_update


class ReplyValidator:
    """The coordinator's upload checks on Flower replies, in memory (`HetLoRAStrategy` holds one, ``replies``).

    Owns ``spec`` (what an upload must look like: built from the first global) and validates each reply with
    `upload.validate_update`; a homogeneous method (its ``homogeneous`` capability) requires the assigned rank.

    Example:
        ```py
        >>> import torch
        >>> replies = ReplyValidator(method="hetlora", r_min=1, r_max=2, max_examples=10, message_formats=None)
        >>> g = replies.checked_global({"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.zeros(4, 2)})
        >>> replies.spec.modules
        {'m': (3, 4)}
        ```
    """

    def __init__(self, *, method: str, r_min: int, r_max: int, max_examples: int,
                 message_formats: Sequence[str] | None) -> None:
        self.method = method
        self.r_min = r_min
        self.r_max = r_max
        self.max_examples = max_examples
        self.message_formats = message_formats
        self.spec: UploadSpec | None = None

    def checked_global(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` as the global (float32 on the CPU); the first global fixes ``spec`` and must be at r_max."""
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        if self.spec is None:
            self.spec = UploadSpec.from_state_dict(state, r_min=self.r_min, r_max=self.r_max,
                                                   max_examples=self.max_examples,
                                                   message_formats=self.message_formats)
            ranks = set(module_ranks(state).values())
            if ranks != {self.r_max}:
                raise ValueError(f"The initial global adapter has rank(s) {sorted(ranks)} but r_max is {self.r_max}: "
                                 "pass it at full rank (HetLoRAConfig(r=r_max, rank=r_max)).")
        return state

    def validate(self, t: int, cid: str, rank: int, content: RecordDict, *, arrays_key: str,
                 revision: str | None, assigned_components: Sequence[int] | None = None) -> ClientUpdate:
        """The coordinator's upload checks on an in-memory reply (`upload.validate_update`: no file written)."""
        if arrays_key not in content or rec.METRICS_KEY not in content:
            raise RejectedUpload(f"reply lacks its {arrays_key!r} ArrayRecord or {rec.METRICS_KEY!r} "
                                 "MetricRecord")
        metrics = content[rec.METRICS_KEY]
        declared = content[rec.MESSAGE_KEY].get(rec.MESSAGE_FORMAT) if rec.MESSAGE_KEY in content else None
        try:
            if declared is None:
                state = rec.arrays_to_state_dict(content[arrays_key])
            else:
                state = rec.arrays_to_message(content[arrays_key], str(declared))
        except Exception as err:  # noqa: BLE001 - undecodable arrays are a rejection, never a crash
            raise RejectedUpload(f"arrays could not be decoded: {err}") from None
        meta = {
            "client_id": cid,
            "round": t,
            "rank_in": metrics.get(rec.RANK_IN),
            "rank_out": metrics.get(rec.RANK_OUT),
            "num_examples": metrics.get(rec.NUM_EXAMPLES),
            "train_loss": metrics.get(rec.TRAIN_LOSS),
            "tail_norm_start": metrics.get(rec.TAIL_NORM_START),
            "tail_norm_end": metrics.get(rec.TAIL_NORM_END),
            "global_revision": revision,
            "local_seconds": metrics.get("seconds"),
        }
        if declared is not None:
            meta["message_format"] = declared
        if metrics.get(rec.COMPONENTS) is not None:
            meta["components"] = list(metrics[rec.COMPONENTS])
        return validate_update(
            state, meta, self.spec, client_id=cid, round_idx=t, assigned_rank=rank,
            required_rank=rank if get_aggregation(self.method).homogeneous else None,
            assigned_components=assigned_components,
        )
