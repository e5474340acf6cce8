"""Slurm requeue end to end: a real training process gets the pre-timeout signal mid-run, checkpoints,
requeues and exits; the relaunch with the same job id continues from the step it reached, with the loss
curve of an uninterrupted run. Resume picks the newest state among requeue, step and last checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from harness.resume import newest_checkpoint
from tests.hydra_utils import REPO, compose_train, logged, tiny_sft_overrides
from train import train

JOB_ID = "4242"
# 16 rows, batch 4: 4 steps per epoch; 2 epochs; the signal arrives in the second epoch, after the first
# epoch's validation wrote checkpoints/last.ckpt (step 4), which a requeue must not roll back to.
COMMON = [
    "scheduler=none",
    "trainer.max_steps=-1",
    "trainer.limit_train_batches=null",
    "trainer.max_epochs=2",
    "validate_before_training=false",
    "callbacks.sink_diagnostics=null",
]


def _slurm_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    # records the call, then does what Slurm does to a requeued job: SIGTERM to its processes
    scontrol.write_text('#!/bin/sh\necho "$@" >> "$FAKE_SCONTROL_LOG"\nkill -TERM "$PPID"\n')
    scontrol.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "disabled",
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NAME": "unsink",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    for var in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        env.pop(var, None)
    return env


def _launch(env, output_dir, *extra):
    cmd = [sys.executable, "train.py", *tiny_sft_overrides(*COMMON, *extra), f"paths.output_dir={output_dir}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[float]:
    """train/loss of the same run without faults, in-process."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(compose_train(tiny_sft_overrides(*COMMON), run_dir))
    losses = logged(run_dir, "train/loss")
    assert len(losses) == 8
    return losses


# SIGUSR1: slurm/train.sbatch; SIGUSR2: the submitit launcher (same code path, so that one runs with `slow`)
@pytest.mark.parametrize("signum", ["SIGUSR1", pytest.param("SIGUSR2", marks=pytest.mark.slow)])
def test_signal_mid_run_requeues_and_relaunch_continues_the_same_curve(tmp_path, signum, uninterrupted):
    env = _slurm_env(tmp_path)
    out = tmp_path / "outputs"
    inject = [
        "+callbacks.fault._target_=tests.fault_injection.SignalAtStep",
        "+callbacks.fault.step=5",
        f"+callbacks.fault.signum={signum}",
    ]
    first = _launch(env, out, *inject)
    run_dir = out / "debug" / f"slurm-{JOB_ID}"  # the folder the requeued job finds again
    log = first.stdout[-3000:] + first.stderr[-5000:]
    assert "unsink run summary" not in first.stdout, log
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", JOB_ID], log
    assert not (run_dir / "results.json").exists()
    hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1, log
    assert torch.load(hpc[0], weights_only=False)["global_step"] == 6  # the step under way was finished
    assert len(logged(run_dir, "train/loss")) == 6, log

    second = _launch(env, out)  # the requeued job: same job id, no fault
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    assert "unsink run summary" in second.stdout
    assert "hpc_ckpt_1.ckpt (step 6)" in second.stderr + second.stdout

    assert logged(run_dir, "train/loss") == pytest.approx(uninterrupted, abs=1e-5)


@pytest.mark.slow  # ~25 s of CPU; the checkpoint choice has a fast test below
def test_kill_9_loses_only_the_steps_since_the_last_step_checkpoint(tmp_path, uninterrupted):
    env = _slurm_env(tmp_path)
    out = tmp_path / "outputs"
    every_3 = "callbacks.step_checkpoint.every_n_train_steps=3"
    inject = ["+callbacks.fault._target_=tests.fault_injection.SignalAtStep", "+callbacks.fault.step=7"]
    first = _launch(env, out, every_3, *inject, "+callbacks.fault.signum=SIGKILL")
    assert first.returncode == -9, first.stderr[-3000:]
    run_dir = out / "debug" / f"slurm-{JOB_ID}"
    second = _launch(env, out, every_3)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    # newest state: checkpoints/step-6.ckpt (mid-epoch), not last.ckpt (step 4); step 7 is redone
    assert "step-6.ckpt (step 6)" in second.stderr + second.stdout
    assert logged(run_dir, "train/loss")[-2:] == pytest.approx(uninterrupted[-2:], abs=1e-5)


def _fake_checkpoint(path, step):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {}}, path)


def test_auto_resume_picks_the_highest_step_and_skips_unreadable_files(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoints" / "last.ckpt", 400)
    _fake_checkpoint(tmp_path / "checkpoints" / "step-1000.ckpt", 1000)
    _fake_checkpoint(tmp_path / "hpc_ckpt_1.ckpt", 700)
    _fake_checkpoint(tmp_path / "hpc_ckpt_2.ckpt", 1130)
    assert newest_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_2.ckpt"
    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"PK\x03\x04 truncated by kill -9")
    assert newest_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_2.ckpt"
    assert newest_checkpoint(tmp_path / "empty") is None


def test_requeue_signals_match_what_sbatch_and_submitit_send():
    from submitit.core.job_environment import JobEnvironment

    text = (REPO / "slurm" / "train.sbatch").read_text()
    cfg = compose_train(["experiment=lm_sft"])
    signals = set(cfg.callbacks.requeue.signals)
    assert "--signal=SIGUSR1@" in text and "SIGUSR1" in signals
    assert (
        f"SIG{JobEnvironment.USR_SIG}" in signals
    )  # submitit's launcher: USR2 signal_delay_s before the limit
