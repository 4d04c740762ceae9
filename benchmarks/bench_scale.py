"""The server's aggregation at scale: method x K x r_max on Llama-3.2-1B adapter shapes (issue 25).

One command produces the table (JSON + markdown + a PNG of time and peak RSS against K per method)::

    python benchmarks/bench_scale.py --clients 16 128 1024 --r-max 16 64 --layers 1
    python benchmarks/bench_scale.py --quick          # tiny shapes, K = 8 / 32, seconds

Inputs: a synthetic federation per (shapes, layers, r_max), written once into ``runs/scale_cache/`` and reused: a
`LocalStore` whose global 0 was published by ``Coordinator.init`` (federation.json, round.json with every client
and its rank) and one upload per client put there by ``LocalStore.upload_client`` (``adapter_model.safetensors`` +
``client.json``, exactly what the coordinator reads). Client ranks follow the tiers mix 10:6:4 at ranks
``r_max/8``, ``3 r_max/8`` and ``r_max`` (2 / 6 / 16 at r_max 16), interleaved so that every prefix of K clients
has the mix. An upload is the global it was sent, truncated to its rank, plus noise (what local training does).

Each cell (method, K, r_max) runs in a fresh subprocess, in this order:

1. peak RSS: ``VmHWM`` reset after imports and after loading the previous global, then one streaming aggregation
   from a cold page cache (``load_file`` + ``StreamingAggregator.add`` per client, then ``result()``, the
   previous global passed as the coordinator passes it); peak minus the RSS before it;
2. its time ("cold aggregate"), then in the same process the read floor: ``load_file`` of the same files plus one
   pass over every tensor, cold (files evicted from the page cache with ``posix_fadvise(DONTNEED)``) and warm,
   and the aggregation again warm. Ratios are taken in the same process: the machine is shared and noisy;
3. error against the exact method, float64 and independent of the library: ``flexlora`` / ``flexlora_held``
   against the dense SVD of ``W = sum_k p_k B_k A_k`` (held: plus ``B_prev[:, r_k:] A_prev[r_k:]``) on the
   modules of layer 0 with ``d_out * d_in <= --exact-max-elems`` (always; these need only the data weights);
   ``hetlora`` / ``rankwise`` / ``component`` against a float64 recomputation of their weighted sums (sparsity
   weights from every module's ``||s B_k A_k||_F``), when ``K <= --exact-max-k``.

A cell already in the JSON is skipped (resume); ``--force`` redoes them. Progress with an ETA goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from peft_hetlora.federated import (  # noqa: E402
    ClientUpdate,
    Coordinator,
    LocalStore,
    StreamingAggregator,
)

LLAMA_1B = {"name": "llama-3.2-1b", "hidden": 2048, "intermediate": 8192, "kv_dim": 512, "layers": 16}
TINY = {"name": "tiny", "hidden": 64, "intermediate": 256, "kv_dim": 16, "layers": 2}
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("flexlora_held", "flexlora", "rankwise", "component", "hetlora")
VARIANTS = {"flexlora_held-sketch": ("flexlora_held", {"svd": "sketch"}),
            "flexlora-sketch": ("flexlora", {"svd": "sketch"})}
"""Benchmark-only variants (``--methods`` accepts them): the FlexLoRA methods with ``svd="sketch"``, the one-pass
sketch from the first client (approximate at every K, so not in the default list that is checked against exact)."""
ORDER = METHODS + tuple(VARIANTS)


def _base_method(method: str) -> str:
    """The registered method a benchmark name runs (registering a :data:`VARIANTS` entry on first use)."""
    if method not in VARIANTS:
        return method
    from peft_hetlora.federated.aggregation.methods import AGGREGATION_METHODS, get_aggregation, register_aggregation

    base, options = VARIANTS[method]
    if method not in AGGREGATION_METHODS:
        register_aggregation(method, type(get_aggregation(base))(**options))
    return base
TIER_SHARES = (10, 6, 4)  # clients per tier, of 20
ADAPTER_FILE = "adapter_model.safetensors"
CLIENT_FILE = "client.json"
LORA_ALPHA = 16


# --------------------------------------------------------------------------------------------------- inputs
def module_dims(arch: dict, layers: int) -> dict[str, tuple[int, int]]:
    """PEFT module name -> (d_out, d_in) for q/k/v/o/gate/up/down of ``layers`` layers.

    Example:
        >>> dims = module_dims(LLAMA_1B, 1)
        >>> len(dims), dims["base_model.model.model.layers.0.self_attn.k_proj"]
        (7, (512, 2048))
    """
    h, i, kv = arch["hidden"], arch["intermediate"], arch["kv_dim"]
    per = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
           "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    out = {}
    for layer in range(layers):
        for mod in MODULES:
            block = "mlp" if mod in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            out[f"base_model.model.model.layers.{layer}.{block}.{mod}"] = per[mod]
    return out


def tier_ranks(r_max: int) -> tuple[int, int, int]:
    """The three tiers' ranks scaled from 2 / 6 / 16 at r_max 16.

    Example:
        >>> tier_ranks(16), tier_ranks(64)
        ((2, 6, 16), (8, 24, 64))
    """
    return max(1, r_max // 8), max(1, 3 * r_max // 8), r_max


def client_ranks(num: int, r_max: int) -> list[int]:
    """Ranks of clients 0..num-1, the tiers mix 10:6:4 interleaved (largest remainder), so every prefix has it.

    Example:
        >>> ranks = client_ranks(20, 16)
        >>> [ranks.count(r) for r in (2, 6, 16)]
        [10, 6, 4]
    """
    tiers, counts, out = tier_ranks(r_max), [0, 0, 0], []
    total = sum(TIER_SHARES)
    for k in range(num):
        gaps = [share * (k + 1) / total - counts[i] for i, share in enumerate(TIER_SHARES)]
        best = max(range(3), key=lambda i: gaps[i])
        counts[best] += 1
        out.append(tiers[best])
    return out


def client_id(k: int) -> str:
    return f"c{k:05d}"


def adapter_bytes(dims: dict[str, tuple[int, int]], rank: int) -> int:
    return sum(rank * (d_out + d_in) * 4 for d_out, d_in in dims.values())


def cache_dir(root: Path, arch: dict, layers: int, r_max: int, k_max: int) -> Path:
    """An existing cache with at least ``k_max`` clients of these shapes, else the folder for a new one."""
    stem = f"{arch['name']}-L{layers}-r{r_max}-K"
    if root.is_dir():
        have = sorted((int(p.name[len(stem):]), p) for p in root.iterdir()
                      if p.name.startswith(stem) and p.name[len(stem):].isdigit())
        for size, path in have:
            if size >= k_max:
                return path
    return root / f"{stem}{k_max}"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Eta:
    """Progress with an ETA on stderr (done / total items, elapsed, estimated time left)."""

    def __init__(self, total: float, what: str) -> None:
        self.total, self.what, self.done, self.start, self.last = total, what, 0.0, time.time(), 0.0

    def step(self, amount: float = 1.0, note: str = "") -> None:
        self.done += amount
        now = time.time()
        if now - self.last < 2.0 and self.done < self.total:
            return
        self.last = now
        spent = now - self.start
        left = spent / self.done * (self.total - self.done) if self.done else float("nan")
        _say(f"[{self.what}] {self.done:.0f}/{self.total:.0f}  elapsed {spent:.0f}s  ETA {left:.0f}s  {note}")


def build_cache(folder: Path, arch: dict, layers: int, r_max: int, k_max: int, seed: int = 0) -> LocalStore:
    """Write (once) the federation and the uploads of ``k_max`` clients; returns its store."""
    dims = module_dims(arch, layers)
    ranks = client_ranks(k_max, r_max)
    store = LocalStore(folder, create=True)
    ids = [client_id(k) for k in range(k_max)]
    if store.latest_global() is None:
        gen = torch.Generator().manual_seed(seed)
        sd = {}
        for name, (d_out, d_in) in dims.items():
            sd[f"{name}.lora_A.weight"] = torch.randn(r_max, d_in, generator=gen) / math.sqrt(d_in)
            sd[f"{name}.lora_B.weight"] = torch.randn(d_out, r_max, generator=gen) * 1e-2
        config = {"peft_type": "HETLORA", "r": r_max, "rank": r_max, "r_min": tier_ranks(r_max)[0],
                  "lora_alpha": LORA_ALPHA, "rank_scaling": "fixed", "base_model_name_or_path": "synthetic/llama",
                  "target_modules": list(MODULES)}
        coord = Coordinator(store, method="flexlora_held", r_max=r_max, r_min=tier_ranks(r_max)[0], clients=ids,
                            rank_policy=dict(zip(ids, ranks)), clients_per_round=k_max, rounds=1, seed=seed,
                            progress=False)
        coord.init(state_dict=sd, adapter_config=config)
    glob = store.get_global(0)
    previous = load_file(str(Path(glob.path) / ADAPTER_FILE))
    done = set(store.list_client_uploads(0))
    todo = [k for k in range(k_max) if ids[k] not in done]
    if todo:
        eta = Eta(len(todo), f"write uploads {folder.name}")
        staging = folder.parent / f".staging-{folder.name}"
        staging.mkdir(parents=True, exist_ok=True)
        for k in todo:
            cid, rank = ids[k], ranks[k]
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{cid}".encode()))
            out = {}
            for name, (d_out, d_in) in dims.items():
                a, b = previous[f"{name}.lora_A.weight"], previous[f"{name}.lora_B.weight"]
                out[f"{name}.lora_A.weight"] = (a[:rank] + torch.randn(rank, d_in, generator=gen)
                                                / math.sqrt(d_in)).contiguous()
                out[f"{name}.lora_B.weight"] = (b[:, :rank] + 1e-2 * torch.randn(d_out, rank, generator=gen)
                                                ).contiguous()
            save_file(out, str(staging / ADAPTER_FILE))
            meta = {"client_id": cid, "round": 0, "rank_in": rank, "rank_out": rank,
                    "num_examples": 100 + zlib.crc32(cid.encode()) % 400, "global_revision": glob.revision}
            (staging / CLIENT_FILE).write_text(json.dumps(meta))
            store.upload_client(0, cid, staging)
            eta.step()
        for name in (ADAPTER_FILE, CLIENT_FILE):
            (staging / name).unlink(missing_ok=True)
        staging.rmdir()
        os.sync()  # clean pages, so that evict() can drop them
    return store


# ------------------------------------------------------------------------------------------- measuring
def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
    except OSError:
        pass  # elsewhere the peak includes what came before: only ever overestimated


def _peak() -> int:
    return _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache (clean pages only: the cache was synced when written)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_floor(paths: list[Path]) -> float:
    """Only reading the files: load every tensor and touch every byte once."""
    total = 0.0
    for path in paths:
        for tensor in load_file(str(path)).values():
            total += float(tensor.sum())
    return total


def aggregate_files(method: str, paths: list[Path], metas: list[dict], r_max: int, scaling: float,
                    previous: dict[str, torch.Tensor], clip_norm: str | float | None = "adaptive"):
    """The streaming aggregation as the round runs it (``round.close_round``): one pass, each file read once
    (``load_file``), observed and added (``StreamingAggregator(one_pass=True)``); if ``settle()`` finds a client
    the weight cap or the adaptive bound changes, two more passes (observe every file, then add every file). The
    influence bound is the engines' default (``"adaptive"``). Returns the result; ``aggregate_files.passes`` is
    how many times the files were read (1 or 3)."""
    def update(path: Path, meta: dict) -> ClientUpdate:
        return ClientUpdate(meta["client_id"], load_file(str(path)), rank=meta["rank_out"],
                            num_examples=meta["num_examples"])

    one = StreamingAggregator(method, r_max, scaling, previous=previous, clip_norm=clip_norm, one_pass=True)
    for path, meta in zip(paths, metas):
        one.add(update(path, meta))
    if one.settle():
        aggregate_files.passes = 1
        return one.result()
    agg = StreamingAggregator(method, r_max, scaling, previous=previous, clip_norm=clip_norm)
    for path, meta in zip(paths, metas):
        agg.observe(update(path, meta))
    for path, meta in zip(paths, metas):
        agg.add(update(path, meta))
    aggregate_files.passes = 3
    return agg.result()


aggregate_files.passes = 0


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


# ---------------------------------------------------------------------------- float64 references
def _factors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(str(path), framework="pt") as handle:
        for name in names:
            for part in ("lora_A", "lora_B"):
                out[f"{name}.{part}.weight"] = handle.get_tensor(f"{name}.{part}.weight").double()
    return out


def _dense_top(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def flex_errors(method: str, res, paths: list[Path], metas: list[dict], previous: dict, names: list[str],
                r_max: int) -> dict:
    """||B A - W_r||_F / ||W_r||_F and ||W - B A||_F / ||W - W_r||_F (1 = optimal) per module, W from float64."""
    sizes = torch.tensor([float(m["num_examples"]) for m in metas], dtype=torch.float64)
    weights = sizes / sizes.sum()  # the weight cap (10 x median) never binds on these sizes (100 .. 499)
    rel, opt = [], []
    for name in names:
        a0 = previous[f"{name}.lora_A.weight"].double()
        b0 = previous[f"{name}.lora_B.weight"].double()
        w = torch.zeros(b0.shape[0], a0.shape[1], dtype=torch.float64)
        for path, meta, p in zip(paths, metas, weights.tolist()):
            f = _factors(path, [name])
            a, b = f[f"{name}.lora_A.weight"], f[f"{name}.lora_B.weight"]
            w += p * (b @ a)
            r = meta["rank_out"]
            if method == "flexlora_held" and r < r_max:
                w += p * (b0[:, r:] @ a0[r:])
        best = _dense_top(w, r_max)
        got = res.state_dict[f"{name}.lora_B.weight"].double() @ res.state_dict[f"{name}.lora_A.weight"].double()
        rel.append(float(torch.linalg.norm(got - best) / torch.linalg.norm(best)))
        floor = float(torch.linalg.norm(w - best))
        if floor > 1e-9 * float(torch.linalg.norm(w)):  # else W has rank <= r_max: no truncation error to compare
            opt.append(float(torch.linalg.norm(w - got)) / floor)
    return {"modules": names, "max_rel_error": max(rel), "max_residual_ratio": max(opt) if opt else None}


def padded_errors(method: str, res, paths: list[Path], metas: list[dict], previous: dict, dims: dict,
                  names: list[str], r_max: int, scaling: float) -> dict:
    """hetlora: sum_k p_k pad(X_k); rankwise / component: component j averaged over the clients covering it
    (uncovered: previous). p_k proportional to S_k = ||s B_k A_k||_F over every module (float64 Gram traces)."""
    norms = []
    for path in paths:
        f = _factors(path, list(dims))
        sq = 0.0
        for name in dims:
            a, b = f[f"{name}.lora_A.weight"], f[f"{name}.lora_B.weight"]
            sq += float(torch.trace((b.T @ b) @ (a @ a.T)))
        norms.append(scaling * math.sqrt(sq))
    s = torch.tensor(norms, dtype=torch.float64)
    ranks = [m["rank_out"] for m in metas]
    errs = []
    for name in names:
        d_out, d_in = dims[name]
        num_a, num_b = torch.zeros(r_max, d_in, dtype=torch.float64), torch.zeros(d_out, r_max, dtype=torch.float64)
        den = torch.zeros(r_max, dtype=torch.float64)
        for path, r, sk in zip(paths, ranks, s.tolist()):
            f = _factors(path, [name])
            num_a[:r] += sk * f[f"{name}.lora_A.weight"]
            num_b[:, :r] += sk * f[f"{name}.lora_B.weight"]
            den[:r] += sk
        if method == "hetlora":
            ref_a, ref_b = num_a / s.sum(), num_b / s.sum()
        else:
            covered = den > 0
            ref_a = previous[f"{name}.lora_A.weight"].double().clone()
            ref_b = previous[f"{name}.lora_B.weight"].double().clone()
            ref_a[covered] = num_a[covered] / den[covered, None]
            ref_b[:, covered] = num_b[:, covered] / den[covered]
        for key, ref in ((f"{name}.lora_A.weight", ref_a), (f"{name}.lora_B.weight", ref_b)):
            errs.append(float(torch.linalg.norm(res.state_dict[key].double() - ref) / torch.linalg.norm(ref)))
    return {"modules": names, "max_rel_error": max(errs)}


# ------------------------------------------------------------------------------------------- one cell
def run_cell(folder: Path, method: str, num: int, exact_max_k: int, exact_max_elems: int) -> dict:
    """Entry point of the per-cell subprocess (see the module docstring); returns the cell's figures."""
    base_method = _base_method(method)
    store = LocalStore(folder)
    coord = Coordinator(store, progress=False)
    r_max, scaling = coord.r_max, coord.scaling
    ids = sorted(store.list_client_uploads(0))[:num]
    if len(ids) < num:
        raise SystemExit(f"{folder} holds {len(ids)} uploads, fewer than K={num}: rebuild the cache")
    folders = [Path(store.download_client(0, cid)) for cid in ids]
    paths = [f / ADAPTER_FILE for f in folders]
    metas = [json.loads((f / CLIENT_FILE).read_text()) for f in folders]
    previous = load_file(str(Path(store.get_global(0).path) / ADAPTER_FILE))
    dims = {name: (previous[f"{name}.lora_B.weight"].shape[0], previous[f"{name}.lora_A.weight"].shape[1])
            for name in sorted({k.rsplit(".lora_", 1)[0] for k in previous})}
    one_adapter = adapter_bytes(dims, r_max)

    evict(paths)
    base = _status_bytes("VmRSS") or 0
    _reset_peak()
    agg_cold, res = _timed(aggregate_files, method, paths, metas, r_max, scaling, previous)
    peak = _peak() - base
    evict(paths)
    read_cold, _ = _timed(read_floor, paths)
    read_warm, _ = _timed(read_floor, paths)
    agg_warm, res = _timed(aggregate_files, method, paths, metas, r_max, scaling, previous)
    cell = {
        "method": method, "clients": num, "r_max": r_max, "layers": len(dims) // len(MODULES),
        "data_mb": sum(p.stat().st_size for p in paths) / 1e6, "adapter_mb": one_adapter / 1e6,
        "aggregate_cold_s": agg_cold, "read_cold_s": read_cold, "ratio_cold": agg_cold / read_cold,
        "aggregate_warm_s": agg_warm, "read_warm_s": read_warm, "ratio_warm": agg_warm / read_warm,
        "peak_rss_mb": peak / 1e6, "peak_per_adapter": peak / one_adapter,
        "loadavg": list(os.getloadavg()), "passes": aggregate_files.passes,
    }
    layer0 = [n for n in dims if ".layers.0." in n]
    if base_method in ("flexlora", "flexlora_held"):
        cell["factorization"] = sorted({info["path"] for info in res.factorization.values()})
        names = [n for n in layer0 if dims[n][0] * dims[n][1] <= exact_max_elems]
        if names:
            start = time.perf_counter()
            cell["error"] = flex_errors(base_method, res, paths, metas, previous, names, r_max)
            cell["error"]["reference_s"] = time.perf_counter() - start
    elif num <= exact_max_k:
        names = [n for n in layer0 if dims[n][0] * dims[n][1] <= exact_max_elems]
        start = time.perf_counter()
        cell["error"] = padded_errors(method, res, paths, metas, previous, dims, names, r_max, scaling)
        cell["error"]["reference_s"] = time.perf_counter() - start
    return cell


