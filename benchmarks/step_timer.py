"""A Lightning callback that times training steps and measures how busy the GPU is.

    python train.py ... +callbacks.step_timer._target_=benchmarks.step_timer.StepTimer \
        +callbacks.step_timer.out=/tmp/speed.json

steps/s: the median interval between consecutive `on_train_batch_end` calls after `warmup` steps (the
whole loop: data loading, forward, backward, optimizer, logging, callbacks), and the mean over the same
steps (`steps_per_s_mean`, the throughput: when the host runs ahead of the GPU, the median is only the
host's pace; `gaps` lists the stalls between the two, `cudagraphs_recorded_while_timed` the CUDA-graph
re-recordings, `compile_counters` torch.compile's recompiles and skips, `gc_pauses` the garbage
collector's pauses inside the timed window). The timer adds no host sync to a timed step (token counts stay on the device until the end), so
the host may run ahead of the GPU as it does in training. first_loss: the loss of the first step (one host
sync). Tokens: non-pad tokens (attention mask) and all positions of the batches.

GPU busy (CUDA only; null on CPU): `torch.profiler` over `profile_steps` steps after the warm-up, the
device synchronised at both ends; the trace goes through `export_chrome_trace`, and busy time is the
union of the intervals of the events whose category is `kernel`, `gpu_memcpy` or `gpu_memset`, divided
by the wall time of those steps. Not every event with device type CUDA: kineto also projects each
`record_function` range onto the GPU timeline (category `gpu_user_annotation`, from the first to the
last kernel queued inside it, idle gaps included). Lightning runs forward and backward inside
`optimizer.step(closure)`, so "Optimizer.step#AdamW.step" covers nearly the whole step on the GPU, and a
union over all CUDA events (the old metric) read 92-98% on the H200 whatever the kernels did. The same trace gives `kernels_per_step`,
the time per category (`by_category_ms`) and the 15 kernels with the most total time (`top_kernels`);
on the host side the 15 operators with the most self CPU time (`top_cpu_ops`) and the `record_function`
ranges by CPU time (`cpu_ranges`), per profiled step.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

# Chrome-trace categories of the work a GPU does (kineto's ActivityType names: CONCURRENT_KERNEL is
# "kernel"); "gpu_user_annotation" (record_function ranges) and "cuda_sync" are left out.
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
TOP_KERNELS = 15


def union_length(intervals: list[tuple[float, float]]) -> float:
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


def device_activity(trace: dict, steps: int = 1, top: int = TOP_KERNELS) -> dict:
    """GPU work in a Chrome trace from `torch.profiler` (`ts`, `dur` in microseconds).

    gpu_busy_s: the union of the kernel, memcpy and memset intervals (annotations and CPU events are not
    GPU work); by_category_ms: their summed durations per category; kernels: the number of kernels and
    kernels_per_step over `steps` profiled steps; top_kernels: the `top` kernels by total time.
    """
    intervals: list[tuple[float, float]] = []
    by_category = dict.fromkeys(DEVICE_WORK, 0.0)
    kernels: dict[str, list] = {}  # name -> [count, total microseconds]
    for event in trace.get("traceEvents", []):
        category = event.get("cat")
        if event.get("ph") != "X" or category not in by_category:
            continue
        start, duration = float(event["ts"]), float(event.get("dur", 0.0))
        intervals.append((start, start + duration))
        by_category[category] += duration
        if category == "kernel":
            row = kernels.setdefault(event.get("name", "?"), [0, 0.0])
            row[0] += 1
            row[1] += duration
    count = sum(n for n, _ in kernels.values())
    ranked = sorted(kernels.items(), key=lambda item: item[1][1], reverse=True)[:top]
    return {
        "gpu_busy_s": union_length(intervals) / 1e6,
        "by_category_ms": {k: v / 1e3 for k, v in by_category.items()},
        "kernels": count,
        "kernels_per_step": count / steps,
        "top_kernels": [{"name": name, "count": n, "total_ms": us / 1e3} for name, (n, us) in ranked],
    }


def profiled_activity(profiler, steps: int) -> dict:
    """`device_activity` of a finished `torch.profiler.profile` (its Chrome trace, through a temp file)."""
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "trace.json")
        profiler.export_chrome_trace(path)
        trace = json.loads(Path(path).read_text())
    return device_activity(trace, steps)


def cpu_hotspots(profiler, steps: int, top: int = TOP_KERNELS) -> dict:
    """Where the host time goes: the `top` operators by self CPU time, and the `record_function` ranges
    (optimizer step, compiled regions, ...) by total CPU time, both in ms per profiled step."""
    averages = list(profiler.key_averages())
    ops = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    ranges: dict[str, list] = {}
    for event in profiler.events():
        if event.is_user_annotation and event.device_type == torch.autograd.DeviceType.CPU:
            row = ranges.setdefault(event.name, [0, 0.0])
            row[0] += 1
            row[1] += event.cpu_time_total
    ranked = sorted(ranges.items(), key=lambda item: item[1][1], reverse=True)[:top]
    return {
        "top_cpu_ops": [
            {"name": e.key, "count": e.count, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps}
            for e in ops
        ],
        "cpu_ranges": [
            {"name": name, "count": n, "cpu_ms_per_step": us / 1e3 / steps} for name, (n, us) in ranked
        ],
    }


def gap_summary(gaps: list[float], top: int = 10, stall_factor: float = 3.0) -> dict:
    """Where the time between steps goes (`gaps` in seconds, in step order): median, p90, p99 and max in
    ms, and the stalls, the gaps longer than `stall_factor` x the median, with their total and the `top`
    largest as {"step": index in the timed window, "ms"}. When the host runs ahead of the GPU the median
    is the host's pace and the mean (over the whole span) the throughput; stalls say what separates them
    (one long gap: a recompile or a CUDA-graph re-recording; one every N steps: a sync every N steps)."""
    if not gaps:
        return {}
    ordered = sorted(gaps)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1e3

    median = statistics.median(gaps)
    threshold = stall_factor * median
    stalls = [(i, gap) for i, gap in enumerate(gaps) if gap > threshold]
    largest = sorted(stalls, key=lambda item: item[1], reverse=True)[:top]
    return {
        "median_ms": median * 1e3,
        "p90_ms": quantile(0.9),
        "p99_ms": quantile(0.99),
        "max_ms": ordered[-1] * 1e3,
        "stall_threshold_ms": threshold * 1e3,
        "stalls": len(stalls),
        "stall_ms_total": sum(gap for _, gap in stalls) * 1e3,
        "largest_stalls": [{"step": i, "ms": gap * 1e3} for i, gap in sorted(largest)],
    }


def stall_stacks(text: str, keep: int = 4, chars: int = 4000) -> list[str]:
    """The first `keep` faulthandler dumps of a `.stalls.txt` (written by `StepTimer._arm_stall_trace`) (each cut to `chars`), with the step line
    that precedes each one; the step lines of steps that did not stall are dropped."""
    dumps = []
    for block in text.split("--- step "):
        if not block.strip():
            continue
        header, _, body = block.partition("\n")
        if "Timeout" in body:
            dumps.append(f"step {header.split()[0]}: {body[:chars]}")
    return dumps[:keep]


def cudagraphs_recorded() -> int | None:
    """CUDA graphs recorded so far by torch.compile's CUDA-graph trees on the current device (None when
    no tree manager exists: no CUDA, or no `reduce-overhead` compile). A count that grows inside the timed
    window means re-recordings, each one a stall."""
    if not torch.cuda.is_available():
        return None
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    except Exception:  # a private API: its absence must not break a benchmark
        return None
    if manager is None:
        return None
    text = repr(manager.graph_counter)  # itertools.count(N): N graphs recorded; reading it must not bump it
    return int(text[text.index("(") + 1 : text.rindex(")")])


def compile_counters() -> dict:
    """torch.compile's own counters (graph breaks, recompiles, CUDA-graph skips, ...), as plain dicts."""
    from torch._dynamo.utils import counters

    return {group: dict(values) for group, values in counters.items() if values}


