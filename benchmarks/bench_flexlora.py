"""Benchmark FlexLoRA's randomised top-``r_max`` SVD against the dense SVD and the exact factored path (CPU).

The case of issue 13: K = 64 clients at r_max = 64 on Llama-3.2-1B shapes (2048 x 2048 attention, 8192 x 2048
MLP), where the stacked rank ``sum_k r_k`` (2196 with the ranks of ``bench_aggregation.py``) exceeds
``min(d_out, d_in) = 2048``, so the exact factored path (two QRs + an SVD of the core) is no cheaper than the dense
SVD. All three run in one process on the same in-memory client factors (Gaussian, data-size weights):

* dense: form ``W = sum_k p_k B_k A_k`` (``d_out x d_in``) and ``torch.linalg.svd`` it (of ``W^T`` when wide);
* exact: ``FlexLoRA(svd="exact")``'s ``FactorStack`` (stacking + QRs + core SVD);
* randomized: ``FlexLoRA(svd="randomized")`` (what ``"auto"`` picked here before issue 25; it now folds into the
  one-pass sketch): a range finder with oversampling 16 and 2 power iterations, applied through the factors
  (Halko, Martinsson & Tropp 2011, arXiv 0909.4061).

Errors: ``||W - B A||_2 / sigma_{r_max+1}(W)`` (1 is the best any rank-``r_max`` factorisation can do; from the
eigenvalues of the residual's ``d_in x d_in`` Gram in float64) and the top-``r_max`` singular values against the dense
SVD's.

Usage::

    python benchmarks/bench_flexlora.py --out runs/bench_flexlora      # K = 64, r_max = 64, both shapes
    python benchmarks/bench_flexlora.py --quick                        # tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from bench_aggregation import client_ranks  # noqa: E402

from peft_hetlora.federated.aggregation.methods.flexlora import FactorStack  # noqa: E402

SHAPES = {"q_proj 2048 x 2048": (2048, 2048), "up_proj 8192 x 2048": (8192, 2048)}
QUICK_SHAPES = {"q 256 x 256": (256, 256), "up 1024 x 256": (1024, 256)}


def make_clients(d_out: int, d_in: int, ranks: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, r in enumerate(ranks):
        a = torch.randn((r, d_in), generator=gen) / d_in**0.5
        b = torch.randn((d_out, r), generator=gen) / r**0.5
        out.append((a, b, 50 + 7 * k))
    return out


def run_stack(clients, d_out: int, d_in: int, r_max: int, svd: str) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
    start = time.perf_counter()
    stack = FactorStack("m", (r_max, d_in), (d_out, r_max), r_max, svd=svd)
    for k, (a, b, n) in enumerate(clients):
        stack.add(f"c{k}", a, b, 1, float(n))
    randomized = stack.uses_randomized()
    a_out, b_out = stack.result(None)
    return a_out, b_out, time.perf_counter() - start, randomized


def run_dense(clients, r_max: int) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    start = time.perf_counter()
    total = sum(n for _, _, n in clients)
    dense = sum((b * (n / total)) @ a for a, b, n in clients)
    if dense.shape[0] >= dense.shape[1]:
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    else:
        v, s, uh = torch.linalg.svd(dense.T, full_matrices=False)
        u, vh = uh.T, v.T
    seconds = time.perf_counter() - start
    return vh[:r_max], u[:, :r_max] * s[:r_max], seconds, s


def spectral_error(clients, a: torch.Tensor, b: torch.Tensor) -> float:
    total = sum(n for _, _, n in clients)
    residual = (sum((bk * (n / total)) @ ak for ak, bk, n in clients) - b @ a).double()
    gram = residual.T @ residual if residual.shape[0] >= residual.shape[1] else residual @ residual.T
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--r-max", type=int, default=64)
    parser.add_argument("--r-min", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timing runs of the randomized path (best reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_flexlora")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    r_max = 16 if args.quick and args.r_max == 64 else args.r_max
    ranks = client_ranks(args.clients, min(args.r_min, r_max), r_max)
    rows = []
    for label, (d_out, d_in) in shapes.items():
        clients = make_clients(d_out, d_in, ranks, args.seed)
        a_d, b_d, dense_s, sig = run_dense(clients, r_max)
        a_e, b_e, exact_s, _ = run_stack(clients, d_out, d_in, r_max, "exact")
        best = None
        for _ in range(args.repeats):
            a_r, b_r, rand_s, _ = run_stack(clients, d_out, d_in, r_max, "randomized")
            best = rand_s if best is None else min(best, rand_s)
        auto_randomized = run_stack(clients, d_out, d_in, r_max, "auto")[3]
        floor = float(sig[r_max])
        sv_r = torch.linalg.norm(b_r, dim=0)
        rows.append({
            "module": label, "d_out": d_out, "d_in": d_in, "stacked_rank": sum(ranks), "auto_randomized":
            auto_randomized, "dense_s": dense_s, "exact_s": exact_s, "randomized_s": best,
            "dense_over_randomized": dense_s / best, "exact_over_randomized": exact_s / best,
            "spectral_err_randomized": spectral_error(clients, a_r, b_r) / floor,
            "spectral_err_exact": spectral_error(clients, a_e, b_e) / floor,
            "spectral_err_dense": spectral_error(clients, a_d, b_d) / floor,
            "sv_rel_err_randomized": float((sv_r - sig[:r_max]).abs().max() / sig[0]),
        })
        print(json.dumps(rows[-1]), flush=True)
    report = {
        "command": " ".join(["python", "benchmarks/bench_flexlora.py", *(argv if argv is not None else sys.argv[1:])]),
        "clients": args.clients, "r_max": r_max, "ranks": ranks, "threads": args.threads,
        "machine": f"{platform.machine()}, torch {torch.__version__}", "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flexlora.json").write_text(json.dumps(report, indent=2))
    floor = f"sigma_{r_max + 1}"
    lines = [
        "| module | stacked rank | auto picks | dense SVD (s) | exact factored (s) | randomized (s) | dense / rand. "
        f"| exact / rand. | rand. \\|W - BA\\|_2 / {floor} | exact \\|W - BA\\|_2 / {floor} | rand. sigma error |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['module']} | {row['stacked_rank']} | {'randomized' if row['auto_randomized'] else 'exact'} | "
            f"{row['dense_s']:.2f} | {row['exact_s']:.2f} | {row['randomized_s']:.3f} | "
            f"{row['dense_over_randomized']:.0f}x | {row['exact_over_randomized']:.0f}x | "
            f"{row['spectral_err_randomized']:.4f} | {row['spectral_err_exact']:.4f} | "
            f"{row['sv_rel_err_randomized']:.1e} |"
        )
    (args.out / "flexlora.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
