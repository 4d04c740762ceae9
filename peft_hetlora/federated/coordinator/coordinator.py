"""The federation's round state machine: publish a global adapter, collect client uploads, validate, aggregate.

All state lives in the store (`AdapterStore`), so a coordinator killed at any point resumes from it:

* `federation.json` holds the federation's identity (method, r_max, r_min, base model, adapter shapes,
  clients, initial ranks, round policy);
* global t published (with `round.json`: participants and their ranks) means round t is open;
* `rounds/t/summary.json` is the decision record of round t (accepted ids, rejected {id: reason},
  weights, per-client ranks, metrics); the aggregate is staged in the store first (`stage_global`), the
  summary names its sha256, and only then is global t+1 published. A summary without global t+1 is
  finished by publishing the staged global it names, never by re-reading uploads (a store without
  staging re-aggregates exactly the summary's accepted uploads, their sha256 checked), so no upload is
  lost or counted twice;
* on start, the latest global is published again (idempotent), which repairs a root left stale by a
  kill between `rounds/T/global/` and the root, and temporary files of killed writers are removed.

Example:
    ```py
    >>> from peft_hetlora.federated import LocalStore, Coordinator  # doctest: +SKIP
    >>> coord = Coordinator(LocalStore("fed"), r_max=16, r_min=2, clients=["a", "b", "c"],
    ...                     clients_per_round=2, rounds=10)  # doctest: +SKIP
    >>> coord.init("initial_adapter")  # publishes global 0 with round.json  # doctest: +SKIP
    >>> coord.run()  # waits for uploads, closes rounds, publishes globals 1..10  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ...utils.constants import ADAPTER_FILE, CONFIG_FILE, ROUND_FILE, SERVER_STATE_FILE
from ...utils.errors import CoordinatorError
from ..aggregation import DEFAULT_INFLUENCE_BOUND, ClientUpdate, get_aggregation, parse_influence_bound
from ..round import (
    CollectStatus,
    Rejection,
    RoundOutcome,
    RoundPlan,
    RoundSettings,
    close_round,
    default_method_and_selection,
    plan_round,
    round_status,
)
from ..settings import (
    FederationSettings,
    ResolvedSettings,
    initial_identity,
    new_federation,
)
from ..stores import AdapterStore, GlobalAdapter, file_sha256
from ..upload import RejectedUpload, UploadSpec, validate_upload
from .publisher import GlobalPublisher, read_json

logger = logging.getLogger(__name__)


__all__ = ["Coordinator"]


def _resolved(name: str) -> property:
    """A read-only view of the coordinator's `settings.ResolvedSettings` attribute ``name``."""

    def get(self: Coordinator) -> Any:
        return getattr(self.resolved, name)

    return property(get, doc=f"The federation's ``{name}``: given, else federation.json's, else the default.")


