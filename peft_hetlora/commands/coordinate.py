"""`hetlora coordinate`: run (or resume) a federation's coordinator against a folder or a Hub repo.

Start a federation with `hetlora init` (a base model and settings -> global 0), then run this.
`--init-adapter DIR` is the manual alternative: DIR is an adapter saved at r_max (`model.save_pretrained`
of a `HetLoRAConfig(r=r_max)` model, or a plain PEFT LoRA folder), published as global 0.

Example:
    ```sh
    hetlora init --store runs/fed --base-model my-model/ --r-max 16 --r-min 2 --lora-alpha 32 \\
        --target-modules q_proj,v_proj --clients a,b,c --rounds 10
    hetlora coordinate --store runs/fed --wait
    # or: publish global 0 from an r_max adapter you saved yourself, then wait for uploads round after round
    hetlora coordinate --store runs/fed --init-adapter out/init --rounds 10 --method hetlora \\
        --num-clients 20 --clients-per-round 4 --r-min 2 --wait
    # resume after a crash (settings come from federation.json)
    hetlora coordinate --store runs/fed --wait
    # a Hub repo as the store
    hetlora coordinate --store hf://my-org/my-federation --init-adapter out/init --clients a,b,c --rounds 5
    ```
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..cli import add_common_arguments, exit_status_epilog, run_command
from ..federated.aggregation import AGGREGATION_METHODS, parse_influence_bound
from ..federated.coordinator import Coordinator
from ..federated.policies import (
    BUDGET_KINDS,
    CLIENT_SAMPLING,
    RANK_POLICIES,
    SELECTION_POLICIES,
    RankPolicy,
    parse_bytes,
)
from ..federated.round import (
    CLIENT_TRAINING,
    DEFAULT_METHOD,
    NEXT_RANK_RULES,
    SERVER_OPTIMIZERS,
    dp_methods,
    parse_server_optimizer,
    window_methods,
)
from ..federated.settings import FederationSettings

HF_PREFIX = "hf://"


def _pairs(text: str, what: str) -> dict[str, str]:
    """`a=1,b=2` (or a JSON file holding an object) -> {"a": "1", "b": "2"}."""
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise argparse.ArgumentTypeError(f"{path} must hold a JSON object for {what}.")
        return {str(k): str(v) for k, v in data.items()}
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise argparse.ArgumentTypeError(f"Cannot read {what} from {item!r}; write name=value,name=value.")
        out[key.strip()] = value.strip()
    return out


def _int_pairs(text: str) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in _pairs(text, "ranks").items()}
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"Ranks must be integers: {err}") from None


def _byte_pairs(text: str) -> dict[str, int]:
    try:
        return {k: parse_bytes(v) for k, v in _pairs(text, "budgets").items()}
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _float_pairs(text: str) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in _pairs(text, "tier fractions").items()}
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"Tier fractions must be numbers: {err}") from None


def _name_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names, e.g. fp32,bf16")
    return names


def parse_client_list(text: str) -> list[str]:
    """A comma-separated command-line list (``--clients``, ``--target-modules``), blanks dropped.

    Example:
        ```py
        >>> parse_client_list("alice, bob,,carol")
        ['alice', 'bob', 'carol']
        ```
    """
    return [c.strip() for c in text.split(",") if c.strip()]


def _influence_bound(text: str) -> float | str:
    """``--clip-norm``: ``adaptive``, ``off`` or a positive number (checked by the federation's own parser)."""
    try:
        return parse_influence_bound(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _server_optimizer(text: str) -> dict[str, Any]:
    """``--server-optimizer``: ``NAME[:key=value,...]`` (checked by the round's own parser)."""
    try:
        return parse_server_optimizer(text).to_dict()
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _byte_size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_store_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add `--store` and the Hub options (shared by `coordinate` and `init`)."""
    store = parser.add_argument_group("store")
    store.add_argument("--store", required=True,
                       help="A folder (created by `hetlora init` or --init-adapter) or hf://namespace/repo.")
    store.add_argument("--hub-endpoint", default=None, help="Hub endpoint URL (hf:// stores).")
    store.add_argument("--hub-token", default=None, help="Hub token (hf:// stores; default: the logged-in token).")
    store.add_argument("--hub-client-mode", choices=("client_repo", "pr"), default="client_repo",
                       help="How clients upload to an hf:// store: each to its own repo, or by pull request.")
    return store


def add_federation_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the federation and initial-rank options (shared by `coordinate` and `init`)."""
    fed = parser.add_argument_group("federation (defaults come from federation.json when resuming)")
    fed.add_argument("--method", choices=AGGREGATION_METHODS, default=None,
                     help=f"Aggregation (default: {DEFAULT_METHOD}, the study's winner, benchmarks/README.md; "
                     "component when --component-selection names windows; hetlora for the paper's rule).")
    fed.add_argument("--rounds", type=int, default=None, help="Number of rounds (default 1).")
    fed.add_argument("--r-max", type=int, default=None, help="Maximum rank (default: the initial adapter's r).")
    fed.add_argument("--r-min", type=int, default=None, help="Minimum rank (default 1).")
    clients = fed.add_mutually_exclusive_group()
    clients.add_argument("--clients", type=parse_client_list, default=None, help="Comma-separated client ids.")
    clients.add_argument("--num-clients", type=int, default=None, help="N clients named client-000 ... (or "
                         "--client-prefix).")
    fed.add_argument("--client-prefix", default="client-", help="Prefix of generated client ids.")
    fed.add_argument("--clients-per-round", type=int, default=None, help="Participants per round (default all).")
    fed.add_argument("--min-clients", type=int, default=None,
                     help="Uploads needed to close a round (default clients-per-round; with --deadline-s, what "
                     "suffices once the deadline passed).")
    fed.add_argument("--seed", type=int, default=None, help="Seed of rank draws and client sampling (default 0).")
    fed.add_argument("--clip-norm", type=_influence_bound, default=None, metavar="{adaptive,off,C}",
                     help="Influence bound: 'adaptive' (the default: each factor's change clipped to 4 x the round's "
                          "median change), 'off', or a fixed C > 0 (docs/aggregation.md).")
    fed.add_argument("--server-optimizer", type=_server_optimizer, default=None,
                     metavar="NAME[:key=value,...]",
                     help=f"A server step after aggregation, on the product B A: one of {list(SERVER_OPTIMIZERS)} "
                          "with its settings, e.g. 'fedavgm:lr=1,momentum=0.9' or 'fedadam:lr=0.01,tau=1e-3' "
                          "(default: none, the method's aggregate; docs/aggregation.md#server-step).")
    fed.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=None,
                     help="Carry the residual of the truncation back to r_max to the next round, server-side "
                          "(default off; docs/aggregation.md#server-step).")
    fed.add_argument("--client-training", choices=list(CLIENT_TRAINING), default=None,
                     help="'core': participants below r_max train an r_c x r_c core inside the global's subspace and "
                          "upload only the core (needs a method that takes cores, e.g. flexlora_held); 'factors' "
                          "(default): every client trains and uploads LoRA factors (docs/methods.md#core-clients).")
    fed.add_argument("--message-formats", type=_name_list, default=None,
                     help="Upload formats clients may declare: comma-separated fp32,bf16,fp16,int8-block64 "
                          "(default: all; docs/on_device.md).")
    fed.add_argument("--max-upload-bytes", type=_byte_size, default=None,
                     help="Size limit of an uploaded adapter, e.g. 64MB (default 2x an r_max adapter).")
    fed.add_argument("--deadline-s", type=float, default=None, help="Seconds after a round opens after which "
                     "min-clients uploads close it.")
    fed.add_argument("--next-rank", choices=NEXT_RANK_RULES, default=None,
                     help="A client's next rank: its reported rank_out (default) or its initial rank.")
    fed.add_argument("--component-selection", choices=SELECTION_POLICIES, default=None,
                     help="Which global components each client trains: prefix (HetLoRA; the default), rolling "
                     "(FedRolex-style moving windows) or coverage (every component covered; without --method a "
                     "window policy gets the component rule); window policies need a --method among "
                     f"{', '.join(window_methods())} (docs/federation.md).")
    fed.add_argument("--client-sampling", choices=CLIENT_SAMPLING, default=None,
                     help="How each round's --clients-per-round participants are drawn: uniform (the default) or rank "
                          "(in proportion to each client's current rank: more capable clients a round; not with DP; "
                          "docs/methods.md#client-sampling).")
    fed.add_argument("--rank-sampling-rounds", type=int, default=None, metavar="N",
                     help="With --client-sampling rank: draw only the first N rounds by rank, then uniformly "
                          "(default: every round by rank; docs/methods.md#client-sampling).")
    fed.add_argument("--anchor", type=int, default=None,
                     help="Components 0..anchor-1 are in every client's window (window policies; default 0).")

    dp = parser.add_argument_group("differential privacy (client-level, central; docs/privacy.md)")
    dp.add_argument("--dp-clip", type=float, default=None,
                    help="Turn DP on: the L2 bound C on one client's change per round (with a --method among "
                    f"{', '.join(dp_methods())}). Clients are Poisson-sampled at q = clients-per-round / clients.")
    dp.add_argument("--dp-noise-multiplier", type=float, default=None, help="sigma: noise std sigma * C.")
    dp.add_argument("--dp-target-epsilon", type=float, default=None,
                    help="Or: the epsilon to reach after --rounds rounds (sigma found by Opacus).")
    dp.add_argument("--dp-delta", type=float, default=None, help="delta (default 1 / clients**1.1).")

    ranks = parser.add_argument_group("initial ranks")
    ranks.add_argument("--rank-policy", choices=RANK_POLICIES, default=None,
                       help="uniform (default), explicit (--ranks), constant (--rank), budget (--budgets), tiers.")
    ranks.add_argument("--ranks", type=_int_pairs, default=None, help="Explicit ranks: a=4,b=8 or a JSON file.")
    ranks.add_argument("--rank", type=int, default=None, help="The rank of every client (constant policy).")
    ranks.add_argument("--budgets", type=_byte_pairs, default=None,
                       help="Device budgets: a=64MB,b=1GiB or a JSON file (budget policy).")
    ranks.add_argument("--budget-kind", choices=BUDGET_KINDS, default="memory",
                       help="memory: Adam training state (4 copies x 4 bytes per parameter); params: the weights.")
    ranks.add_argument("--memory-model", default=None,
                       help="With --budgets: budgets are a device's peak memory for a whole local round, sized from "
                       "the measured table of this model (e.g. smollm2-135m; docs/federation.md).")
    ranks.add_argument("--memory-quantize", choices=("float32", "8bit", "4bit"), default=None,
                       help="The base model's quantisation for --memory-model (default float32).")
    ranks.add_argument("--memory-table", default=None,
                       help="A benchmarks/bench_memory.py --out JSON file to use instead of the shipped table.")
    ranks.add_argument("--tiers", type=_float_pairs, default=None, help="Tier fractions: small=0.5,medium=0.3,...")
    ranks.add_argument("--tier-ranks", type=_int_pairs, default=None, help="Tier ranks: small=2,medium=8,...")


def add_coordinate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `coordinate` options to `parser` (used by `add_coordinate_parser`)."""
    store = add_store_arguments(parser)
    store.add_argument("--init-adapter", default=None, help="Folder of a ready initial adapter at r_max "
                       "(adapter_model.safetensors + adapter_config.json, e.g. `model.save_pretrained` of a "
                       "HetLoRAConfig(r=r_max) model); publishes global 0. Safe to repeat. `hetlora init` builds "
                       "it from a base model instead.")
    add_federation_arguments(parser)
    run = parser.add_argument_group("running")
    run.add_argument("--wait", action="store_true",
                     help="Keep polling for uploads until the last round closes (default: close what is ready, "
                     "then exit).")
    run.add_argument("--poll-interval", type=float, default=5.0, help="Seconds between polls of the store.")
    run.add_argument("--no-progress", action="store_true", help="No progress bars.")
    return parser


def add_coordinate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `coordinate` on an argparse subparsers object; the lead's `hetlora` CLI calls this.

    Example:
        ```py
        >>> parser = argparse.ArgumentParser(prog="hetlora")
        >>> sub = parser.add_subparsers(dest="command")
        >>> _ = add_coordinate_parser(sub)
        >>> parser.parse_args(["coordinate", "--store", "fed"]).store
        'fed'
        ```
    """
    parser = subparsers.add_parser(
        "coordinate",
        help="Run or resume a federation's coordinator (publish, collect, validate, aggregate).",
        description=__doc__.split("\n\n")[0],
    )
    add_coordinate_arguments(parser)
    parser.set_defaults(func=run_coordinate)
    return parser


def open_store(
    spec: str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    client_mode: str = "client_repo",
    create: bool = True,
) -> Any:
    """`hf://namespace/repo` -> HubStore, anything else -> LocalStore (folder created if missing and `create`).

    Example:
        ```py
        >>> open_store("runs/fed")  # doctest: +SKIP
        LocalStore('runs/fed')
        ```
    """
    if spec.startswith(HF_PREFIX):
        from ..federated.stores import HubStore

        return HubStore(spec[len(HF_PREFIX):], endpoint=endpoint, token=token, client_mode=client_mode)
    from ..federated.stores import LocalStore

    return LocalStore(spec, create=create)


def _rank_policy(args: argparse.Namespace) -> RankPolicy | None:
    kind = args.rank_policy
    if kind is None:
        if args.ranks is not None:
            kind = "explicit"
        elif args.budgets is not None:
            kind = "budget"
        elif args.tiers is not None or args.tier_ranks is not None:
            kind = "tiers"
        elif args.rank is not None:
            kind = "constant"
        else:
            return None
    return RankPolicy(kind=kind, ranks=args.ranks, rank=args.rank, budgets=args.budgets, budget_kind=args.budget_kind,
                      tiers=args.tiers, tier_ranks=args.tier_ranks, memory_model=getattr(args, "memory_model", None),
                      quantize=getattr(args, "memory_quantize", None) or "float32",
                      memory_table=getattr(args, "memory_table", None))


def _dp_config(args: argparse.Namespace, clients: Sequence[str] | None) -> Any:
    """A `DPConfig` from the --dp-* options (None when --dp-clip is not given: off, or from federation.json)."""
    given = [getattr(args, f"dp_{name}", None) for name in ("noise_multiplier", "target_epsilon", "delta")]
    clip = getattr(args, "dp_clip", None)
    if clip is None:
        if any(v is not None for v in given):
            raise ValueError("--dp-noise-multiplier / --dp-target-epsilon / --dp-delta need --dp-clip (which turns "
                             "DP on).")
        return None
    if not clients:
        raise ValueError("DP needs the federation's clients (--clients or --num-clients) for its sampling rate.")
    from ..federated.aggregation.privacy import DPConfig

    per_round = args.clients_per_round or len(clients)
    return DPConfig(clip=clip, noise_multiplier=args.dp_noise_multiplier, target_epsilon=args.dp_target_epsilon,
                    rounds=args.rounds or 1, sampling_rate=min(1.0, per_round / len(clients)),
                    population=len(clients), delta=args.dp_delta)


def build_coordinator(args: argparse.Namespace, *, create: bool | None = None) -> Coordinator:
    """A `Coordinator` from parsed `coordinate` (or `init`) arguments; `create` makes a missing folder store."""
    init_adapter = getattr(args, "init_adapter", None)
    create = init_adapter is not None if create is None else create
    if not args.store.startswith(HF_PREFIX) and not create and not Path(args.store).is_dir():
        raise FileNotFoundError(f"{args.store} does not exist, so it holds no federation: create one with `hetlora "
                               "init --store ... --base-model ...` (or pass --init-adapter DIR and --clients).")
    clients = args.clients
    if args.num_clients is not None:
        if args.num_clients < 1:
            raise ValueError("--num-clients must be >= 1.")
        width = max(3, len(str(args.num_clients - 1)))
        clients = [f"{args.client_prefix}{i:0{width}d}" for i in range(args.num_clients)]
    settings = FederationSettings.from_kwargs(
        method=args.method,
        r_max=args.r_max,
        r_min=args.r_min,
        clients=clients,
        rank_policy=_rank_policy(args),
        clients_per_round=args.clients_per_round,
        min_clients=args.min_clients,
        rounds=args.rounds,
        seed=args.seed,
        clip_norm=args.clip_norm,
        max_upload_bytes=args.max_upload_bytes,
        deadline_s=args.deadline_s,
        next_rank=args.next_rank,
        dp=_dp_config(args, clients),
        component_selection=getattr(args, "component_selection", None),
        anchor=getattr(args, "anchor", None),
        message_formats=getattr(args, "message_formats", None),
        server_optimizer=getattr(args, "server_optimizer", None),
        error_feedback=getattr(args, "error_feedback", None),
        client_training=getattr(args, "client_training", None),
        client_sampling=getattr(args, "client_sampling", None),
        rank_sampling_rounds=getattr(args, "rank_sampling_rounds", None),
    )
    return Coordinator(
        open_store(args.store, endpoint=args.hub_endpoint, token=args.hub_token, client_mode=args.hub_client_mode,
                   create=create),
        settings,
        poll_interval_s=getattr(args, "poll_interval", 5.0),
        progress=not getattr(args, "no_progress", False),
    )


def run_coordinate(args: argparse.Namespace) -> int:
    """Run the coordinator loop for parsed `coordinate` arguments; returns the exit code.

    0: the federation is done, or (without `--wait`) every ready round was closed and it now waits
    for uploads. Errors propagate: `hetlora` (and `main` here) print them as one line with the exit
    status of their kind (`peft_hetlora.cli.EXIT_STATUS`).
    """
    coordinator = build_coordinator(args)
    if args.init_adapter is not None:
        coordinator.init(args.init_adapter)
    final = coordinator.run(wait=args.wait)
    if final is not None:
        print(f"Federation done: global {final.round} (revision {final.revision[:12]}) at {final.path}")
        return 0
    latest = coordinator.store.latest_global()
    status = coordinator.collect(latest.round, wait=False)
    print(f"Round {status.round} waits for uploads: {len(status.uploaded)}/{len(status.participants)} "
          f"({', '.join(sorted(set(status.participants) - set(status.uploaded)))} missing). Run again, or "
          "pass --wait.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m peft_hetlora.commands.coordinate` (same options as `hetlora coordinate`)."""
    parser = argparse.ArgumentParser(prog="hetlora coordinate", description=__doc__.split("\n\n")[0],
                                     epilog=exit_status_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_coordinate_arguments(parser)
    add_common_arguments(parser)
    return run_command("coordinate", run_coordinate, parser.parse_args(argv))

if __name__ == "__main__":
    raise SystemExit(main())
