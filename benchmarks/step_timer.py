"""A Lightning callback that times training steps and measures how busy the GPU is.

    python train.py ... +callbacks.step_timer._target_=benchmarks.step_timer.StepTimer \
        +callbacks.step_timer.out=/tmp/speed.json

steps/s: the median interval between consecutive `on_train_batch_end` calls after `warmup` steps (the
whole loop: data loading, forward, backward, optimizer, logging, callbacks), and the mean over the same
steps. GPU busy: `torch.profiler` over `profile_steps` steps after the warm-up; the union of the CUDA
kernel and memcpy intervals (kineto's device events) divided by the wall time of those steps, with the
device synchronised at both ends. first_loss: the loss of the first step (one host sync). Tokens: non-pad tokens (attention mask) and all positions of the batches.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch


def union_length(intervals: list[tuple[int, int]]) -> int:
    """Total length covered by [start, end) intervals (overlapping kernels count once)."""
    total, current_start, current_end = 0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def device_busy_ns(profiler) -> int:
    events = profiler.profiler.kineto_results.events()
    cuda = torch.autograd.DeviceType.CUDA
    return union_length([(e.start_ns(), e.end_ns()) for e in events if e.device_type() == cuda])


class StepTimer(L.Callback):
    def __init__(self, out: str, warmup: int = 10, profile_steps: int = 0):
        self.out, self.warmup, self.profile_steps = out, warmup, profile_steps
        self.ends: list[float] = []
        self.records: list[tuple[float, int, int]] = []  # (time, real tokens, positions) of timed steps
        self.profiler = None
        self.profile_start = self.busy = self.first_loss = None

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = len(self.ends)
        if self.profile_steps and step == self.warmup:
            self._sync()
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            self.profiler.__enter__()
            self.profile_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = len(self.ends)
        self.ends.append(time.perf_counter())
        if step == 0:  # the first step's loss (same seed and batch): plain and fast rows must agree
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.first_loss = float(loss.detach()) if loss is not None else None
        if self.profiler is not None and step == self.warmup + self.profile_steps - 1:
            self._sync()
            wall = time.perf_counter() - self.profile_start
            self.profiler.__exit__(None, None, None)
            busy = device_busy_ns(self.profiler) / 1e9
            self.busy = {"gpu_busy_s": busy, "wall_s": wall, "gpu_busy_fraction": busy / wall}
            self.profiler = None
        if step >= self.warmup + self.profile_steps:  # timed steps (the first one only opens the window)
            mask = batch.get("attention_mask")
            real = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            positions = batch["input_ids"].numel() if "input_ids" in batch else real
            self.records.append((time.perf_counter(), real, positions))

    def on_train_end(self, trainer, pl_module):
        times = [t for t, _, _ in self.records]
        gaps = [b - a for a, b in zip(times, times[1:])]
        result = {"steps": len(gaps), "busy": self.busy, "first_loss": self.first_loss}
        if gaps:
            span = times[-1] - times[0]
            result.update(
                steps_per_s_median=1 / statistics.median(gaps),
                steps_per_s_mean=len(gaps) / span,
                real_tokens_per_s=sum(r for _, r, _ in self.records[1:]) / span,
                positions_per_s=sum(p for _, _, p in self.records[1:]) / span,
            )
        if torch.cuda.is_available():
            result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        Path(self.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.out).write_text(json.dumps(result, indent=2))
