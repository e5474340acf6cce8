"""harness/summary.py: the run summary says how long training took, on what, at how many steps/s."""

from types import SimpleNamespace

import torch

from harness import summary
from harness.summary import TrainLossHistory, summary_lines


def test_summary_states_training_time_rate_and_device(monkeypatch):
    clock = iter([100.0, 532.5])  # on_train_start, on_train_end
    monkeypatch.setattr(summary.time, "monotonic", lambda: next(clock))
    history = TrainLossHistory()
    cpu = SimpleNamespace(global_step=200, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    history.on_train_start(cpu, None)  # a run resumed at step 200
    cpu.global_step = 1500
    history.on_train_end(cpu, None)
    lines = summary_lines({}, {}, history, "run", cpu, [])
    assert "training: 1300 steps in 7 min 12 s (3.01 steps/s) on cpu" in lines
    assert lines.index("training: 1300 steps in 7 min 12 s (3.01 steps/s) on cpu") == 5  # after "steps:"


def test_summary_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    gpu = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), num_devices=2)
    assert summary._device_name(gpu) == "NVIDIA H200 x 2"


def test_no_timing_line_without_training():
    lines = summary_lines({}, {}, TrainLossHistory(), "run", SimpleNamespace(global_step=0), [])
    assert not any(line.startswith("training:") for line in lines)
