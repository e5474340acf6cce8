"""Faults injected into real training runs through the config (`+callbacks.<name>._target_=...`)."""

from __future__ import annotations

import os
import signal

import torch
from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    """Send `signum` to this process when training step `step` starts (as Slurm would, mid-run)."""

    def __init__(self, step: int, signum: str = "SIGUSR1"):
        self.step, self.signum = step, signal.Signals[signum]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class NonFiniteGradAtSteps(Callback):
    """Make one trainable gradient NaN after the backward of the given optimizer steps."""

    def __init__(self, steps: list[int]):
        self.steps = set(steps)

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step in self.steps:
            grad = next(p.grad for p in pl_module.parameters() if p.requires_grad and p.grad is not None)
            grad.view(-1)[0] = torch.nan
