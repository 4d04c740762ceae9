"""What the server step (issue 24) costs a round: close_round's wall time and the server state's bytes.

Synthetic round on SmolLM2-135M's attention shapes (q/v/o projections of ``--layers`` layers: 576 x 576, 576 x 192,
576 x 576), ``r_max = 16``, clients at the tiers mix's ranks, uploads = the previous global's prefix plus noise.
For each setting (none, FedAvgM, FedAdam, FedAvgM + error feedback, error feedback alone) it closes ``--rounds``
rounds through ``round.close_round`` (``flexlora_held`` and ``fedavg``), carrying the server state, and reports the
median seconds per round and the state's bytes against the adapter's.

Usage::

    python benchmarks/bench_server_step.py                  # 8 layers, 3 rounds, 1 torch thread
    python benchmarks/bench_server_step.py --layers 30      # the whole model's attention
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from peft_hetlora.federated.aggregation import ClientUpdate  # noqa: E402
from peft_hetlora.federated.round import RoundPlan, RoundSettings, close_round  # noqa: E402

SHAPES = {"q_proj": (576, 576), "v_proj": (192, 576), "o_proj": (576, 576)}  # (d_out, d_in)
R_MAX = 16
RANKS = {"c0": 2, "c1": 4, "c2": 8, "c3": 16}
SETTINGS = {
    "none": {},
    "fedavgm": {"server_optimizer": {"name": "fedavgm", "lr": 1.0, "momentum": 0.9}},
    "fedadam": {"server_optimizer": {"name": "fedadam", "lr": 0.01}},
    "fedavgm+ef": {"server_optimizer": {"name": "fedavgm", "lr": 1.0, "momentum": 0.9}, "error_feedback": True},
    "ef": {"error_feedback": True},
}


def _global(layers: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(layers):
        for proj, (d_out, d_in) in SHAPES.items():
            name = f"model.layers.{i}.self_attn.{proj}"
            out[f"{name}.lora_A.weight"] = torch.randn(R_MAX, d_in, generator=gen) * 0.02
            out[f"{name}.lora_B.weight"] = torch.randn(d_out, R_MAX, generator=gen) * 0.02
    return out


def _uploads(previous: dict[str, torch.Tensor], ranks: dict[str, int], gen: torch.Generator) -> list[ClientUpdate]:
    out = []
    for cid, rank in ranks.items():
        sd = {}
        for key, value in previous.items():
            part = value[:rank] if ".lora_A." in key else value[:, :rank]
            sd[key] = (part + 0.01 * torch.randn(part.shape, generator=gen)).contiguous()
        meta = {"rank_in": rank, "rank_out": rank, "num_examples": 100, "train_loss": 1.0}
        out.append(ClientUpdate(cid, sd, rank=rank, num_examples=100, metadata=meta))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine, spinning BLAS threads cost 30-100x)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.layers} layers x {list(SHAPES)}, r_max={R_MAX}, client ranks {list(RANKS.values())}, "
          f"torch threads {torch.get_num_threads()}")
    print("| method | server step | s / round (median) | server state MB | adapter MB |")
    print("|---|---|---:|---:|---:|")
    for method in ("flexlora_held", "fedavg"):
        for label, extra in SETTINGS.items():
            if method == "fedavg" and label == "ef":
                continue  # refused: FedAvg's aggregate is never truncated
            gen = torch.Generator().manual_seed(0)
            previous = _global(args.layers, gen)
            ranks = dict.fromkeys(RANKS, R_MAX) if method == "fedavg" else dict(RANKS)
            settings = RoundSettings(method=method, r_max=R_MAX, r_min=1, scaling=2.0, clip_norm="off", **extra)
            state, times = None, []
            for t in range(args.rounds):
                uploads = _uploads(previous, ranks, gen)
                start = time.perf_counter()
                out = close_round(RoundPlan(t, sorted(ranks), ranks), uploads, previous, settings,
                                  client_ranks=ranks, initial_ranks=ranks, server_state=state)
                times.append(time.perf_counter() - start)
                previous, state = out.state_dict, out.server_state
            state_mb = sum(v.numel() * v.element_size() for v in (state or {}).values()) / 2**20
            adapter_mb = sum(v.numel() * v.element_size() for v in previous.values()) / 2**20
            print(f"| {method} | {label} | {statistics.median(times):.3f} | {state_mb:.2f} | {adapter_mb:.2f} |")


if __name__ == "__main__":
    main()
