"""Report sections for the privacy, robustness, message-format and budget views of `hetlora simulate`.

`extra_sections(seeds, out_dir)` returns markdown lines and PNG paths for `report.write_report`:

- **Privacy** (arms whose metrics carry ``"dp"``): target and spent epsilon (the accountant's value recorded in
  the last round's summary), delta, noise multiplier, final held-out perplexity; a perplexity-vs-epsilon plot
  (``ppl_vs_epsilon.png``) with the non-private ``rankwise`` arm as a horizontal line when it ran.
- **Poisoned clients** (arms whose metrics carry ``"attack"``): the aggregation rule, the attack, the final
  perplexity and its difference to the honest ``rankwise`` arm.
- **Against HomLoRA(r_max)**: each arm's final perplexity minus HomLoRA(r_max)'s after the same rounds (equal
  local compute: every client runs the same steps, and a rank-k step costs about a rank-r_max step on the same
  base) and minus HomLoRA(r_max)'s at the arm's own total upload (equal upload bytes, interpolated).
- **Messages**: per arm the message format, the tensor payload and the bytes sent.

Numbers are means over the seeds that ran an arm.

Example:
    >>> lines, plots = extra_sections([metrics], Path("runs/x"))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .figures import new_figure
from .method_numbers import format_bytes, ppl_at_upload, round_rows

REFERENCE = "homlora_rmax"
HONEST = "rankwise"


def _rows(arm: Mapping[str, Any]) -> list[dict[str, Any]]:
    return round_rows(arm)


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _last(rows: list[dict[str, Any]], key: str) -> float:
    for row in reversed(rows):
        value = _num(row.get(key))
        if not math.isnan(value):
            return value
    return math.nan


def _mean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def _fmt(value: float, digits: int = 2) -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}"


def _final_ppl(seeds: Sequence[Mapping[str, Any]], arm: str) -> float:
    return _mean([_last(_rows(m[arm]), "heldout_ppl") for m in seeds if arm in m])


def privacy_rows(seeds: Sequence[Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per DP arm: target / spent epsilon, delta, sigma, final perplexity (mean over seeds), by epsilon."""
    arms = [a for a in seeds[0] if "dp" in seeds[0][a]]
    out = []
    for arm in arms:
        dp = seeds[0][arm]["dp"]
        out.append(
            {
                "arm": arm,
                "target_epsilon": _num(dp.get("target_epsilon")),
                "epsilon_spent": _mean([_last(_rows(m[arm]), "epsilon") for m in seeds if arm in m]),
                "delta": _num(dp.get("delta")),
                "noise_multiplier": _num(dp.get("noise_multiplier")),
                "clip": _num(dp.get("clip")),
                "final_ppl": _final_ppl(seeds, arm),
            }
        )
    return sorted(out, key=lambda r: r["target_epsilon"])


