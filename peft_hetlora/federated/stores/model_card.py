"""The model card (`README.md`) of a federation: its settings, how to load the latest global, the round history.

Everything a summary holds may come from a client, so every value is rendered as inert Markdown (numbers
formatted, plain words as they are, anything else escaped and capped at `CARD_CELL_CHARS`; at most
`CARD_LIST_ITEMS` entries of a list).

Example:
    ```py
    >>> text = render_model_card("org/fed", {"r_max": 16}, 3, {0: {"accepted": ["a"], "metrics": {"loss": 1.2}}})
    >>> "| 0 | 1: a | - | loss=1.2 |" in text
    True
    ```
"""

from __future__ import annotations

import math
import re
from typing import Any

from ...utils.untrusted_text import markdown_text, one_line
from .base import json_text

__all__ = ["CARD_CELL_CHARS", "CARD_LIST_ITEMS", "MODEL_CARD", "render_model_card"]

#: the model card's file name at the root of a store (written by the store, never by a client)
MODEL_CARD = "README.md"

# Caps on what the model card shows of a round (everything in a summary may come from a client).
CARD_CELL_CHARS = 120
CARD_LIST_ITEMS = 20


_PLAIN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _cell(value: Any, limit: int = CARD_CELL_CHARS) -> str:
    """A value as inert Markdown: numbers formatted, plain words as they are, anything else escaped and capped."""
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.4g}" if math.isfinite(value) else "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and len(value) <= limit and _PLAIN_RE.fullmatch(value):
        return value  # letters, digits, "_" and "-" inside a word: nothing Markdown or HTML acts on
    return markdown_text(value, limit=limit)


def _listed(items: list[str], total: int) -> str:
    shown = ", ".join(items[:CARD_LIST_ITEMS])
    return shown + (f", … ({total - CARD_LIST_ITEMS} more)" if total > CARD_LIST_ITEMS else "")


def _summary_row(round_idx: int, summary: dict) -> str:
    accepted = summary.get("accepted") or []
    rejected = summary.get("rejected") or {}
    accepted = accepted if isinstance(accepted, list) else [accepted]
    accepted_txt = f"{len(accepted)}: {_listed([_cell(c, 64) for c in accepted], len(accepted))}" if accepted else "0"
    if isinstance(rejected, dict):
        parts = [f"{_cell(k, 64)} ({_cell(v)})" for k, v in rejected.items()]
    else:
        parts = [_cell(v, 64) for v in (rejected if isinstance(rejected, list) else [rejected])]
    rejected_txt = "; ".join(parts[:CARD_LIST_ITEMS]) + (
        f"; … ({len(parts) - CARD_LIST_ITEMS} more)" if len(parts) > CARD_LIST_ITEMS else "")
    metrics = summary.get("metrics") or {}
    if isinstance(metrics, dict):
        shown = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        metrics_txt = ", ".join(f"{_cell(k, 40)}={_cell(v)}" for k, v in shown[:CARD_LIST_ITEMS])
    else:
        metrics_txt = _cell(metrics)
    return f"| {_cell(round_idx)} | {accepted_txt} | {rejected_txt or '-'} | {metrics_txt or '-'} |"


def render_model_card(
    name: str, federation: dict | None, latest_round: int | None, summaries: dict[int, dict]
) -> str:
    """The federation's model card: metadata, how to load the latest global adapter, the round history.

    Example:
        ```py
        >>> text = render_model_card("org/fed", {"r_max": 16}, 3, {})
        >>> "Latest published round: **3**." in text and "No round closed yet." in text
        True
        ```
    """
    from huggingface_hub import ModelCardData

    federation = federation or {}
    base_model = federation.get("base_model")
    data = ModelCardData(library_name="peft", tags=["peft", "lora", "hetlora", "federated-learning"])
    if isinstance(base_model, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", base_model):
        data.base_model = base_model
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {markdown_text(name, limit=200)}: a HetLoRA federation",
        "",
        "Federated fine-tuning with heterogeneous LoRA ranks ([HetLoRA](https://arxiv.org/abs/2401.06432)), "
        "run with `peft-hetlora`. The files at the root are the latest global adapter; "
        "`rounds/<t>/global/` keeps every round's.",
        "",
        f"Latest published round: **{latest_round if latest_round is not None else 'none yet'}**.",
        "",
        "```python",
        "import peft_hetlora  # registers the HETLORA adapter type",
        "from peft import PeftModel",
        "",
        f"model = PeftModel.from_pretrained(base_model, {json_text(one_line(name, limit=200).replace('`', ''))})",
        "```",
        "",
    ]
    settings = {k: federation[k] for k in ("base_model", "method", "r_min", "r_max") if k in federation}
    if settings:
        lines += ["## Federation", ""] + [f"- {k}: {_cell(v)}" for k, v in settings.items()] + [""]
    privacy = [summaries[t]["privacy"] for t in sorted(summaries) if isinstance(summaries[t].get("privacy"), dict)]
    if privacy:
        last = privacy[-1]
        lines += ["## Differential privacy", "",
                  f"Client-level DP (DP-FedAvg, arXiv 1710.06963) accounted by {_cell(last.get('library'))} "
                  f"({_cell(last.get('accountant'))}): after {_cell(last.get('rounds'))} round(s), "
                  f"epsilon = {_cell(last.get('epsilon'))} at delta = {_cell(last.get('delta'))} "
                  f"(noise multiplier {_cell(last.get('noise_multiplier'))}, clip {_cell(last.get('clip'))}, "
                  f"sampling rate {_cell(last.get('sampling_rate'))}).", ""]
    lines += ["## Rounds", ""]
    if summaries:
        lines += ["| Round | Accepted | Rejected | Metrics |", "|---|---|---|---|"]
        lines += [_summary_row(t, summaries[t]) for t in sorted(summaries)]
    else:
        lines.append("No round closed yet.")
    return "\n".join(lines) + "\n"
