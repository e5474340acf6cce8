"""Checkpoint and requeue on Slurm's pre-timeout / preemption signal, at a step boundary.

Who sends what:
- `slurm/train.sbatch` asks Slurm for SIGUSR1 90 s before the time limit (`--signal=SIGUSR1@90`, `--requeue`);
- Hydra's submitit launcher (`hydra/launcher=slurm`) asks for SIGUSR2 `signal_delay_s` before the limit
  (submitit's `SlurmJobEnvironment.USR_SIG`, overridable with SUBMITIT_PREEMPT_SIGNAL), and submitit's own
  USR2 handler would requeue and `sys.exit` at once, without a checkpoint.
This callback takes over both signals. The handler only sets a flag. At the end of the next training step
the ranks agree on it (one all-reduce), save `<run>/hpc_ckpt_<n>.ckpt` together, rank 0 runs
`scontrol requeue <job>`, and at the start of the following step every rank flushes its loggers and exits
with `RequeueExit` (so the step's metrics are logged once). The requeued job finds the same run folder
(`harness/run_dir.py`) and `ckpt_path=auto` resumes from the newest checkpoint (`harness/resume.py`).

Lightning's own SLURM handler saves inside the signal handler (a collective barrier at an arbitrary
point of the step); `slurm_plugins()` turns it off (`SLURMEnvironment(auto_requeue=False)`) so that only
this callback acts.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

import lightning as L
from lightning.pytorch.callbacks import Callback

from harness.resume import next_hpc_path

log = logging.getLogger(__name__)

REQUEUE_EXIT_CODE = 3


class RequeueExit(SystemExit):
    """Raised on every rank after the requeue checkpoint was written; exits with REQUEUE_EXIT_CODE."""

    def __init__(self) -> None:
        super().__init__(REQUEUE_EXIT_CODE)


def slurm_plugins() -> list:
    """Trainer plugins: under Slurm, Lightning's environment with its own requeue handler off; else none."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def slurm_job_id() -> str | None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class RequeueOnSignal(Callback):
    """signals: names of the signals that mean "time is nearly up" (SIGUSR1 from sbatch, SIGUSR2 from
    submitit); requeue: run `scontrol requeue` (false: checkpoint and exit only)."""

    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGUSR1", "SIGUSR2"), requeue: bool = True):
        self.signals = [signal.Signals[name] if isinstance(name, str) else name for name in signals]
        self.requeue = requeue
        self.received: int | None = None
        self.saved_path: str | None = None
        self._previous: dict = {}

    def _on_signal(self, signum, frame) -> None:
        self.received = signum

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.saved_path is not None:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            log.info("requeue signal at the last step: finishing the run instead")
            return
        path = trainer.strategy.broadcast(str(next_hpc_path(trainer.default_root_dir)))
        name = signal.Signals(self.received).name if self.received is not None else "a signal (other rank)"
        log.warning("received %s: saving %s at step %d", name, path, trainer.global_step)
        trainer.save_checkpoint(path)
        self.saved_path = path
        if trainer.is_global_zero and self.requeue:
            job = slurm_job_id()
            if job is None:
                log.warning("no SLURM_JOB_ID: checkpointed without requeue")
            else:
                done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                if done.returncode == 0:
                    log.warning("requeued Slurm job %s", job)
                else:
                    log.error("scontrol requeue %s failed (%d): %s", job, done.returncode, done.stderr)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.saved_path is None:
            return
        for logger in trainer.loggers:
            logger.save()
        log.warning("exiting for requeue; the next job resumes from %s", self.saved_path)
        raise RequeueExit()
