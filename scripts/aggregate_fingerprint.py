"""Bit-identity check of the aggregation layer across two checkouts (issue 23: moves change no global).

``save OUT`` aggregates a fixed, seeded set of rounds with whichever ``peft_hetlora`` is on ``PYTHONPATH`` and saves
every result tensor: every registered method x 3 chained rounds x influence bound (none, adaptive, 2.0),
component-indexed (window) uploads for the methods that accept them, DP rounds, the robust rules and the secure-sum
path. ``compare A B`` says how many entries differ (byte for byte, dtype and shape included) and exits 1 if any do.

Usage (from each checkout's root)::

    PYTHONPATH=/work/main python scripts/aggregate_fingerprint.py save /tmp/main.pt
    PYTHONPATH=$PWD python scripts/aggregate_fingerprint.py save /tmp/branch.pt
    python scripts/aggregate_fingerprint.py compare /tmp/main.pt /tmp/branch.pt

It imports the aggregation layer from its new home (``peft_hetlora.federated.aggregation``) or its old modules, so
one copy of the script runs on both sides of the move.
"""

from __future__ import annotations

import sys
import zlib
from typing import Any

import torch

R_MAX = 8
SHAPES = {"l0.q": (12, 10), "l1.v": (12, 6)}


def _imports() -> tuple[Any, ...]:
    import peft_hetlora.federated as fed

    try:
        from peft_hetlora.federated.aggregation import robust_aggregate
        from peft_hetlora.federated.aggregation.privacy import (
            DPConfig,
            client_share,
            combine,
            dp_aggregate,
            sum_shares,
        )
    except ImportError:  # before the move (issue 23, WP2)
        from peft_hetlora.federated.privacy import DPConfig, dp_aggregate  # type: ignore[no-redef]
        from peft_hetlora.federated.robust import robust_aggregate  # type: ignore[no-redef]
        from peft_hetlora.federated.secure_sum import client_share, combine, sum_shares  # type: ignore[no-redef]
    return fed, robust_aggregate, DPConfig, dp_aggregate, client_share, combine, sum_shares


def _client(fed: Any, g: torch.Generator, cid: str, rank: int, n: int, comps: tuple[int, ...] | None = None) -> Any:
    sd = {}
    for module, (d_in, d_out) in SHAPES.items():
        sd[f"{module}.lora_A.weight"] = torch.randn(rank, d_in, generator=g)
        sd[f"{module}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.3
    sd["head.weight"] = torch.randn(5, generator=g)
    extra = {"components": comps} if comps is not None else {}
    return fed.ClientUpdate(cid, sd, rank=rank, num_examples=n, **extra)


def fingerprint() -> dict[str, Any]:
    """Every result tensor (and refusal message) of the fixed scenario, by a descriptive key."""
    fed, robust_aggregate, DPConfig, dp_aggregate, client_share, combine, sum_shares = _imports()
    out: dict[str, Any] = {}

    def keep(prefix: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            result = fn(*args, **kwargs)
        except Exception as err:  # a refusal must be identical too
            out[f"{prefix}/error"] = repr(err)
            return
        for key, value in result.state_dict.items():
            out[f"{prefix}/{key}"] = value
        out[f"{prefix}/weights"] = repr(getattr(result, "weights", None))

    for method in sorted(fed.AGGREGATION_METHODS):
        impl = fed.get_aggregation(method)
        for clip in (None, "adaptive", 2.0):
            g = torch.Generator().manual_seed(zlib.crc32(f"{method}{clip}".encode()) % 1000)
            previous = None
            for rnd in range(3):
                ranks = [R_MAX] * 4 if impl.homogeneous else [2, 4, 8, 3]
                ups = [_client(fed, g, f"c{i}", r, 10 * (i + 1)) for i, r in enumerate(ranks)]
                prefix = f"{method}/{clip}/{rnd}"
                keep(prefix, fed.aggregate, ups, method=method, r_max=R_MAX, previous=previous, clip_norm=clip,
                     scaling=0.5)
                if f"{prefix}/error" in out:
                    break
                previous = {k[len(prefix) + 1:]: v for k, v in out.items()
                            if k.startswith(prefix + "/") and isinstance(v, torch.Tensor)}
        if getattr(impl, "accepts_components", False):
            g = torch.Generator().manual_seed(7)
            start = fed.pad(_client(fed, g, "p", 4, 1).state_dict, R_MAX)
            ups = [_client(fed, g, "w0", 2, 5, (5, 6)), _client(fed, g, "w1", 3, 9, (0, 7, 2)),
                   _client(fed, g, "w2", 2, 3, (0, 1))]
            keep(f"window/{method}", fed.aggregate, ups, method=method, r_max=R_MAX, previous=start,
                 clip_norm="adaptive")
    g = torch.Generator().manual_seed(3)
    start = fed.pad(_client(fed, g, "p", 4, 1).state_dict, R_MAX)
    ups = [_client(fed, g, f"d{i}", r, 5) for i, r in enumerate([2, 4, 8, 3, 5])]
    config = DPConfig(clip=1.0, noise_multiplier=0.7, sampling_rate=0.5, delta=1e-5, population=10)
    for method in ("component", "zero_pad", "fedavg", "rankwise"):
        keep(f"dp/{method}", dp_aggregate, ups, config=config, r_max=R_MAX, previous=start,
             generator=torch.Generator().manual_seed(1), method=method)
    for rule in ("median", "trimmed_mean"):
        keep(f"robust/{rule}", robust_aggregate, ups, rule=rule, r_max=R_MAX, previous=start)
    homogeneous = [_client(fed, g, f"f{i}", R_MAX, 5) for i in range(3)]
    for method in ("hetlora", "zero_pad", "fedavg", "rankwise", "component"):
        clients = homogeneous if method == "fedavg" else ups
        try:
            sums = sum_shares([client_share(u, method=method, r_max=R_MAX) for u in clients])
        except Exception as err:
            out[f"secure_sum/{method}/error"] = repr(err)
            continue
        keep(f"secure_sum/{method}", combine, sums, method=method, r_max=R_MAX, previous=start)
    return out


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose entries differ byte for byte (or exist on one side only).

    Example:
        >>> differences({"x": torch.ones(2)}, {"x": torch.ones(2)}), differences({"x": 1.0}, {"x": 2.0})
        ([], ['x'])
    """
    bad = sorted(set(a) ^ set(b))
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            same = x.dtype == y.dtype and x.shape == y.shape and x.numpy().tobytes() == y.numpy().tobytes()
        else:
            same = x == y
        if not same:
            bad.append(key)
    return bad


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "save":
        result = fingerprint()
        torch.save(result, argv[1])
        print(f"{len(result)} entries saved to {argv[1]}")
        return 0
    if len(argv) == 3 and argv[0] == "compare":
        a, b = torch.load(argv[1], weights_only=True), torch.load(argv[2], weights_only=True)
        bad = differences(a, b)
        tensors = sum(isinstance(v, torch.Tensor) for v in a.values())
        refused = sorted(k for k in a if k.endswith("/error"))
        print(f"{len(a)} entries ({tensors} tensors; refused on both sides: {refused}); {len(bad)} differ")
        for key in bad[:20]:
            print("  differs:", key)
        return 1 if bad else 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
