"""benchmarks/step_timer.py: GPU busy from a Chrome trace counts kernels, memcpy and memset only."""

import gc
import json
import time

import lightning as L
import pytest
import torch

from benchmarks.step_timer import (
    StepTimer,
    cpu_hotspots,
    device_activity,
    profiled_activity,
    stall_stacks,
    union_length,
)
from tests.lightning_utils import quiet_cpu_trainer


def event(cat: str, name: str, ts: float, dur: float, tid: int = 7, ph: str = "X") -> dict:
    return {"ph": ph, "cat": cat, "name": name, "pid": 0, "tid": tid, "ts": ts, "dur": dur}


def synthetic_trace() -> dict:
    """Two steps' worth of GPU work (microseconds) under an annotation spanning the idle gaps, plus CPU events."""
    return {
        "traceEvents": [
            event("cpu_op", "aten::mm", 0, 300, tid=1),
            event("user_annotation", "Optimizer.step#AdamW.step", 0, 300, tid=1),
            event("cuda_runtime", "cudaLaunchKernel", 1, 2, tid=1),
            event("gpu_user_annotation", "Optimizer.step#AdamW.step", 0, 200),
            event("gpu_user_annotation", "CompiledFunction", 0, 110, tid=8),
            event("kernel", "gemm", 0, 10),
            event("kernel", "rmsnorm", 5, 10, tid=8),  # another stream, overlaps gemm: [0, 15) once
            event("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 20, 10),
            event("gpu_memset", "Memset (Device)", 40, 2),
            event("kernel", "gemm", 100, 10),
            event("kernel", "adamw", 150, 4.5),
            event("ac2g", "ac2g", 100, 0, ph="f"),  # flow arrows are not intervals
            {"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "GPU 0"}},
        ]
    }


def test_union_counts_overlapping_kernels_once():
    assert union_length([(0, 10), (5, 15), (20, 25)]) == 20
    assert union_length([(0.5, 1.0), (1.0, 2.25)]) == 1.75
    assert union_length([]) == 0


def test_busy_ignores_annotations_and_cpu_events():
    activity = device_activity(synthetic_trace(), steps=2)
    # [0, 15) + [20, 30) + [40, 42) + [100, 110) + [150, 154.5); a union over every device event would be 200
    assert activity["gpu_busy_s"] == pytest.approx(41.5e-6)
    assert activity["by_category_ms"] == pytest.approx(
        {"kernel": 0.0345, "gpu_memcpy": 0.01, "gpu_memset": 0.002}
    )
    assert activity["kernels"] == 4 and activity["kernels_per_step"] == 2


def test_top_kernels_sum_per_name_largest_first():
    top = device_activity(synthetic_trace())["top_kernels"]
    assert [row["name"] for row in top] == ["gemm", "rmsnorm", "adamw"]
    assert top[0] == {"name": "gemm", "count": 2, "total_ms": pytest.approx(0.02)}
    assert sum(row["total_ms"] for row in top) == pytest.approx(
        device_activity(synthetic_trace())["by_category_ms"]["kernel"]
    )
    assert [row["name"] for row in device_activity(synthetic_trace(), top=1)["top_kernels"]] == ["gemm"]


def test_profiled_activity_reads_the_exported_trace():
    """The export-and-parse path on a real (CPU) profile: the record_function range and the ops are no GPU work."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        with torch.profiler.record_function("Optimizer.step#AdamW.step"):
            torch.randn(64, 64) @ torch.randn(64, 64)
    activity = profiled_activity(profiler, steps=1)
    assert activity["gpu_busy_s"] == 0 and activity["kernels"] == 0 and activity["top_kernels"] == []


def test_cpu_hotspots_rank_ops_and_ranges_per_step():
    """Host-side view: operators by self CPU time and record_function ranges, both divided by the steps."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(2):
            with torch.profiler.record_function("Optimizer.step#AdamW.step"):
                for _ in range(5):
                    a @ b
            with torch.profiler.record_function("tiny"):
                a + 1
    hot = cpu_hotspots(profiler, steps=2)
    ops = {row["name"]: row for row in hot["top_cpu_ops"]}
    ranked = [row["name"] for row in hot["top_cpu_ops"]]
    assert ops["aten::mm"]["count"] == 10  # looked up by name: under load a stray op may rank first
    assert "aten::add" not in ranked or ranked.index("aten::mm") < ranked.index("aten::add")
    ranges = {r["name"]: r for r in hot["cpu_ranges"]}
    assert ranges["Optimizer.step#AdamW.step"]["count"] == 2 and ranges["tiny"]["count"] == 2
    assert hot["cpu_ranges"][0]["name"] == "Optimizer.step#AdamW.step"  # five matmuls beat one add
    total_ms = sum(e.self_cpu_time_total for e in profiler.key_averages() if e.key == "aten::mm") / 1e3
    assert ops["aten::mm"]["self_cpu_ms_per_step"] == pytest.approx(total_ms / 2)


class TinyModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["input_ids"].float()).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def fit_timed(module: L.LightningModule, out, **timer) -> dict:
    """10 CPU steps of `module` under a StepTimer(out, **timer); its JSON."""
    batches = [{"input_ids": torch.arange(8).reshape(2, 4) + i} for i in range(10)]
    trainer = quiet_cpu_trainer(max_steps=10, callbacks=[StepTimer(str(out), **timer)])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return json.loads(out.read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_step_timer_on_cpu_reports_no_busy(tmp_path):
    result = fit_timed(TinyModule(), tmp_path / "speed.json", warmup=2, profile_steps=3)
    assert result["busy"] is None and result["steps"] == 4 and result["first_loss"] > 0
    assert result["gaps"]["median_ms"] > 0 and result["cudagraphs_recorded"] is None
    assert isinstance(result["compile_counters"], dict)


def test_token_counts_stay_on_the_device_until_the_end():
    """No host sync per timed step: the real-token count is the mask's sum as a tensor, not an int."""
    from benchmarks.step_timer import token_counts

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    real, positions = token_counts({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask})
    assert isinstance(real, torch.Tensor) and int(real) == 5 and positions == 8
    assert token_counts({"input_ids": torch.zeros(3, 2, dtype=torch.long)}) == (6, 6)


def test_gap_summary_finds_the_stalls_that_separate_mean_from_median():
    from benchmarks.step_timer import gap_summary

    gaps = [0.05] * 20
    gaps[7], gaps[15] = 2.0, 0.5  # a re-recording and a sync: median 50 ms, mean 0.17 s
    summary = gap_summary(gaps, top=1)
    assert summary["median_ms"] == pytest.approx(50.0)
    assert summary["max_ms"] == pytest.approx(2000.0)
    assert summary["stalls"] == 2 and summary["stall_ms_total"] == pytest.approx(2500.0)
    assert summary["largest_stalls"] == [{"step": 7, "ms": pytest.approx(2000.0)}]
    assert gap_summary([]) == {}


class SleepyModule(TinyModule):
    """Step 6 sleeps 0.6 s: a stall the timer must attribute to this function. Every step takes at least
    30 ms, so the stall threshold (3x the median) sits near 90 ms, above the few-ms jitter of a loaded CPU
    (with 1-ms steps one scheduling hiccup counted as a second stall)."""

    def training_step(self, batch, batch_idx):
        time.sleep(0.6 if batch_idx == 6 else 0.03)
        return super().training_step(batch, batch_idx)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_a_stalled_step_is_counted_and_its_stack_written(tmp_path):
    gaps = fit_timed(SleepyModule(), tmp_path / "speed.json", warmup=2, stall_trace_s=0.3)["gaps"]
    assert gaps["stalls"] == 1 and gaps["max_ms"] > 500
    stacks = (tmp_path / "speed.json.stalls.txt").read_text()
    assert stacks.count("Timeout") == 1 and "training_step" in stacks and "test_step_timer.py" in stacks
    stalled = gaps["largest_stalls"][0]["step"]  # the dump names the same gap as the summary
    assert stall_stacks(stacks)[0].startswith(f"step {stalled}:")


def test_stall_stacks_keep_only_the_steps_that_stalled():
    """A row's `.stalls.txt` (a step line per timed step, a faulthandler dump
    after the ones that outlasted `stall_trace_s`) becomes the stalled steps' stacks, in order."""
    text = (
        "--- step 0 of the timed window\n--- step 1 of the timed window\n"
        'Timeout (0:00:01)!\nThread 0x1 (most recent call first):\n  File "a.py", line 3 in replay\n'
        "--- step 2 of the timed window\n--- step 3 of the timed window\n"
        'Timeout (0:00:01)!\nThread 0x1 (most recent call first):\n  File "b.py", line 9 in record\n'
    )
    stacks = stall_stacks(text)
    assert [s.split(":")[0] for s in stacks] == ["step 1", "step 3"]
    assert "replay" in stacks[0] and "record" in stacks[1]
    assert len(stall_stacks(text, keep=1, chars=20)[0]) <= len("step 1: ") + 20


class CollectingModule(TinyModule):
    """Every step runs a full collection: the timer must count them (and only inside the timed window)."""

    def training_step(self, batch, batch_idx):
        gc.collect()
        return super().training_step(batch, batch_idx)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path")
def test_garbage_collections_in_the_timed_window_are_counted(tmp_path):
    pauses = fit_timed(CollectingModule(), tmp_path / "speed.json", warmup=2)["gc_pauses"]
    assert pauses["by_generation"]["2"] >= 7  # steps 3-9 of 10 at least (the window opens at step 2)
    assert pauses["count"] >= pauses["by_generation"]["2"] and 0 < pauses["max_s"] <= pauses["total_s"]
    assert not any("GcPauses" in repr(c) for c in gc.callbacks)  # unhooked at train end