class GcPauses:
    """Times the interpreter's garbage collections while started (`gc.callbacks`): a full collection in a
    process holding torch.compile's graphs can pause the host for a long time, and it looks like any other
    stall in the step intervals. `summary()`: count, total and longest pause, and the collections by
    generation."""

    def __init__(self):
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds)
        self._began: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:
            self.pauses.append((info["generation"], time.perf_counter() - self._began))
            self._began = None

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        seconds = [s for _, s in self.pauses]
        by_generation = {str(g): sum(1 for gen, _ in self.pauses if gen == g) for g in (0, 1, 2)}
        return {
            "count": len(seconds),
            "total_s": sum(seconds),
            "max_s": max(seconds, default=0.0),
            "by_generation": by_generation,
        }


def token_counts(batch: dict) -> tuple[torch.Tensor | int, int]:
    """(real tokens, positions) of a batch without a host sync: the real-token count stays a device
    tensor (the attention mask's sum) until the run ends. An `int()` here each step made the host wait for
    the GPU every step, so a timed step cost CPU time + GPU time instead of the larger of the two."""
    mask = batch.get("attention_mask")
    positions = batch["input_ids"].numel() if "input_ids" in batch else None
    real = mask.sum() if mask is not None else positions
    return real, positions if positions is not None else mask.numel()