class Coordinator:
    """Runs a HetLoRA federation round by round against an `AdapterStore`.

    Settings left as `None` come from the store's `federation.json` when it exists (so
    `Coordinator(store).run()` resumes a federation), else from the defaults: method `DEFAULT_METHOD` (see
    `round.default_method_and_selection`),
    r_min 1, rank policy "uniform", all clients every round, `min_clients = clients_per_round`,
    seed 0, scale from the adapter config. `r_max` defaults to the initial adapter's `r`.

    Args:
        store: where everything lives (`LocalStore`, `HubStore`).
        settings: the federation's `settings.FederationSettings` (method, ranks, clients, rounds, clip, DP, windows,
            message formats, upload limits; see there). Its keyword form builds one: `Coordinator(store,
            method="hetlora", clients=[...], ...)` is `Coordinator(store, FederationSettings(method="hetlora",
            clients=(...), ...))`.
        poll_interval_s: seconds between two looks at the store while collecting uploads.
        clock, sleep: injectable time source and sleep (tests never sleep).
        progress: show a progress bar while waiting for uploads.

    Example:
        ```py
        >>> settings = FederationSettings(method="hetlora", r_max=16, r_min=2, clients=("a", "b"), rounds=3)
        >>> coord = Coordinator(LocalStore("fed"), settings)  # doctest: +SKIP
        >>> coord.init("init_adapter_dir")  # doctest: +SKIP
        >>> coord.step()  # one transition: e.g. 'waiting', 'closed round 0', 'done'  # doctest: +SKIP
        ```
    """

    # the settings, each given, else federation.json's, else the default (`settings.ResolvedSettings`)
    federation = _resolved("federation")
    method = _resolved("method")
    r_max = _resolved("r_max")
    r_min = _resolved("r_min")
    clients = _resolved("clients")
    clients_per_round = _resolved("clients_per_round")
    min_clients = _resolved("min_clients")
    rounds = _resolved("rounds")
    seed = _resolved("seed")
    scaling = _resolved("scaling")
    next_rank = _resolved("next_rank")
    component_selection = _resolved("component_selection")
    anchor = _resolved("anchor")
    client_training = _resolved("client_training")
    client_sampling = _resolved("client_sampling")
    rank_sampling_rounds = _resolved("rank_sampling_rounds")
    dp = _resolved("dp")

    def __init__(
        self,
        store: AdapterStore,
        settings: FederationSettings | None = None,
        *,
        poll_interval_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        progress: bool = True,
        **setting_kwargs: Any,
    ):
        settings = FederationSettings.given(settings, setting_kwargs, owner="Coordinator")
        self.store = store
        self.settings = settings
        self.resolved = ResolvedSettings(store, settings)
        self.dp_noise_seed = settings.dp_noise_seed
        self.rank_policy = settings.rank_policy
        self.max_examples = settings.max_examples
        self.allow_per_module_ranks = settings.allow_per_module_ranks
        self.require_global_revision = settings.require_global_revision
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self.sleep = sleep
        self.progress = progress
        self._spec: UploadSpec | None = None
        self.publisher = GlobalPublisher(store)

    # ------------------------------------------------------------------ init
    def init(
        self,
        initial_adapter_dir: str | Path | None = None,
        *,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        adapter_config: Mapping[str, Any] | None = None,
    ) -> GlobalAdapter:
        """Write federation.json and publish global 0 (with round 0's participants and ranks).

        Idempotent: against a store that already holds this federation it checks the identity
        (method, r_max, r_min, base model, adapter shapes, clients) and publishes global 0 only if
        it is missing. The initial adapter must be at rank r_max (`adapter_model.safetensors` +
        `adapter_config.json`, HETLORA or plain LORA).

        Example:
            ```py
            >>> coord.init("initial_adapter")  # doctest: +SKIP
            GlobalAdapter(round=0, revision='...', path=...)
            ```
        """
        if initial_adapter_dir is not None:
            folder = Path(initial_adapter_dir)
            if not (folder / ADAPTER_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
                raise FileNotFoundError(f"{folder} must hold {ADAPTER_FILE} and {CONFIG_FILE} (a saved adapter).")
            state_dict = load_file(str(folder / ADAPTER_FILE))
            adapter_config = read_json(folder / CONFIG_FILE)
        if state_dict is None or adapter_config is None:
            raise ValueError("init() needs an adapter folder, or both `state_dict` and `adapter_config`.")
        state_dict = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
        stored = self.store.read_federation()
        r_max = self.resolved.requested["r_max"] or (stored or {}).get("r_max") or adapter_config.get("r")
        r_min = self.resolved.requested["r_min"] or (stored or {}).get("r_min") or 1
        identity, config, module_dims = initial_identity(state_dict, adapter_config, r_max=r_max, r_min=r_min)
        if stored is None:
            method, selection = default_method_and_selection(
                self.resolved.requested["method"], self.resolved.requested["component_selection"], self.settings.dp
            )
            identity = {"method": method, "r_min": r_min, **identity}
            self.resolved.requested["component_selection"] = selection
            self.resolved.record = self._new_federation(identity, config, module_dims)
            self.store.write_federation(self.resolved.record)
            logger.info("Created federation: method=%s r_max=%d r_min=%d, %d clients.", self.method, r_max, r_min,
                        len(self.clients))
        else:
            self.resolved.check_identity(stored, {**identity, "adapter_config": config})
            self.resolved.record = stored
            existing = self.store.latest_global()
            if existing is not None:
                logger.info("Federation already initialised (latest global: round %d); nothing to do.",
                            existing.round)
                return self.store.get_global(0)
        client_ranks = dict(self.federation["initial_ranks"])
        self._publish(0, state_dict, client_ranks)
        return self.store.get_global(0)

    def _round_info(self, round_idx: int, client_ranks: Mapping[str, int]) -> dict:
        """round.json of global `round_idx`: round `round_idx`'s plan (participants, ranks, windows) and settings."""
        plan = plan_round(round_idx, self.clients, client_ranks, clients_per_round=self.clients_per_round,
                          seed=self.seed, sampling_rate=self.dp.sampling_rate if self.dp is not None else None,
                          opened_at=self.clock(), final=round_idx >= self.rounds,
                          component_selection=self.component_selection, anchor=self.anchor, r_max=self.r_max,
                          client_training=self.client_training,
                          module_dims=self.federation.get("modules") if self.client_training == "core" else None,
                          client_sampling=self.client_sampling, rank_sampling_rounds=self.rank_sampling_rounds)
        return plan.to_json(self.round_settings(), deadline_s=self.resolved.get("deadline_s"))

    def _global_folder(self, round_idx: int, state_dict: Mapping[str, torch.Tensor],
                       client_ranks: Mapping[str, int], server_state: Mapping[str, torch.Tensor] | None = None,
                       ) -> contextlib.AbstractContextManager[Path]:
        return self.publisher.global_folder(round_idx, state_dict, self.federation["adapter_config"],
                                            self._round_info(round_idx, client_ranks), server_state)

    def _publish(self, round_idx: int, state_dict: Mapping[str, torch.Tensor], client_ranks: Mapping[str, int],
                 server_state: Mapping[str, torch.Tensor] | None = None) -> str:
        with self._global_folder(round_idx, state_dict, client_ranks, server_state) as folder:
            return self.publisher.publish_folder(round_idx, folder)

    def _server_state(self, round_idx: int) -> dict[str, torch.Tensor] | None:
        """The server step's state published beside global `round_idx` (None: no server step, or global 0)."""
        if self.resolved.server_optimizer is None and not self.resolved.error_feedback:
            return None
        path = Path(self.store.get_global(round_idx).path) / SERVER_STATE_FILE
        return load_file(str(path)) if path.is_file() else {}

    def _new_federation(self, identity: dict, config: dict, module_dims: Mapping[str, tuple[int, int]]) -> dict:
        return new_federation(identity, config, module_dims, self.resolved.requested, self.rank_policy, self.clock())

    # ------------------------------------------------------------------ rounds
    def open_round(self, round_idx: int) -> RoundPlan:
        """The plan of round `round_idx` as published with global `round_idx` (participants, ranks).

        Example:
            ```py
            >>> coord.open_round(0).participants  # doctest: +SKIP
            ['a', 'b']
            ```
        """
        self.federation  # noqa: B018 - loads and checks federation.json
        try:
            adapter = self.store.get_global(round_idx)
        except (FileNotFoundError, KeyError, LookupError) as err:
            raise CoordinatorError(f"Global {round_idx} is not published, so round {round_idx} is not open "
                                   f"({err}).") from None
        return RoundPlan.from_json(read_json(Path(adapter.path) / ROUND_FILE), round_idx=round_idx,
                                   revision=adapter.revision)

    def _status(self, plan: RoundPlan, listed: Sequence[str], now: float, start: float) -> CollectStatus:
        return round_status(plan, listed, min_clients=self.min_clients, deadline_s=self.resolved.get("deadline_s"),
                            now=now, start=start)

    def collect(self, round_idx: int, *, wait: bool = True, timeout_s: float | None = None) -> CollectStatus:
        """Poll the store for round `round_idx`'s uploads until the round can close.

        Ready when every participant has uploaded, or when `min_clients` have and either there is no
        deadline or it has passed. `wait=False` looks once; `timeout_s` bounds the wait of this call.

        Example:
            ```py
            >>> coord.collect(0, wait=False).uploaded  # doctest: +SKIP
            ['a']
            ```
        """
        plan = self.open_round(round_idx)
        start = self.clock()
        warned = False
        bar = None
        try:
            while True:
                status = self._status(plan, self.store.list_client_uploads(round_idx), self.clock(), start)
                if bar is None and wait and self.progress and not status.ready:
                    bar = tqdm(total=len(plan.participants), desc=f"round {round_idx} uploads", unit="client")
                if bar is not None:
                    bar.n = len(status.uploaded)
                    bar.refresh()
                if status.ready or not wait:
                    return status
                if timeout_s is not None and self.clock() - start >= timeout_s:
                    return status
                if status.deadline_passed and not warned:
                    logger.warning("Round %d: deadline passed with %d/%d uploads (min_clients=%d); still waiting.",
                                   round_idx, len(status.uploaded), len(plan.participants), self.min_clients)
                    warned = True
                self.sleep(self.poll_interval_s)
        finally:
            if bar is not None:
                bar.close()

    def upload_spec(self, round_idx: int) -> UploadSpec:
        """The validation spec of uploads, from the header of global `round_idx`'s adapter."""
        if self._spec is None:
            path = Path(self.store.get_global(round_idx).path) / ADAPTER_FILE
            self._spec = UploadSpec.from_safetensors(
                path, r_min=self.r_min, r_max=self.r_max, max_upload_bytes=self.resolved.get("max_upload_bytes"),
                max_examples=self.max_examples, allow_per_module_ranks=self.allow_per_module_ranks,
                message_formats=self.resolved.get("message_formats"),
            )
        return self._spec

    def _load_update(self, plan: RoundPlan, client_id: str, spec: UploadSpec) -> ClientUpdate:
        try:
            folder = self.store.download_client(plan.round, client_id)
        except (LookupError, FileNotFoundError, ValueError) as err:
            # gone since listed, or refused by the store (e.g. a file over its size limit); transient network
            # errors propagate instead, so a resumed coordinator tries again
            raise RejectedUpload(f"upload could not be downloaded ({err})") from None
        update = validate_upload(
            folder, spec, client_id=client_id, round_idx=plan.round, assigned_rank=plan.ranks.get(client_id),
            required_rank=plan.ranks.get(client_id) if get_aggregation(self.method).homogeneous else None,
            assigned_components=plan.components_of(client_id), assigned_core=plan.core_of(client_id),
            current_revision=plan.revision,
        )
        revision = update.metadata.get("global_revision")
        if self.require_global_revision and revision != plan.revision:
            raise RejectedUpload(f"trained from global revision {revision!r}, not round {plan.round}'s "
                                 f"{plan.revision!r}")
        return update

    def _previous_client_ranks(self, round_idx: int) -> dict[str, int]:
        ranks = dict(self.federation["initial_ranks"])
        if round_idx > 0:
            previous = self.store.read_summary(round_idx - 1)
            if previous is not None and "client_ranks" in previous:
                ranks.update(previous["client_ranks"])
            else:
                logger.warning("Round %d has no summary with client ranks; using the initial ranks.", round_idx - 1)
        return {cid: int(r) for cid, r in ranks.items()}

    def _previous_max_ranks(self, round_idx: int) -> dict[str, int]:
        previous = self.store.read_summary(round_idx - 1) if round_idx > 0 else None
        return {cid: int(r) for cid, r in ((previous or {}).get("client_max_ranks") or {}).items()}

    def round_settings(self) -> RoundSettings:
        """The settings the round engine (`round.close_round`) closes this federation's rounds with."""
        return RoundSettings(
            method=self.method, r_max=self.r_max, r_min=self.r_min, scaling=self.scaling,
            clip_norm=self._clip_setting(), next_rank=self.next_rank, dp=self.dp, seed=self.seed,
            dp_noise_seed=self.dp_noise_seed, component_selection=self.component_selection, anchor=self.anchor,
            server_optimizer=self.resolved.server_optimizer, error_feedback=self.resolved.error_feedback,
            client_training=self.client_training,
        )

    def _clip_setting(self) -> float | str:
        """The influence bound: the requested or stored one; a federation that names none gets the default."""
        value = self.resolved.get("clip_norm")
        return DEFAULT_INFLUENCE_BOUND if value is None else parse_influence_bound(value)

    def _uploads(self, plan: RoundPlan, client_ids: Sequence[str], expect_sha: Mapping[str, str] | None
                 ) -> Iterator[ClientUpdate | Rejection]:
        """Download and validate the uploads of `client_ids`, one at a time (a resumed round checks their sha256)."""
        spec = self.upload_spec(plan.round)
        for cid in tqdm(sorted(client_ids), desc=f"round {plan.round} aggregate", unit="client",
                        disable=not self.progress, leave=False):
            try:
                update = self._load_update(plan, cid, spec)
            except RejectedUpload as err:
                if expect_sha is not None:
                    raise CoordinatorError(
                        f"Round {plan.round}'s summary accepted {cid!r}, but its upload is now rejected "
                        f"({err.reason}). Restore that upload, or delete rounds/{plan.round}/summary.json to "
                        "close the round again."
                    ) from None
                logger.warning("Round %d: rejected %s: %s", plan.round, cid, err.reason)
                yield Rejection(cid, err.reason)
                continue
            sha = update.metadata["sha256"]
            if expect_sha is not None and expect_sha.get(cid) not in (None, sha):
                raise CoordinatorError(
                    f"Round {plan.round}'s summary accepted {cid!r} with sha256 {expect_sha[cid]}, but the upload "
                    f"now has {sha} (re-uploaded after the decision). Restore it, or delete "
                    f"rounds/{plan.round}/summary.json to close the round again."
                )
            yield update

    def _engine(self, plan: RoundPlan, client_ids: Sequence[str], *, outsiders: Sequence[str] = (),
                expect_sha: Mapping[str, str] | None = None) -> RoundOutcome:
        """Run the round engine on the uploads of `client_ids`, streamed from the store."""
        previous = load_file(str(Path(self.store.get_global(plan.round).path) / ADAPTER_FILE))
        def items() -> Iterator[ClientUpdate | Rejection]:  # read anew for each of the round's two passes
            extra = (Rejection(cid, f"not a participant of round {plan.round}") for cid in outsiders)
            return itertools.chain(self._uploads(plan, client_ids, expect_sha), extra)

        return close_round(
            plan, items, previous,
            self.round_settings(), client_ranks=self._previous_client_ranks(plan.round),
            initial_ranks=self.federation["initial_ranks"], max_ranks=self._previous_max_ranks(plan.round),
            clock=self.clock, strict=expect_sha is not None, server_state=self._server_state(plan.round),
        )

    def close_round(self, round_idx: int, *, uploads: Sequence[str] | None = None) -> dict:
        """Validate and aggregate round `round_idx`'s uploads, write its summary, then publish global t+1.

        `uploads` restricts the ids considered (default: every complete upload in the store). If the
        round already has a summary (a coordinator killed after writing it), exactly its accepted ids
        are re-aggregated and global t+1 is published; if global t+1 exists too, nothing is done.
        Returns the summary. The decision is `round.close_round`'s; this method moves bytes.

        Example:
            ```py
            >>> summary = coord.close_round(0)  # doctest: +SKIP
            >>> summary["accepted"], summary["rejected"]  # doctest: +SKIP
            (['a', 'b'], {'c': 'tensor ... has 3 non-finite value(s) (NaN or Inf)'})
            ```
        """
        plan = self.open_round(round_idx)
        summary = self.store.read_summary(round_idx)
        if summary is not None:
            latest = self.store.latest_global()
            if latest is None or latest.round <= round_idx:
                self._publish_from_summary(plan, summary)
            return summary
        listed = set(self.store.list_client_uploads(round_idx) if uploads is None else uploads)
        participants = set(plan.participants)
        outcome = self._engine(plan, sorted(listed & participants), outsiders=sorted(listed - participants))
        summary = outcome.summary
        with self._global_folder(round_idx + 1, outcome.state_dict, outcome.client_ranks,
                                 outcome.server_state) as folder:
            stage = getattr(self.store, "stage_global", None)
            if callable(stage):
                # staged before the summary names it: a restart publishes exactly this, never re-reading uploads
                summary["next_global"] = {"round": round_idx + 1, "sha256": stage(round_idx + 1, folder)}
            self.store.write_summary(round_idx, summary)
            logger.info("Round %d: accepted %d, rejected %d.", round_idx, len(summary["accepted"]),
                        len(summary["rejected"]))
            self.publisher.publish_folder(round_idx + 1, folder)
        return summary

    def _publish_from_summary(self, plan: RoundPlan, summary: Mapping[str, Any]) -> None:
        staged_of = getattr(self.store, "staged_global", None)
        expected = (summary.get("next_global") or {}).get("sha256")
        staged = staged_of(plan.round + 1) if callable(staged_of) and expected else None
        if staged is not None and file_sha256(Path(staged) / ADAPTER_FILE) == expected:
            logger.info("Round %d has a summary but no global %d: publishing the staged global it names.",
                        plan.round, plan.round + 1)
            self.publisher.publish_folder(plan.round + 1, Path(staged))
            return
        accepted = list(summary.get("accepted", []))
        logger.info("Round %d has a summary but no global %d: re-aggregating its %d accepted upload(s).",
                    plan.round, plan.round + 1, len(accepted))
        expect = {cid: info.get("sha256") for cid, info in summary.get("clients", {}).items()}
        outcome = self._engine(plan, accepted, expect_sha=expect)
        self._publish(plan.round + 1, outcome.state_dict, {k: int(v) for k, v in summary["client_ranks"].items()},
                      outcome.server_state)

    # ------------------------------------------------------------------ driving
    def step(self, *, wait: bool = True) -> str:
        """Advance the federation by one transition from whatever state the store holds.

        Returns "done" (global `rounds` is published), "waiting" (round open, not ready, `wait=False`),
        or "closed round t" (summary t written and global t+1 published).

        Example:
            ```py
            >>> coord.step(wait=False)  # doctest: +SKIP
            'waiting'
            ```
        """
        self.federation  # noqa: B018 - loads and checks federation.json
        self.publisher.resume()
        latest = self.store.latest_global()
        if latest is None:
            raise CoordinatorError("federation.json exists but global 0 was never published: run `init()` again "
                                   "with the same initial adapter (it is idempotent).")
        t = latest.round
        if t >= self.rounds:
            return "done"
        if self.store.read_summary(t) is None:
            status = self.collect(t, wait=wait)
            if not status.ready:
                return "waiting"
        self.close_round(t)
        return f"closed round {t}"

    def run(self, *, wait: bool = True) -> GlobalAdapter | None:
        """Step until global `rounds` is published (or, with `wait=False`, until a round waits on uploads).

        Returns the final global adapter, or None when it stopped at a waiting round.

        Example:
            ```py
            >>> final = coord.run()  # doctest: +SKIP
            >>> PeftModel.from_pretrained(base_model, final.path)  # doctest: +SKIP
            ```
        """
        latest = self.store.latest_global()
        start = latest.round if latest is not None else 0
        with tqdm(total=self.rounds, initial=min(start, self.rounds), desc="rounds", unit="round",
                  disable=not self.progress) as bar:
            while True:
                outcome = self.step(wait=wait)
                if outcome == "done":
                    return self.store.latest_global()
                if outcome == "waiting":
                    return None
                bar.update(1)
