"""Measured device memory of one local round, per base model, quantisation and rank, for budget rank policies.

`rank_policy.training_memory_bytes` counts only the adapter's Adam state; what limits a device is the
peak of the whole local round (base weights, activations, gradients, optimizer state, allocator slack).
`DeviceMemoryTable` holds such peaks as measured by ``benchmarks/bench_memory.py`` (one fresh process per
measurement) and estimates the ranks in between with an affine fit ``peak(r) = a + b * r`` (b >= 0):
the rank changes the factors, their gradients, Adam state and the rank-r activations linearly.
`rank_for_budget` then gives the largest rank whose estimated peak fits a device's budget, the way
HetLoRA (Cho et al., arXiv 2401.06432) assigns ranks from device capability.

`default_table()` ships the SmolLM2-135M measurements of this repository (CPU, batch 2 x 64 tokens,
q/v/o on the top 8 layers, peak RSS including the ~430 MiB of the Python / torch / transformers
process); add your own model with `table.add(...)` or `DeviceMemoryTable.from_json` on a
``bench_memory.py --out`` file.

Example:
    ```py
    >>> table = DeviceMemoryTable()
    >>> table.add("my-model", "float32", 2, 1_000_000_000)
    >>> table.add("my-model", "float32", 16, 1_140_000_000)
    >>> table.estimate(8, model="my-model")
    1060000000
    >>> table.rank_for_budget(1_100_000_000, model="my-model", r_min=2, r_max=16)
    12
    ```
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...utils.errors import HetLoRAError, RankError

__all__ = ["DeviceMemoryError", "DeviceMemoryTable", "MemoryPoint", "default_table"]


class DeviceMemoryError(HetLoRAError, ValueError):
    """The table has no (or too few) measurements for the requested model and quantisation."""


@dataclass(frozen=True)
class MemoryPoint:
    """One measured peak: `peak_bytes` of a local round at `rank` on `model` with base `quantize`.

    `quantize` is ``"float32"``, ``"8bit"``, ``"4bit"`` or ``"torchao-int8"`` (the ``--quantize`` names);
    `method` is ``"hetlora"`` (used for estimates) or ``"lora"`` (PEFT LoRA(r=rank), the reference).
    """

    model: str
    quantize: str
    rank: int
    peak_bytes: int
    method: str = "hetlora"
    batch: int | None = None
    block: int | None = None
    note: str = ""


class DeviceMemoryTable:
    """Measured peak memory per (model, quantisation, rank) and an affine estimate for other ranks.

    Example:
        ```py
        >>> table = default_table()
        >>> table.estimate(4, model="smollm2-135m", quantize="4bit") > 0
        True
        ```
    """

    def __init__(self, points: Iterable[MemoryPoint] = ()) -> None:
        self.points: list[MemoryPoint] = []
        for point in points:
            self._append(point)

    def _append(self, point: MemoryPoint) -> None:
        if isinstance(point.rank, bool) or not isinstance(point.rank, int) or point.rank < 1:
            raise DeviceMemoryError(f"rank must be a positive integer, got {point.rank!r}.")
        if isinstance(point.peak_bytes, bool) or not isinstance(point.peak_bytes, int) or point.peak_bytes <= 0:
            raise DeviceMemoryError(f"peak_bytes must be a positive integer, got {point.peak_bytes!r}.")
        self.points.append(point)

    def add(self, model: str, quantize: str, rank: int, peak_bytes: int, **fields: Any) -> None:
        """Record one measurement (extends the table for your model / device).

        Example:
            ```py
            >>> t = DeviceMemoryTable(); t.add("m", "8bit", 4, 10**9); len(t.points)
            1
            ```
        """
        self._append(MemoryPoint(model, quantize, int(rank), int(peak_bytes), **fields))

    # ------------------------------------------------------------------ io
    @classmethod
    def from_json(cls, source: str | Path | Mapping[str, Any]) -> DeviceMemoryTable:
        """A table from `to_json()` output or a ``bench_memory.py --out`` JSON file (its ``rows``).

        Example:
            ```py
            >>> DeviceMemoryTable.from_json({"points": []}).points
            []
            ```
        """
        data = json.loads(Path(source).read_text()) if isinstance(source, (str, Path)) else dict(source)
        if "points" in data:
            return cls(MemoryPoint(**point) for point in data["points"])
        if "rows" in data:  # bench_memory.py output
            return cls(
                MemoryPoint(
                    model=row["model"],
                    quantize=row["quantize"],
                    rank=int(row["rank"]),
                    peak_bytes=int(row["peak_rss_bytes"]),
                    method=row["method"],
                    batch=row.get("batch"),
                    block=row.get("block"),
                    note=row.get("memory_measure", ""),
                )
                for row in data["rows"]
            )
        raise DeviceMemoryError(
            "Expected a JSON object with 'points' (DeviceMemoryTable) or 'rows' (bench_memory.py output)."
        )

    def to_json(self) -> dict[str, Any]:
        return {"points": [asdict(point) for point in self.points]}

    # ------------------------------------------------------------------ estimates
    def _medians(self, model: str, quantize: str, method: str) -> dict[int, float]:
        by_rank: dict[int, list[int]] = {}
        for p in self.points:
            if p.model == model and p.quantize == quantize and p.method == method:
                by_rank.setdefault(p.rank, []).append(p.peak_bytes)
        return {rank: statistics.median(values) for rank, values in by_rank.items()}

    def fit(self, *, model: str, quantize: str = "float32", method: str = "hetlora") -> tuple[float, float]:
        """Least-squares `(a, b)` of ``peak(r) = a + b * r`` over the measured ranks (b clipped at 0).

        Example:
            ```py
            >>> t = DeviceMemoryTable(); t.add("m", "float32", 1, 100); t.add("m", "float32", 3, 120)
            >>> t.fit(model="m")
            (90.0, 10.0)
            ```
        """
        medians = self._medians(model, quantize, method)
        if len(medians) < 2:
            known = sorted({(p.model, p.quantize, p.method) for p in self.points})
            raise DeviceMemoryError(
                f"Need measurements at >= 2 ranks for model={model!r}, quantize={quantize!r}, method={method!r} "
                f"(have {sorted(medians)}); known: {known[:6]}. Measure with benchmarks/bench_memory.py and add them."
            )
        ranks = list(medians)
        mean_r = sum(ranks) / len(ranks)
        mean_p = sum(medians.values()) / len(ranks)
        var = sum((r - mean_r) ** 2 for r in ranks)
        slope = max(0.0, sum((r - mean_r) * (medians[r] - mean_p) for r in ranks) / var)
        return mean_p - slope * mean_r, slope

    def estimate(self, rank: int, *, model: str, quantize: str = "float32", method: str = "hetlora") -> int:
        """Peak bytes of a local round at `rank`: the affine fit over the measured ranks.

        Example:
            ```py
            >>> t = DeviceMemoryTable(); t.add("m", "float32", 1, 100); t.add("m", "float32", 3, 120)
            >>> t.estimate(2, model="m")
            110
            ```
        """
        intercept, slope = self.fit(model=model, quantize=quantize, method=method)
        return round(intercept + slope * rank)

    def rank_for_budget(
        self,
        budget_bytes: int,
        *,
        model: str,
        quantize: str = "float32",
        r_min: int = 1,
        r_max: int,
        client_id: str | None = None,
    ) -> int:
        """Largest rank in [r_min, r_max] whose estimated peak fits in `budget_bytes`.

        Raises `RankError` (naming the client and the bytes r_min needs) when even r_min does not fit.

        Example:
            ```py
            >>> t = DeviceMemoryTable(); t.add("m", "float32", 1, 100); t.add("m", "float32", 3, 120)
            >>> t.rank_for_budget(135, model="m", r_max=8)
            4
            ```
        """
        intercept, slope = self.fit(model=model, quantize=quantize)
        fitting = [r for r in range(r_min, r_max + 1) if round(intercept + slope * r) <= budget_bytes]
        if not fitting:
            needed = round(intercept + slope * r_min)
            who = f"Client {client_id!r}: " if client_id is not None else ""
            lighter = {"float32": "8bit / 4bit", "8bit": "4bit"}.get(str(quantize))
            base_hint = f"a lighter base (--memory-quantize {lighter}), " if lighter else ""
            raise RankError(
                f"{who}a budget of {int(budget_bytes):,} bytes fits no rank >= r_min={r_min} on {model} ({quantize}); "
                f"a local round needs about {needed:,} bytes. Use {base_hint}a smaller batch, or leave the client out."
            )
        return max(fitting)


# Measured with benchmarks/bench_memory.py (see benchmarks/results/memory.md): SmolLM2-135M-Instruct,
# CPU, batch 2 x 64 tokens, q/v/o on the top 8 layers, HetLoRA r_max 16, peak RSS of one 2-step round,
# median of 2 fresh processes (bytes).
_SMOLLM2_135M: dict[str, dict[str, dict[int, int]]] = {
    "float32": {
        "lora": {2: 1180622848, 8: 1182676992, 16: 1190240256},
        "hetlora": {2: 1166559232, 8: 1162876928, 16: 1165776896},
    },
    "8bit": {
        "lora": {2: 922343424, 8: 928012288, 16: 921890816},
        "hetlora": {2: 912431104, 8: 904892416, 16: 919582720},
    },
    "4bit": {
        "lora": {2: 889116672, 8: 868257792, 16: 888211456},
        "hetlora": {2: 829511680, 8: 848363520, 16: 828700672},
    },
}


def default_table() -> DeviceMemoryTable:
    """The measurements shipped with the package (SmolLM2-135M; extend it with `add`).

    Example:
        ```py
        >>> table = default_table()
        >>> sorted({p.quantize for p in table.points})
        ['4bit', '8bit', 'float32']
        >>> table.rank_for_budget(850 * 2**20, model="smollm2-135m", quantize="4bit", r_min=2, r_max=16)
        16
        ```
    """
    table = DeviceMemoryTable()
    for quantize, methods in _SMOLLM2_135M.items():
        for method, peaks in methods.items():
            for rank, peak in peaks.items():
                table.add("smollm2-135m", quantize, rank, peak, method=method, batch=2, block=64)
    return table
