"""The end-of-run summary printed by train.py (and by `make demo`)."""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import Callback


class TrainLossHistory(Callback):
    """Remembers the first and last logged training loss (for the before/after summary)."""

    def __init__(self):
        self.first: float | None = None
        self.last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        value = trainer.callback_metrics.get("train/loss")
        if value is not None:
            value = float(value)
            self.first = value if self.first is None else self.first
            self.last = value


def _fmt(value) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


def split_sink_block(extra: list[str]) -> tuple[list[str], list[str]]:
    """(the sink callback's block: header, step-0 sinks line, table rows; the other lines). The summary
    prints the block first: it leads with what the objectives are meant to move."""
    from diagnostics.callback import SUMMARY_HEADER

    start = next((i for i, line in enumerate(extra) if line.startswith(SUMMARY_HEADER)), None)
    if start is None:
        return [], list(extra)
    end = start + 2
    while end < len(extra) and extra[end].startswith("|"):
        end += 1
    return extra[start:end], [*extra[:start], *extra[end:]]


def summary_lines(
    before: dict, after: dict, history: TrainLossHistory, run_dir: str, trainer: L.Trainer, extra: list[str]
) -> list[str]:
    lines = ["", "=" * 72, "unsink run summary", "=" * 72]
    lines.append(f"steps: {trainer.global_step}   run folder: {run_dir}")
    lead, extra = split_sink_block(extra)
    lines.extend(lead)
    lines.append(f"train/loss   first {_fmt(history.first)}  ->  last {_fmt(history.last)}")
    keys = sorted({k for k in (*before, *after) if k.startswith("val/")})
    for key in keys:
        lines.append(f"{key:<14} before {_fmt(before.get(key))}  ->  after {_fmt(after.get(key))}")
    if "val/loss" in after and "val/perplexity" not in after:
        lines.append(f"val perplexity after: {math.exp(min(30.0, float(after['val/loss']))):.2f}")
    lines.extend(extra)
    lines.append("=" * 72)
    return lines
