"""Benchmark the federated aggregation on Llama-3.2-1B adapter shapes (CPU).

Measures, for K clients with ranks spread over [4, r_max] (files as a LocalStore round lays them out,
``rounds/0/clients/<id>/adapter_model.safetensors``):

(a) time to only read every client file (``safetensors.torch.load_file`` + one pass over every tensor) versus
    streaming ``hetlora`` aggregation reading the same files (target <= 1.3x), with the page cache cold (files
    evicted with ``posix_fadvise(DONTNEED)``, as for uploads that just arrived on disk) and warm;
(b) peak RSS of a streaming aggregation in a fresh subprocess (``ru_maxrss`` minus the value after imports),
    relative to the size of one float32 ``r_max`` adapter (target <= 3x, flat in K);
(c) ``flexlora`` factored (QR of the stacked factors + small SVD) versus a dense reference (form the ``d_out x d_in``
    weighted sum, dense SVD of it, transposed when wide) on the same input, for the modules of one layer; the
    whole-model figures are that layer's times x the number of layers (all layers have the same shapes).

Usage::

    python benchmarks/bench_aggregation.py --clients 4 16 64 --out runs/bench_aggregation
    python benchmarks/bench_aggregation.py --quick          # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

from peft_hetlora.federated.adapter import update_norm  # noqa: E402
from peft_hetlora.federated.aggregation import ClientUpdate, StreamingAggregator, aggregate  # noqa: E402

LLAMA_1B = {"hidden": 2048, "intermediate": 8192, "kv_dim": 512, "layers": 16}
QUICK = {"hidden": 256, "intermediate": 1024, "kv_dim": 64, "layers": 2}
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILE = "adapter_model.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def module_shapes(arch: dict) -> dict[str, tuple[int, int]]:
    """Module name (PEFT saved format) -> (d_out, d_in) for q/k/v/o/gate/up/down of every layer."""
    h, i, kv = arch["hidden"], arch["intermediate"], arch["kv_dim"]
    dims = {
        "q_proj": (h, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, h),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }
    shapes = {}
    for layer in range(arch["layers"]):
        for mod in MODULES:
            block = "mlp" if mod in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            shapes[f"base_model.model.model.layers.{layer}.{block}.{mod}"] = dims[mod]
    return shapes


def client_ranks(num: int, r_min: int, r_max: int) -> list[int]:
    """Ranks spread over [r_min, r_max]: client 0 at r_max, client 1 at r_min, then a golden-ratio sequence, so
    every prefix (K = 4, 16, 64 use the first K clients) covers the range evenly."""
    ranks = []
    for k in range(num):
        if k < 2:
            ranks.append(r_max if k == 0 else r_min)
        else:
            frac = (k * 0.6180339887498949) % 1.0
            ranks.append(r_min + round(frac * (r_max - r_min)))
    return ranks


def adapter_bytes(shapes: dict[str, tuple[int, int]], rank: int) -> int:
    return sum(rank * (d_out + d_in) * 4 for d_out, d_in in shapes.values())


def client_dir(root: Path, k: int) -> Path:
    return root / "rounds" / "0" / "clients" / f"client-{k:03d}"


def write_clients(root: Path, shapes: dict, ranks: list[int], seed: int) -> list[Path]:
    paths = []
    for k, rank in enumerate(tqdm(ranks, desc="write client files", unit="client")):
        folder = client_dir(root, k)
        path = folder / ADAPTER_FILE
        paths.append(path)
        if path.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(seed + k)
        sd = {}
        for name, (d_out, d_in) in shapes.items():
            sd[f"{name}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)
            sd[f"{name}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 1e-2
        tmp = folder / (ADAPTER_FILE + ".tmp")
        save_file(sd, str(tmp))
        os.replace(tmp, path)
        meta = {
            "client_id": f"client-{k:03d}",
            "round": 0,
            "rank_in": rank,
            "rank_out": rank,
            "num_examples": 100 + 10 * k,
        }
        (folder / "client.json").write_text(json.dumps(meta))
    os.sync()  # clean pages, so that evict() can drop them
    return paths


def read_meta(path: Path) -> dict:
    return json.loads((path.parent / "client.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# Page cache control and prefetch
# ---------------------------------------------------------------------------------------------------------------


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache (clean pages only; the files were fsynced)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _readahead(path: Path, chunk: int = 4 << 20) -> None:
    """Ask the kernel to read the whole file into the page cache asynchronously (no copy into this process);
    one ``POSIX_FADV_WILLNEED`` call per chunk, since the kernel caps the readahead of a single call."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for offset in range(0, size, chunk):
            os.posix_fadvise(fd, offset, min(chunk, size - offset), os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


class Prefetcher:
    """Starts the read of file i+1 (kernel readahead, in a background thread) while file i is processed."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.thread: threading.Thread | None = None

    def before(self, i: int) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if i + 1 < len(self.paths):
            self.thread = threading.Thread(target=_readahead, args=(self.paths[i + 1],), daemon=True)
            self.thread.start()

    def close(self) -> None:
        if self.thread is not None:
            self.thread.join()


# ---------------------------------------------------------------------------------------------------------------
# (a) read vs aggregate
# ---------------------------------------------------------------------------------------------------------------


def read_only(paths: list[Path]) -> float:
    pre = Prefetcher(paths)
    total = 0.0
    for i, path in enumerate(paths):
        pre.before(i)
        sd = load_file(str(path))
        for tensor in sd.values():
            total += float(tensor.sum())  # touch every byte once
        del sd
    pre.close()
    return total


def stream_aggregate(paths: list[Path], r_max: int, scaling: float, method: str = "hetlora"):
    agg = StreamingAggregator(method, r_max, scaling)
    pre = Prefetcher(paths)
    for i, path in enumerate(paths):
        pre.before(i)
        meta = read_meta(path)
        sd = load_file(str(path))
        agg.add(ClientUpdate(meta["client_id"], sd, meta["rank_out"], meta["num_examples"]))
        del sd
    pre.close()
    return agg.result()


def norms_only(paths: list[Path], scaling: float) -> float:
    """What the sparsity weights alone cost: load every file and compute its update norm (two Grams per module)."""
    pre = Prefetcher(paths)
    total = 0.0
    for i, path in enumerate(paths):
        pre.before(i)
        total += update_norm(load_file(str(path)), scaling)
    pre.close()
    return total


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def bench_read_vs_aggregate(paths: list[Path], r_max: int, scaling: float, repeats: int) -> dict:
    out = {}
    for cache in ("cold", "warm"):
        reads, aggs = [], []
        if cache == "warm":
            read_only(paths)  # populate the page cache
        for _ in tqdm(range(repeats), desc=f"  (a) K={len(paths)} {cache}", leave=False):
            if cache == "cold":
                evict(paths)
            reads.append(timed(read_only, paths))
            if cache == "cold":
                evict(paths)
            aggs.append(timed(stream_aggregate, paths, r_max, scaling))
        read_s, agg_s = min(reads), min(aggs)
        out[cache] = {
            "read_s": read_s,
            "aggregate_s": agg_s,
            "ratio": agg_s / read_s,
            "read_runs": reads,
            "aggregate_runs": aggs,
        }
    out["warm"]["norms_only_s"] = min(timed(norms_only, paths, scaling) for _ in range(repeats))
    return out


# ---------------------------------------------------------------------------------------------------------------
# (b) peak RSS in a fresh process
# ---------------------------------------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_child(root: Path, num: int, r_max: int, scaling: float) -> None:
    """Entry point of the subprocess: print the RSS after imports and the peak RSS after one streaming aggregation,
    in bytes. Linux: VmRSS / VmHWM of /proc/self/status, with the high-water mark reset after imports
    (``clear_refs`` 5); ``ru_maxrss`` is not used because Linux carries it over from the parent across exec."""
    paths = [client_dir(root, k) / ADAPTER_FILE for k in range(num)]
    base = _proc_status_bytes("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass  # VmHWM then includes import-time peaks: the delta can only be overestimated
    if base is None:  # not Linux
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = stream_aggregate(paths, r_max, scaling)
    peak = _proc_status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out_bytes = sum(t.numel() * t.element_size() for t in res.state_dict.values())
    print(json.dumps({"baseline_bytes": base, "peak_bytes": peak, "result_bytes": out_bytes}))


def bench_peak_rss(root: Path, num: int, r_max: int, scaling: float, threads: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--rss-child",
        str(num),
        "--root",
        str(root),
        "--r-max",
        str(r_max),
        "--scaling",
        str(scaling),
        "--threads",
        str(threads),
    ]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# (c) flexlora factored vs dense SVD
# ---------------------------------------------------------------------------------------------------------------


def load_subset(paths: list[Path], names: list[str]) -> list[ClientUpdate]:
    updates = []
    for path in paths:
        meta = read_meta(path)
        sd = {}
        with safe_open(str(path), framework="pt") as handle:
            for name in names:
                for key in (f"{name}.lora_A.weight", f"{name}.lora_B.weight"):
                    sd[key] = handle.get_tensor(key).clone()
        updates.append(ClientUpdate(meta["client_id"], sd, meta["rank_out"], meta["num_examples"]))
    return updates


def dense_flexlora(updates: list[ClientUpdate], name: str, r_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: dense W = sum_k (n_k / N) B_k A_k, SVD (of W^T when wide), top r_max: B = U S, A = V^T."""
    total = sum(u.num_examples for u in updates)
    b_cat = torch.cat([u.state_dict[f"{name}.lora_B.weight"] * (u.num_examples / total) for u in updates], dim=1)
    a_cat = torch.cat([u.state_dict[f"{name}.lora_A.weight"] for u in updates], dim=0)
    dense = b_cat @ a_cat
    if dense.shape[0] >= dense.shape[1]:
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    else:
        v, s, uh = torch.linalg.svd(dense.T, full_matrices=False)
        u, vh = uh.T, v.T
    return u[:, :r_max] * s[:r_max], vh[:r_max]


def bench_flexlora(paths: list[Path], names: list[str], r_max: int, layers: int) -> dict:
    updates = load_subset(paths, names)
    start = time.perf_counter()
    res = aggregate(updates, method="flexlora", r_max=r_max)
    factored_s = time.perf_counter() - start
    dense_s, errors, sv_errors = 0.0, [], []
    for name in tqdm(names, desc=f"  (c) K={len(paths)} dense SVD", leave=False):
        start = time.perf_counter()
        b_ref, a_ref = dense_flexlora(updates, name, r_max)
        dense_s += time.perf_counter() - start
        prod_ref = b_ref @ a_ref
        prod = res.state_dict[f"{name}.lora_B.weight"] @ res.state_dict[f"{name}.lora_A.weight"]
        errors.append(float(torch.linalg.norm(prod - prod_ref) / torch.linalg.norm(prod_ref)))
        sv_ref = torch.linalg.norm(b_ref, dim=0)  # B = U S: column norms are the singular values
        sv = torch.linalg.norm(res.state_dict[f"{name}.lora_B.weight"], dim=0)[: sv_ref.shape[0]]
        sv_errors.append(float((sv - sv_ref).abs().max() / sv_ref[0]))
    stacked = sum(u.rank for u in updates)
    return {
        "modules": len(names),
        "stacked_rank": stacked,
        "factored_s": factored_s,
        "dense_s": dense_s,
        "speedup": dense_s / factored_s,
        "factored_model_s": factored_s * layers,
        "dense_model_s": dense_s * layers,
        "max_rel_error": max(errors),
        "max_sv_error": max(sv_errors),
    }


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"Shapes: {cfg['shapes']}; r_max {cfg['r_max']}; client ranks {cfg['r_min']}..{cfg['r_max']} "
        f"(clients 0..K-1 of {cfg['ranks']}); one float32 r_max adapter = {cfg['adapter_mb']:.1f} MB; "
        f"torch threads {cfg['threads']}; {cfg['machine']}; load average {cfg['loadavg_start']} at the start, "
        f"{cfg['loadavg_end']} at the end.",
        "",
        "(a) read only (safetensors load_file + one pass over every tensor) vs streaming hetlora aggregation of the "
        "same files (load_file + StreamingAggregator.add per client, then result()); both start the kernel "
        "readahead of the next file while one is processed; "
        f"best of {cfg['repeats']} runs. Cold: files evicted from the page cache before each run "
        "(read from disk); warm: files in the page cache. 'norms only': load + update_norm per client (the two "
        "r x r Gram matrices per module behind the sparsity weights). (b) peak RSS (VmHWM) of the aggregation in a "
        "fresh process minus its RSS after imports.",
        "",
        "| K | data (MB) | cold read (s) | cold aggregate (s) | cold ratio | warm read (s) | warm aggregate (s) "
        "| warm ratio | warm norms only (s) | peak RSS (MB) | peak / adapter |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        a, rss = row["read_vs_aggregate"], row["peak_rss"]
        lines.append(
            f"| {row['clients']} | {row['data_mb']:.0f} | {a['cold']['read_s']:.2f} | {a['cold']['aggregate_s']:.2f} "
            f"| {a['cold']['ratio']:.2f}x | {a['warm']['read_s']:.2f} | {a['warm']['aggregate_s']:.2f} "
            f"| {a['warm']['ratio']:.2f}x | {a['warm']['norms_only_s']:.2f} | {rss['delta_mb']:.0f} "
            f"| {rss['ratio']:.2f}x |"
        )
    if report["flexlora"]:
        lines += [
            "",
            f"(c) flexlora on the {report['flexlora'][0]['modules']} modules of layer 0 (measured, one run each), and "
            f"x{cfg['layers']} layers for the whole model (extrapolated: every layer has the same shapes). Dense "
            "reference: form W = sum_k w_k B_k A_k (d_out x d_in), torch.linalg.svd of W (of W^T when wide, the "
            "faster way round), top r_max. Errors: ||B A - B_ref A_ref||_F / ||B_ref A_ref||_F and max |sigma - "
            "sigma_ref| / sigma_ref[0] over the top r_max singular values.",
            "",
            "| K | stacked rank | factored (s) | dense SVD (s) | speedup | model factored (s, extrap.) "
            "| model dense (s, extrap.) | product rel. error | singular value error |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in report["flexlora"]:
            lines.append(
                f"| {row['clients']} | {row['stacked_rank']} | {row['factored_s']:.2f} | {row['dense_s']:.2f} "
                f"| {row['speedup']:.1f}x | {row['factored_model_s']:.1f} | {row['dense_model_s']:.1f} "
                f"| {row['max_rel_error']:.1e} | {row['max_sv_error']:.1e} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16, 64], help="numbers of clients K")
    parser.add_argument(
        "--flex-clients",
        type=int,
        nargs="*",
        default=None,
        help="K values for the flexlora comparison (default: --clients)",
    )
    parser.add_argument("--flex-modules", nargs="*", default=list(MODULES), help="layer-0 modules for (c)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and K, a smoke run in seconds")
    parser.add_argument("--r-max", type=int, default=None, help="global rank (default 64; 16 with --quick)")
    parser.add_argument("--r-min", type=int, default=4)
    parser.add_argument("--scaling", type=float, default=0.5, help="lora_alpha / r_max")
    parser.add_argument("--repeats", type=int, default=2, help="timing runs per measurement; the best is reported")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 by default: on a shared 2-core machine OpenMP barriers stall)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the client files (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the client files")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_aggregation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.rss_child is not None:
        rss_child(args.root, args.rss_child, args.r_max, args.scaling)
        return

    arch = QUICK if args.quick else LLAMA_1B
    r_max = args.r_max or (16 if args.quick else 64)
    clients = [2, 4] if args.quick and args.clients == [4, 16, 64] else args.clients
    flex_clients = clients if args.flex_clients is None else args.flex_clients
    shapes = module_shapes(arch)
    ranks = client_ranks(max(clients + flex_clients), min(args.r_min, r_max), r_max)
    one_adapter = adapter_bytes(shapes, r_max)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_aggregation_"))
    report = {
        "config": {
            "shapes": "tiny (--quick)"
            if args.quick
            else "Llama-3.2-1B (hidden 2048, intermediate 8192, kv 512, 16 layers, q/k/v/o/gate/up/down)",
            "layers": arch["layers"],
            "r_max": r_max,
            "r_min": args.r_min,
            "ranks": ranks,
            "adapter_mb": one_adapter / 1e6,
            "threads": args.threads,
            "repeats": args.repeats,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            "loadavg_start": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        },
        "rows": [],
        "flexlora": [],
    }
    try:
        paths = write_clients(workdir, shapes, ranks, args.seed)
        for num in tqdm(clients, desc="(a)+(b) clients"):
            subset = paths[:num]
            timing = bench_read_vs_aggregate(subset, r_max, args.scaling, args.repeats)
            rss = bench_peak_rss(workdir, num, r_max, args.scaling, args.threads)
            delta = rss["peak_bytes"] - rss["baseline_bytes"]
            rss.update({"delta_mb": delta / 1e6, "ratio": delta / one_adapter})
            data = sum(adapter_bytes(shapes, r) for r in ranks[:num])
            report["rows"].append(
                {"clients": num, "data_mb": data / 1e6, "read_vs_aggregate": timing, "peak_rss": rss}
            )
        names = [n for n in shapes if ".layers.0." in n and n.rsplit(".", 1)[-1] in args.flex_modules]
        for num in tqdm(flex_clients, desc="(c) flexlora"):
            row = bench_flexlora(paths[:num], names, r_max, arch["layers"])
            report["flexlora"].append({"clients": num, **row})
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    report["config"]["loadavg_end"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    table = markdown(report)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "aggregation.json").write_text(json.dumps(report, indent=2))
    (args.out / "aggregation.md").write_text(f"Command: `{report['config']['command']}`\n\n{table}")
    print(f"wrote {args.out / 'aggregation.json'} and {args.out / 'aggregation.md'}")


if __name__ == "__main__":
    main()
