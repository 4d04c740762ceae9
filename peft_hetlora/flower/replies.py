"""Flower replies -> validated `ClientUpdate`s, with the coordinator's upload checks; the global's upload spec."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from flwr.app import RecordDict

from peft_hetlora.federated.adapter import module_ranks
from peft_hetlora.federated.aggregation import ClientUpdate
from peft_hetlora.federated.upload import RejectedUpload, UploadSpec, validate_update

from . import records as rec


class ReplyValidation:
    """Mixin of `HetLoRAStrategy`: ``spec`` (what an upload must look like) and the per-reply validation."""

    def _set_global(self, state: Mapping[str, torch.Tensor]) -> None:
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        if self.spec is None:
            self.spec = UploadSpec.from_state_dict(state, r_min=self.r_min, r_max=self.r_max,
                                                   max_examples=self.max_examples,
                                                   message_formats=getattr(self, "message_formats", None))
            ranks = set(module_ranks(state).values())
            if ranks != {self.r_max}:
                raise ValueError(f"The initial global adapter has rank(s) {sorted(ranks)} but r_max is {self.r_max}: "
                                 "pass it at full rank (HetLoRAConfig(r=r_max, rank=r_max)).")
        self.global_state = state

    def _validate_reply(self, t: int, cid: str, rank: int, content: RecordDict,
                        assigned_components: Sequence[int] | None = None) -> ClientUpdate:
        """The coordinator's upload checks on an in-memory reply (`validation.validate_update`: no file written)."""
        if self.arrayrecord_key not in content or rec.METRICS_KEY not in content:
            raise RejectedUpload(f"reply lacks its {self.arrayrecord_key!r} ArrayRecord or {rec.METRICS_KEY!r} "
                                 "MetricRecord")
        metrics = content[rec.METRICS_KEY]
        declared = content[rec.MESSAGE_KEY].get(rec.MESSAGE_FORMAT) if rec.MESSAGE_KEY in content else None
        try:
            if declared is None:
                state = rec.arrays_to_state_dict(content[self.arrayrecord_key])
            else:
                state = rec.arrays_to_message(content[self.arrayrecord_key], str(declared))
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
            "global_revision": self._revisions.get(t),
            "local_seconds": metrics.get("seconds"),
        }
        if declared is not None:
            meta["message_format"] = declared
        if metrics.get(rec.COMPONENTS) is not None:
            meta["components"] = list(metrics[rec.COMPONENTS])
        return validate_update(
            state, meta, self.spec, client_id=cid, round_idx=t, assigned_rank=rank,
            required_rank=rank if self.method == "fedavg" else None, assigned_components=assigned_components,
        )