class StepTimer(L.Callback):
    def __init__(self, out: str, warmup: int = 10, profile_steps: int = 0, stall_trace_s: float = 0.0):
        """stall_trace_s > 0: a timed step that takes longer dumps every thread's Python stack (faulthandler)
        to `<out>.stalls.txt`, so a stall names the code it sat in."""
        self.out, self.warmup, self.profile_steps = out, warmup, profile_steps
        self.stall_trace_s, self.stall_file = stall_trace_s, None
        self.ends: list[float] = []
        self.records: list[tuple[float, int, int]] = []  # (time, real tokens, positions) of timed steps
        self.profiler = None
        self.profile_start = self.busy = self.first_loss = self.graphs_at_start = None
        self.gc_pauses = GcPauses()

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = len(self.ends)
        if self.profile_steps and step == self.warmup and torch.cuda.is_available():
            self._sync()
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            self.profiler.__enter__()
            self.profile_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stall_file is not None:
            faulthandler.cancel_dump_traceback_later()
        step = len(self.ends)
        self.ends.append(time.perf_counter())
        if step == 0:  # the first step's loss (same seed and batch): plain and fast rows must agree
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.first_loss = float(loss.detach()) if loss is not None else None
        if self.profiler is not None and step == self.warmup + self.profile_steps - 1:
            self._sync()
            wall = time.perf_counter() - self.profile_start
            self.profiler.__exit__(None, None, None)
            activity = profiled_activity(self.profiler, self.profile_steps)
            busy = activity.pop("gpu_busy_s")
            self.busy = {"gpu_busy_s": busy, "wall_s": wall, "gpu_busy_fraction": busy / wall, **activity}
            self.busy.update(cpu_hotspots(self.profiler, self.profile_steps))
            self.profiler = None
        if step >= self.warmup + self.profile_steps:  # timed steps (the first one only opens the window)
            if not self.records:
                self.graphs_at_start = cudagraphs_recorded()
                self.gc_pauses.start()
            self.records.append((time.perf_counter(), *token_counts(batch)))
            if self.stall_trace_s > 0:
                self._arm_stall_trace(len(self.records) - 1)

    def _arm_stall_trace(self, gap: int) -> None:
        """Dump the stacks if the gap from this step's end to the next one's (the interval `gaps[gap]`
        of the summary: data loading, logging and callbacks included) outlasts `stall_trace_s`."""
        if self.stall_file is None:
            self.stall_file = open(f"{self.out}.stalls.txt", "w")  # noqa: SIM115 (closed at train end)
        self.stall_file.write(f"--- step {gap} of the timed window\n")
        self.stall_file.flush()
        faulthandler.dump_traceback_later(self.stall_trace_s, file=self.stall_file)

    def on_train_end(self, trainer, pl_module):
        self.gc_pauses.stop()
        if self.stall_file is not None:
            faulthandler.cancel_dump_traceback_later()
            self.stall_file.close()
        times = [t for t, _, _ in self.records]
        gaps = [b - a for a, b in zip(times, times[1:])]
        self.records = [(t, int(r), p) for t, r, p in self.records]  # the only reads of the device counts
        result = {"steps": len(gaps), "busy": self.busy, "first_loss": self.first_loss}
        result["gaps"] = gap_summary(gaps)
        graphs = cudagraphs_recorded()
        result["cudagraphs_recorded"] = graphs
        if graphs is not None and self.graphs_at_start is not None:
            result["cudagraphs_recorded_while_timed"] = graphs - self.graphs_at_start
        result["compile_counters"] = compile_counters()
        result["gc_pauses"] = self.gc_pauses.summary()
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
