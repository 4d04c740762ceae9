"""Hub API calls of one federation round as a function of K, against the Hub test double (issue 25).

A `HubStore` federation (client_repo mode, the default) on ``tests/hub_double.py``: the coordinator initialises it
(federation.json, global 0), K clients each upload once from their own token (their own repo), then the
coordinator collects (lists the uploads) and closes the round (downloads, validates, aggregates, writes the
summary, publishes global 1). Every HTTP request the double serves is counted, by phase and by endpoint, and
compared with the Hub's documented rate limits (per 5-minute window; https://huggingface.co/docs/hub/rate-limits):
requests to ``/resolve/`` count against the Resolvers bucket, every other endpoint against the Hub API bucket.

Usage::

    python benchmarks/bench_hub_calls.py --clients 4 16 64 256
    python benchmarks/bench_hub_calls.py --clients 2 4 --out /tmp/hub   # seconds
    python benchmarks/bench_hub_calls.py --clients 4 16 --before old/hub_calls.json   # before / after columns
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import huggingface_hub.constants  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from peft_hetlora.federated import Coordinator, HubStore  # noqa: E402
from tests.hub_double import HubDouble  # noqa: E402

# Hub rate limits per 5-minute window (https://huggingface.co/docs/hub/rate-limits, September 2025 table):
# (Hub APIs, Resolvers) for the plans a federation is likely to run under.
RATE_LIMITS = {
    "free user": (1000, 5000),
    "PRO user": (2500, 12000),
    "Team organization": (3000, 20000),
    "Enterprise organization": (6000, 50000),
}
PHASES = ("init", "client uploads", "collect", "close round")
MODULES = {"base_model.model.model.layers.0.self_attn.q_proj": (8, 8),
           "base_model.model.model.layers.0.self_attn.v_proj": (4, 8)}  # name -> (d_out, d_in)
R_MAX = 4


def bucket(route: str) -> str:
    """The rate-limit bucket of a double route: ``resolve`` is a Resolver, every other route a Hub API call.

    Example:
        >>> bucket("resolve"), bucket("commit")
        ('resolvers', 'api')
    """
    return "resolvers" if route == "resolve" else "api"


def _initial() -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name, (d_out, d_in) in MODULES.items():
        sd[f"{name}.lora_A.weight"] = torch.randn(R_MAX, d_in, generator=gen)
        sd[f"{name}.lora_B.weight"] = torch.randn(d_out, R_MAX, generator=gen) * 0.1
    config = {"peft_type": "HETLORA", "r": R_MAX, "rank": R_MAX, "r_min": 1, "lora_alpha": 8, "rank_scaling": "fixed",
              "base_model_name_or_path": "synthetic/tiny", "target_modules": ["q_proj", "v_proj"]}
    return sd, config


def _client_folder(work: Path, store: HubStore, cid: str, rank: int) -> Path:
    glob = store.get_global(0)
    sd = load_file(str(Path(glob.path) / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(zlib.crc32(cid.encode()))
    out = {}
    for key, value in sd.items():
        part = value[:rank] if "lora_A" in key else value[:, :rank]
        out[key] = (part + 0.1 * torch.randn(part.shape, generator=gen)).contiguous()
    folder = work / f"up-{cid}"
    folder.mkdir(parents=True)
    save_file(out, str(folder / "adapter_model.safetensors"))
    meta = {"client_id": cid, "round": 0, "rank_in": rank, "rank_out": rank, "num_examples": 10 + len(cid),
            "global_revision": glob.revision}
    (folder / "client.json").write_text(json.dumps(meta))
    return folder


def count_round(num: int, work: Path) -> dict:
    """Calls of one round with ``num`` clients, by phase and route, and the wall time of each phase."""
    double = HubDouble().start()
    try:
        fed = HubStore("hetlora/fed", endpoint=double.endpoint, token=double.token, cache_dir=work / "coord")
        ids = [f"c{k:04d}" for k in range(num)]
        ranks = {cid: 1 + k % R_MAX for k, cid in enumerate(ids)}
        coord = Coordinator(fed, method="flexlora_held", r_max=R_MAX, r_min=1, clients=ids, rank_policy=ranks,
                            clients_per_round=num, rounds=1, seed=0, progress=False, sleep=lambda s: None)
        phases: dict[str, dict] = {}

        def measure(phase: str, fn) -> None:
            before, start = len(double.calls), time.perf_counter()
            fn()
            calls = double.calls[before:]
            phases[phase] = {"seconds": time.perf_counter() - start,
                             "routes": dict(Counter(f"{verb} {route}" for verb, route, _, _ in calls)),
                             "not_found": sum(1 for *_, status in calls if status == 404),  # probes, expected
                             "errors": sum(1 for *_, status in calls if status >= 400 and status != 404),
                             "api": sum(1 for _, route, _, _ in calls if bucket(route) == "api"),
                             "resolvers": sum(1 for _, route, _, _ in calls if bucket(route) == "resolvers")}

        sd, config = _initial()
        measure("init", lambda: coord.init(state_dict=sd, adapter_config=config))

        def uploads() -> None:
            for cid in ids:
                double.add_token(f"tok-{cid}", f"user-{cid}", write=[fed.client_repo_for(cid)])
                client = HubStore(fed.repo_id, endpoint=double.endpoint, token=f"tok-{cid}",
                                  cache_dir=work / f"client-{cid}")
                client.upload_client(0, cid, _client_folder(work, client, cid, ranks[cid]))

        measure("client uploads", uploads)
        measure("collect", lambda: coord.collect(0, wait=False))
        summary: dict = {}
        measure("close round", lambda: summary.update(coord.close_round(0)))
        if len(summary.get("accepted", [])) != num:
            raise RuntimeError(f"K={num}: {len(summary.get('accepted', []))} accepted, rejected "
                               f"{summary.get('rejected')}")
        return {"clients": num, "phases": phases}
    finally:
        double.stop()


def coordinator_calls(row: dict) -> tuple[int, int]:
    """(Hub API, resolver) requests of the coordinator's collect + close round in one benchmark row.

    Example:
        >>> coordinator_calls({"phases": {"collect": {"api": 3, "resolvers": 0},
        ...                               "close round": {"api": 14, "resolvers": 10}}})
        (17, 10)
    """
    return tuple(sum(row["phases"][x][kind] for x in ("collect", "close round")) for kind in ("api", "resolvers"))


def before_after(rows: list[dict], before: list[dict]) -> str:
    """The coordinator's collect + close round calls before / after, per K, and the share of a free account."""
    old = {row["clients"]: row for row in before}
    free_api, free_res = RATE_LIMITS["free user"]
    lines = ["", "Before / after (coordinator's collect + close round; before = the previous run given by --before), "
             f"share of a free account's 5-minute window ({free_api} API / {free_res} resolvers):", "",
             "| K | API before | API after | resolvers before | resolvers after | free API after | "
             "free resolvers after |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        api, res = coordinator_calls(row)
        b_api, b_res = coordinator_calls(old[row["clients"]]) if row["clients"] in old else ("-", "-")
        lines.append(f"| {row['clients']} | {b_api} | {api} | {b_res} | {res} | {api / free_api:.1%} "
                     f"| {res / free_res:.1%} |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    lines = [
        "Hub requests of one round (client_repo mode) against `tests/hub_double.py`, by phase; *api* = Hub API "
        "bucket, *res* = `/resolve/` (Resolvers bucket). Per-client uploads are counted over all K clients (each "
        "client spends its own token's budget: per client, divide by K).",
        "",
        "| K | init api / res | client uploads api / res (per client) | collect api / res | close round api / res "
        "| coordinator total api / res | close round (s) |",
        "|---:|---|---|---|---|---|---:|",
    ]
    for row in rows:
        p = row["phases"]
        coord_api = sum(p[x]["api"] for x in ("init", "collect", "close round"))
        coord_res = sum(p[x]["resolvers"] for x in ("init", "collect", "close round"))
        up = p["client uploads"]
        lines.append(
            f"| {row['clients']} | {p['init']['api']} / {p['init']['resolvers']} "
            f"| {up['api']} / {up['resolvers']} ({up['api'] / row['clients']:.1f} / "
            f"{up['resolvers'] / row['clients']:.1f}) | {p['collect']['api']} / {p['collect']['resolvers']} "
            f"| {p['close round']['api']} / {p['close round']['resolvers']} | {coord_api} / {coord_res} "
            f"| {p['close round']['seconds']:.1f} |"
        )
    lines += ["", "By endpoint (coordinator's collect + close round), per K:", ""]
    routes = sorted({r for row in rows for x in ("collect", "close round") for r in row["phases"][x]["routes"]})
    lines.append("| endpoint | " + " | ".join(f"K={row['clients']}" for row in rows) + " |")
    lines.append("|---|" + "---:|" * len(rows))
    for route in routes:
        cells = [sum(row["phases"][x]["routes"].get(route, 0) for x in ("collect", "close round")) for row in rows]
        lines.append(f"| {route} | " + " | ".join(str(c) for c in cells) + " |")
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]

        def coord_calls(row: dict, kind: str) -> int:
            return sum(row["phases"][x][kind] for x in ("collect", "close round"))

        slope_api = (coord_calls(b, "api") - coord_calls(a, "api")) / (b["clients"] - a["clients"])
        slope_res = (coord_calls(b, "resolvers") - coord_calls(a, "resolvers")) / (b["clients"] - a["clients"])
        lines += ["", f"Coordinator calls per client (slope between K={a['clients']} and K={b['clients']}): "
                      f"{slope_api:.2f} Hub API + {slope_res:.2f} resolver requests. At K = 1024 that is "
                      f"~{slope_api * 1024:.0f} API / {slope_res * 1024:.0f} resolver requests for one collect + "
                      "close, against the documented 5-minute limits (API / resolvers):", ""]
        for plan, (api, res) in RATE_LIMITS.items():
            lines.append(f"- {plan}: {api} / {res} -> {slope_api * 1024 / api:.1f}x / {slope_res * 1024 / res:.2f}x "
                         "of one window")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", default="hub_calls")
    parser.add_argument("--before", type=Path, default=None, help="a previous run's JSON: before / after columns")
    args = parser.parse_args(argv)
    before = json.loads(args.before.read_text())["rows"] if args.before else []
    huggingface_hub.constants.HF_HUB_OFFLINE = False  # the double is on 127.0.0.1; nothing else is contacted
    logging.getLogger("peft_hetlora").setLevel(logging.ERROR)
    rows = []
    for num in args.clients:
        with tempfile.TemporaryDirectory(prefix="hub_calls_") as tmp:
            start = time.perf_counter()
            rows.append(count_round(num, Path(tmp)))
            print(f"K={num}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    table = markdown(rows) + (before_after(rows, before) if before else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(
        json.dumps({"rate_limits_5min": RATE_LIMITS, "rows": rows, "before": before}, indent=1))
    (args.out / f"{args.name}.md").write_text(
        f"Command: `python benchmarks/bench_hub_calls.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
        f"{table}")
    print(table)


if __name__ == "__main__":
    main()