def cell_key(cell: dict) -> str:
    return f"{cell['shapes']}|L{cell['layers']}|r{cell['r_max']}|{cell['method']}|K{cell['clients']}"


def spawn_cell(folder: Path, method: str, num: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", str(folder), "--cell-method", method,
           "--cell-clients", str(num), "--threads", str(args.threads), "--exact-max-k", str(args.exact_max_k),
           "--exact-max-elems", str(args.exact_max_elems)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cell {method} K={num} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    cells = sorted(report["cells"].values(), key=lambda c: (c["shapes"], c["layers"], c["r_max"],
                                                            ORDER.index(c["method"]) if c["method"] in ORDER
                                                            else 99, c["clients"]))
    lines = [
        "Every cell in a fresh process (`benchmarks/bench_scale.py`). *agg*: streaming aggregation as the round "
        "runs it, since issue 25's one-pass round (the cells the header names as rerun after it): load_file + "
        "`StreamingAggregator.add` with `one_pass=True` per client under the engines' adaptive influence bound, "
        "then `settle()` + `result()`; *reads* 1, or 3 when someone was capped or clipped (two more passes); upload "
        "validation (header, sha256) not included. Older cells: no bound, data-weighted methods first `observe` "
        "every file (*reads* 2; hetlora / rankwise / component 1). *read*: load_file + one pass over every tensor of "
        "the "
"same files; cold = evicted from the page cache, warm = cached; ratios taken in the same process. *peak*: "
        "VmHWM of the aggregation minus the RSS before it; *x adapter*: peak / one float32 r_max adapter of the "
        "same shapes; *flat*: peak / the same method's peak at the smallest K. *error*: flexlora / flexlora_held: "
        "max over layer-0 modules of ||BA - W_r||_F / ||W_r||_F against a float64 dense SVD (and, in brackets, "
        "||W - BA|| / ||W - W_r||, 1 = optimal); others: max relative error of the factors against a float64 "
        "recomputation; '-' = not computed (K above --exact-max-k).",
        "",
        "| shapes | layers | r_max | method | K | data (MB) | agg cold (s) | read cold (s) | cold ratio "
        "| agg warm (s) | read warm (s) | warm ratio | peak (MB) | x adapter | flat | error | load avg | reads |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    smallest: dict[tuple, float] = {}
    for c in cells:
        key = (c["shapes"], c["layers"], c["r_max"], c["method"])
        smallest.setdefault(key, c["peak_rss_mb"])
        err = c.get("error")
        if err is None:
            err_text = "-"
        elif err.get("max_residual_ratio") is not None:
            err_text = f"{err['max_rel_error']:.1e} ({err['max_residual_ratio']:.3f})"
        else:
            err_text = f"{err['max_rel_error']:.1e}"
        # a tiny cell's peak can read 0 MB (below the RSS resolution): no ratio then
        flat = f"{c['peak_rss_mb'] / smallest[key]:.2f}x" if smallest[key] > 0 else "-"
        lines.append(
            f"| {c['shapes']} | {c['layers']} | {c['r_max']} | {c['method']} | {c['clients']} | {c['data_mb']:.0f} "
            f"| {c['aggregate_cold_s']:.2f} | {c['read_cold_s']:.2f} | {c['ratio_cold']:.2f}x "
            f"| {c['aggregate_warm_s']:.2f} | {c['read_warm_s']:.2f} | {c['ratio_warm']:.2f}x "
            f"| {c['peak_rss_mb']:.0f} | {c['peak_per_adapter']:.2f} | {flat} "
            f"| {err_text} | {c['loadavg'][0]:.1f} | {c.get('passes', '-')} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for c in report["cells"].values():
        groups.setdefault((c["shapes"], c["layers"], c["r_max"]), []).append(c)
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
    for row, (group, cells) in enumerate(sorted(groups.items())):
        for method in ORDER:
            mine = sorted((c for c in cells if c["method"] == method), key=lambda c: c["clients"])
            if not mine:
                continue
            ks = [c["clients"] for c in mine]
            axes[row][0].plot(ks, [c["aggregate_cold_s"] for c in mine], marker="o", label=method)
            axes[row][1].plot(ks, [c["peak_rss_mb"] for c in mine], marker="o", label=method)
        reads = {}
        for c in cells:
            reads.setdefault(c["clients"], []).append(c["read_cold_s"])
        ks = sorted(reads)
        axes[row][0].plot(ks, [min(reads[k]) for k in ks], "k--", label="cold read (floor)")
        title = f"{group[0]}, {group[1]} layer(s), r_max {group[2]}"
        axes[row][0].set(xscale="log", yscale="log", xlabel="K clients", ylabel="aggregation, cold (s)", title=title)
        axes[row][1].set(xscale="log", xlabel="K clients", ylabel="peak RSS (MB)", title=title)
        axes[row][0].legend(fontsize=7)
        axes[row][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 128, 1024], help="K values")
    parser.add_argument("--r-max", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--layers", type=int, default=None, help="layers (same module shapes); default 16")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, K = 8 / 32, r_max 16")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "scale_cache")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="folder for scale.json / scale.md / scale.png")
    parser.add_argument("--name", default="scale", help="file stem of the outputs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell (1: shared 2-core machine)")
    parser.add_argument("--exact-max-k", type=int, default=128, help="largest K checked against exact (padded)")
    parser.add_argument("--exact-max-elems", type=int, default=512 * 2048,
                        help="largest d_out * d_in of a layer-0 module checked against the exact method")
    parser.add_argument("--force", action="store_true", help="redo cells already in the JSON")
    parser.add_argument("--cache-clients", type=int, default=0,
                        help="write the cache for at least this many clients (so later runs at larger K reuse it)")
    parser.add_argument("--cell", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cell-method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cell-clients", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.cell is not None:
        print(json.dumps(run_cell(args.cell, args.cell_method, args.cell_clients, args.exact_max_k,
                                  args.exact_max_elems)))
        return

    arch = TINY if args.quick else LLAMA_1B
    layers = args.layers or arch["layers"]
    clients = [8, 32] if args.quick and args.clients == [16, 128, 1024] else sorted(args.clients)
    r_maxes = [16] if args.quick and args.r_max == [16, 64] else args.r_max
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{args.name}.json"
    report = json.loads(json_path.read_text()) if json_path.exists() else {"cells": {}}
    report["machine"] = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                         f"Python {platform.python_version()}")
    todo = []
    for r_max in r_maxes:
        for num in clients:  # every method at a K before the next K: a stopped run compares methods
            for method in args.methods:
                key = f"{arch['name']}|L{layers}|r{r_max}|{method}|K{num}"
                if args.force or key not in report["cells"]:
                    todo.append((r_max, method, num, key))
    _say(f"{len(todo)} cell(s) to run, {sum(len(clients) * len(args.methods) for _ in r_maxes) - len(todo)} "
         f"already in {json_path}")
    # cost of a cell ~ the data it reads; the ETA weighs cells by K * r_max
    eta = Eta(sum(num * r for r, _, num, _ in todo) or 1, "cells")
    for r_max in r_maxes:
        mine = [t for t in todo if t[0] == r_max]
        if not mine:
            continue
        k_cache = max(*clients, args.cache_clients)
        folder = cache_dir(args.cache, arch, layers, r_max, k_cache)
        build_cache(folder, arch, layers, r_max, max(k_cache, _cached_size(folder)))
        for _, method, num, key in mine:
            cell = spawn_cell(folder, method, num, args)
            cell["shapes"] = arch["name"]
            report["cells"][key] = cell
            json_path.write_text(json.dumps(report, indent=1))  # resume point
            eta.step(num * r_max, f"{method} r{r_max} K={num}: agg {cell['aggregate_cold_s']:.1f}s, "
                                  f"cold ratio {cell['ratio_cold']:.2f}, peak {cell['peak_rss_mb']:.0f} MB")
    table = markdown(report)
    (args.out / f"{args.name}.md").write_text(
        f"Command: `python benchmarks/bench_scale.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
        f"{report['machine']}.\n\n{table}")
    plot(report, args.out / f"{args.name}.png")
    print(table)


def _cached_size(folder: Path) -> int:
    stem = folder.name.rsplit("-K", 1)
    return int(stem[1]) if len(stem) == 2 and stem[1].isdigit() else 0


if __name__ == "__main__":
    main()
