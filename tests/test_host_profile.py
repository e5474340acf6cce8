"""benchmarks/host_profile.py: py-spy's collapsed stacks summarised over the steady training loop."""

from __future__ import annotations

import pytest

from benchmarks.fast_path import train_py
from benchmarks.host_profile import frame_key, pyspy_prefix, summarise_samples

LOOP = "advance (/x/site-packages/lightning/pytorch/loops/training_epoch_loop.py:274)"
RAW = "\n".join(
    [
        f"main (train.py:10);{LOOP};step (/x/site-packages/torch/optim/adam.py:214) 30",
        f"main (train.py:10);{LOOP};replay (/x/site-packages/torch/_inductor/cudagraph_trees.py:900) 60",
        f"main (train.py:10);{LOOP};compile (/x/torch/_inductor/compile_fx.py:787) 500",  # the compiler
        "main (train.py:10);setup (train.py:40) 90",  # outside the loop
        "garbage line",
        f"main (train.py:10);{LOOP};step (/x/site-packages/torch/optim/adam.py:220);item (t.py:1) 10",
    ]
)


def test_frame_key_drops_the_line_and_site_packages():
    assert frame_key("step (/x/site-packages/torch/optim/adam.py:214)") == "step (torch/optim/adam.py)"
    assert frame_key("<module>") == "<module>"


def test_summary_counts_only_the_steady_loop_and_keys_frames_by_function():
    summary = summarise_samples(RAW)
    assert summary["samples"] == 100  # 30 + 60 + 10: the compiler's and the setup's samples are left out
    inclusive = {row["frame"]: row["share"] for row in summary["inclusive"]}
    assert inclusive["step (torch/optim/adam.py)"] == pytest.approx(0.4)  # two lines of one function
    assert inclusive["advance (lightning/pytorch/loops/training_epoch_loop.py)"] == pytest.approx(1.0)
    leaves = {row["frame"]: row["share"] for row in summary["self"]}
    assert leaves == pytest.approx(
        {
            "replay (torch/_inductor/cudagraph_trees.py)": 0.6,
            "step (torch/optim/adam.py)": 0.3,
            "item (t.py)": 0.1,
        }
    )
    assert summarise_samples("") == {"samples": 0, "inclusive": [], "self": []}


def test_a_refused_profiler_still_times_the_row(tmp_path, monkeypatch):
    """When py-spy cannot run (here: a prefix that fails at once), the row is timed without it and says why."""
    import benchmarks.fast_path as fast_path

    calls = []

    def fake_prefix(out):
        calls.append(out)
        return ["false"]

    monkeypatch.setattr(fast_path, "pyspy_prefix", fake_prefix)
    row = train_py(
        ["experiment=lm_sft", "debug=smoke"], tmp_path / "never.json", timeout=1, spy=tmp_path / "s.txt"
    )
    assert calls == [tmp_path / "s.txt"] and "py_spy_error" in row
    assert row["error"].startswith("timed out after 1 s")  # the second, unprofiled run: its own outcome


def test_pyspy_prefix_names_the_missing_tool(monkeypatch, tmp_path):
    import benchmarks.host_profile as host_profile

    monkeypatch.setattr(host_profile.shutil, "which", lambda name: None)
    monkeypatch.setattr(host_profile, "PYSPY_FALLBACK", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="pip install py-spy"):
        pyspy_prefix(tmp_path / "out.txt")


def test_a_timed_out_row_leaves_no_grandchild_running(tmp_path):
    """The row's process group dies on timeout: a grandchild (train.py under py-spy) must not outlive it."""
    import subprocess
    import time

    from benchmarks.fast_path import run_in_group

    pid_file = tmp_path / "grandchild.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_in_group(["bash", "-c", f"sleep 30 & echo $! > {pid_file}; wait"], timeout=1)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 3
    while running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(grandchild)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (killed, waiting for its new parent to reap it)."""
    from pathlib import Path

    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
