"""The end-of-run summary printed by train.py (and by `make demo`)."""

from __future__ import annotations

import math
import time

import lightning as L
from lightning.pytorch.callbacks import Callback


class TrainLossHistory(Callback):
    """Remembers the first and last logged training loss and how long training took (for the summary)."""

    def __init__(self):
        self.first: float | None = None
        self.last: float | None = None
        self.started: float | None = None  # time.monotonic() at the start and end of fit's training loop
        self.ended: float | None = None
        self.steps_at_start = 0  # a resumed run counts only the steps it trained itself

    def on_train_start(self, trainer, pl_module) -> None:
        self.started, self.steps_at_start = time.monotonic(), trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self.ended = time.monotonic()

    def training_time_line(self, global_step: int, device: str) -> str | None:
        """'training: 1500 steps in 7 min 12 s (3.47 steps/s) on <device>', or None before any training."""
        if self.started is None or self.ended is None:
            return None
        seconds, steps = self.ended - self.started, global_step - self.steps_at_start
        rate = f" ({steps / seconds:.2f} steps/s)" if seconds > 0 and steps > 0 else ""
        minutes, rest = divmod(round(seconds), 60)
        took = f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"
        return f"training: {steps} steps in {took}{rate} on {device}"

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


def _device_name(trainer) -> str:
    """'NVIDIA H200' (x N) for CUDA runs, else the accelerator's name."""
    root = getattr(getattr(trainer, "strategy", None), "root_device", None)
    if root is not None and root.type == "cuda":
        import torch

        count = getattr(trainer, "num_devices", 1) or 1
        return torch.cuda.get_device_name(root) + (f" x {count}" if count > 1 else "")
    return "cpu" if root is None else root.type


def summary_lines(
    before: dict, after: dict, history: TrainLossHistory, run_dir: str, trainer: L.Trainer, extra: list[str]
) -> list[str]:
    lines = ["", "=" * 72, "unsink run summary", "=" * 72]
    lines.append(f"steps: {trainer.global_step}   run folder: {run_dir}")
    timing = history.training_time_line(trainer.global_step, _device_name(trainer))
    if timing:
        lines.append(timing)
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