def poisoned_rows(seeds: Sequence[Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per poisoned arm: rule, attack, final perplexity and its difference to honest `rankwise`."""
    honest = _final_ppl(seeds, HONEST) if HONEST in seeds[0] else math.nan
    out = []
    for arm, info in seeds[0].items():
        if "attack" not in info:
            continue
        attack = info["attack"]
        ppl = _final_ppl(seeds, arm)
        out.append(
            {
                "arm": arm,
                "aggregation": info.get("aggregation"),
                "attack": attack.get("kind"),
                "fraction": _num(attack.get("fraction")),
                "scale": _num(attack.get("scale")),
                "final_ppl": ppl,
                "delta_vs_honest": ppl - honest,
            }
        )
    return out


def reference_rows(seeds: Sequence[Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Each arm against HomLoRA(r_max): Δ final ppl at equal rounds (compute) and at equal upload bytes."""

    if REFERENCE not in seeds[0]:
        return []
    out = []
    for arm in seeds[0]:
        if arm == REFERENCE or seeds[0][arm].get("centralized"):
            continue
        compute, upload = [], []
        for m in seeds:
            if arm not in m or REFERENCE not in m:
                continue
            rows, ref = _rows(m[arm]), _rows(m[REFERENCE])
            last = rows[-1] if rows else {}
            same_round = [r for r in ref if r.get("round") == last.get("round")]
            ppl = _num(last.get("heldout_ppl"))
            compute.append(ppl - _num(same_round[-1].get("heldout_ppl")) if same_round else math.nan)
            upload.append(ppl - ppl_at_upload(ref, _num(last.get("cum_upload_bytes"))))
        out.append({"arm": arm, "delta_equal_compute": _mean(compute), "delta_equal_upload": _mean(upload)})
    return out


def message_rows(seeds: Sequence[Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Per arm: message format, total tensor payload and bytes sent (mean over seeds), final perplexity."""
    out = []
    for arm, info in seeds[0].items():
        if info.get("centralized"):
            continue
        totals = [
            (sum(_num(r.get("payload_bytes")) for r in _rows(m[arm]) if r.get("round")),
             sum(_num(r.get("upload_bytes")) for r in _rows(m[arm]) if r.get("round")))
            for m in seeds
            if arm in m
        ]
        out.append(
            {
                "arm": arm,
                "message_format": info.get("message_format", "fp32"),
                "payload_bytes": _mean([t[0] for t in totals]),
                "sent_bytes": _mean([t[1] for t in totals]),
                "final_ppl": _final_ppl(seeds, arm),
            }
        )
    return out


def plot_epsilon(rows: list[dict[str, Any]], honest_ppl: float, path: Path) -> Path:
    """Final held-out perplexity against the epsilon spent (log x), the non-private arm as a line."""

    fig, axes = new_figure()
    ax = axes[0][0]
    xs = [r["epsilon_spent"] if not math.isnan(r["epsilon_spent"]) else r["target_epsilon"] for r in rows]
    ax.plot(xs, [r["final_ppl"] for r in rows], marker="o", label="rankwise + DP")
    if not math.isnan(honest_ppl):
        ax.axhline(honest_ppl, linestyle="--", color="gray", label="rankwise (no DP)")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon spent (delta = 1/N^1.1)")
    ax.set_ylabel("final held-out perplexity")
    ax.legend()
    fig.savefig(path, dpi=110)
    return path


def extra_sections(
    seeds: Sequence[Mapping[str, Mapping[str, Any]]], out_dir: Path, *, plots: bool = True
) -> tuple[list[str], list[Path]]:
    """Markdown lines and plot paths of the privacy / poisoned / reference / message sections (empty if n/a)."""
    lines: list[str] = []
    paths: list[Path] = []
    dp = privacy_rows(seeds)
    if dp:
        lines += [
            "## Privacy: perplexity vs epsilon",
            "",
            "| arm | target ε | ε spent | δ | σ | clip | final ppl |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in dp:
            lines.append(
                f"| {r['arm']} | {_fmt(r['target_epsilon'], 1)} | {_fmt(r['epsilon_spent'], 3)} | {r['delta']:.3g} "
                f"| {_fmt(r['noise_multiplier'], 3)} | {_fmt(r['clip'], 3)} | {_fmt(r['final_ppl'])} |"
            )
        lines += ["", "ε spent: Opacus's accountant after the last round (recorded in its summary.json).", ""]
        if plots:
            honest = _final_ppl(seeds, HONEST) if HONEST in seeds[0] else math.nan
            paths.append(plot_epsilon(dp, honest, out_dir / "ppl_vs_epsilon.png"))
    poisoned = poisoned_rows(seeds)
    if poisoned:
        lines += [
            "## Poisoned clients",
            "",
            "| arm | rule | attack | fraction | scale | final ppl | Δ vs honest rankwise |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in poisoned:
            lines.append(
                f"| {r['arm']} | {r['aggregation']} | {r['attack']} | {_fmt(r['fraction'])} | {_fmt(r['scale'], 1)} "
                f"| {_fmt(r['final_ppl'])} | {_fmt(r['delta_vs_honest'])} |"
            )
        lines.append("")
    ref = reference_rows(seeds)
    if ref:
        lines += [
            f"## Against HomLoRA(r_max) ({REFERENCE})",
            "",
            "| arm | Δ ppl at equal local compute | Δ ppl at equal upload bytes |",
            "|---|---|---|",
        ]
        lines += [f"| {r['arm']} | {_fmt(r['delta_equal_compute'])} | {_fmt(r['delta_equal_upload'])} |" for r in ref]
        lines += [
            "",
            "Equal local compute: the same rounds (every client runs the same steps; a rank-k step costs about a "
            "rank-r_max step on the same base). Equal upload: HomLoRA(r_max)'s perplexity interpolated at the arm's "
            "total upload (— outside its range). Negative: the arm is better.",
            "",
        ]
    messages = message_rows(seeds)
    if any(r["message_format"] != "fp32" for r in messages):
        lines += ["## Messages: perplexity vs bytes", "", "| arm | format | payload | sent | final ppl |",
                  "|---|---|---|---|---|"]

        lines += [
            f"| {r['arm']} | {r['message_format']} | {format_bytes(r['payload_bytes'])} | "
            f"{format_bytes(r['sent_bytes'])} | {_fmt(r['final_ppl'])} |"
            for r in messages
        ]
        lines.append("")
    return lines, paths
