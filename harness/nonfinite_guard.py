"""Non-finite losses and gradients: skip the step, count it, stop after N in a row, never save NaN weights.

One NaN step turns every trainable weight into NaN (AdamW spreads it through its moments), after which
`last.ckpt` and the adapter are NaN and `ckpt_path=auto` resumes from them. `NonFiniteGuard` checks each
optimizer step before it is taken: the loss of every micro-batch of the window and the norm of the gradients
(after AMP unscaling). The ranks agree with one all-reduce (any rank bad = all skip, so DDP replicas and FSDP
shards stay identical). A bad step is skipped by dropping the gradients (`zero_grad(set_to_none=True)`:
torch optimisers leave parameters without a gradient untouched, moments and weight decay included); the LR
schedule and the step counter still advance. After `max_consecutive` bad steps in a row the run stops with
`NonFiniteTrainingError`. Checkpoints and exports with a non-finite weight are refused.
With fp16 AMP the GradScaler already skips overflowing steps (that is how it finds its scale): there only a
non-finite loss counts.

On one device with a fused Adam/AdamW (the default on CUDA: recipes/optim.py) the check costs no host sync:
the step's flag goes to the optimizer as `found_inf`, the same device-side skip GradScaler uses (parameters,
moments and step count untouched), and the host reads the flag one step later, when it is long computed
(a pinned copy and a CUDA event, not a sync of the step in flight). Counting, the warning and the stop after
`max_consecutive` therefore come one step late; the weights are protected either way. Elsewhere (DDP/FSDP,
fp16's GradScaler, other optimisers) the host reads the flag in the step itself.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

CONFIG_KEY = "callbacks.nonfinite_guard.max_consecutive"


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite values that skipping steps cannot get past."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor / ShardedTensor (FSDP), else the tensor."""
    if hasattr(tensor, "to_local"):
        return tensor.to_local()
    if hasattr(tensor, "local_tensor"):
        return tensor.local_tensor()
    return tensor


def non_finite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or inf."""
    bad = []
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor):
            local = _local(tensor)
            if local.is_floating_point() and not torch.isfinite(local).all():
                bad.append(name)
    return bad


def check_finite_weights(module: torch.nn.Module, what: str, strategy=None) -> None:
    """Raise before `what` is written when a trainable parameter is not finite; with a Lightning `strategy`
    every rank raises when any rank's (FSDP: local shard's) weights are bad."""
    bad = non_finite_names({n: p.detach() for n, p in module.named_parameters() if p.requires_grad})
    if strategy is not None and strategy.reduce_boolean_decision(bool(bad), all=False) and not bad:
        bad = ["(on another rank)"]
    if bad:
        raise NonFiniteTrainingError(
            f"refusing to write {what}: {len(bad)} trainable tensors hold NaN/inf (first: {bad[0]})"
        )


def _and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a & b.to(a.device)


def gradients_finite(optimizer) -> torch.Tensor | None:
    """A 0-d bool tensor: every gradient of `optimizer` is finite (None without gradients).

    One fused norm per device and dtype (`torch._foreach_norm`) instead of a kernel per tensor: the
    LoRA of a 30-layer model has hundreds of small gradients, and this runs every step.
    """
    grads = [
        _local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    ]
    if not grads:
        return None
    groups: dict[tuple, list[torch.Tensor]] = {}
    for grad in grads:
        groups.setdefault((grad.device, grad.dtype), []).append(grad)
    flags = [
        torch.isfinite(torch.stack(torch._foreach_norm(group)).float()).all() for group in groups.values()
    ]
    return functools.reduce(_and, flags)


def skips_on_device(trainer: L.Trainer, optimizer) -> bool:
    """True when a bad step can be skipped by the optimizer itself (`found_inf`), with no host sync: one
    process, no GradScaler (it owns `found_inf`), and a fused torch Adam/AdamW."""
    return (
        trainer.world_size == 1
        and getattr(trainer.precision_plugin, "scaler", None) is None
        and getattr(optimizer, "_step_supports_amp_scaling", False)
        and all(group.get("fused") for group in optimizer.param_groups)
    )


class PendingFlag:
    """A step's 0-d device flag (1.0 = bad), readable on the host later without waiting for newer work.
    `pinned`: for a CUDA flag, a pinned 0-d float32 CPU buffer to copy into (reused step after step: each
    flag is read before the next one is copied)."""

    def __init__(self, bad: torch.Tensor, step: int, pinned: torch.Tensor | None = None):
        self.step, self.host, self.event = step, bad, None
        if bad.is_cuda:
            self.host = pinned.copy_(bad, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def read(self) -> bool:
        if self.event is not None:
            self.event.synchronize()  # waits for this step's flag only, not for the step in flight
        return bool(self.host.item())


class NonFiniteGuard(Callback):
    """max_consecutive: stop after this many bad optimizer steps in a row."""

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"{CONFIG_KEY} must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._loss_ok: torch.Tensor | None = None
        self._pending: PendingFlag | None = None  # the last device-skipped step's flag, not yet counted
        self._pinned: torch.Tensor | None = None  # PendingFlag's CPU buffer for CUDA flags, made once

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        # A device flag, read once per optimizer step (no host sync per micro-batch).
        self._loss_ok = _and(self._loss_ok, torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        ok = self._loss_ok
        self._loss_ok = None
        if getattr(trainer.precision_plugin, "scaler", None) is None:  # fp16: the scaler skips overflows
            ok = _and(ok, gradients_finite(optimizer))
        self.settle()  # the previous step's flag, computed long ago
        if skips_on_device(trainer, optimizer):
            bad = None if ok is None else (~ok).to(torch.float32)
            optimizer.found_inf = bad  # the fused step skips itself when bad: no host sync here
            if bad is not None:
                if bad.is_cuda and self._pinned is None:
                    self._pinned = torch.empty((), dtype=torch.float32, pin_memory=True)
                self._pending = PendingFlag(bad, trainer.global_step, self._pinned)
            return
        local_bad = ok is not None and not bool(ok)  # the one host sync of the step
        if trainer.strategy.reduce_boolean_decision(local_bad, all=False):
            optimizer.zero_grad(set_to_none=True)
            self._count(True, trainer.global_step)
        else:
            self._count(False, trainer.global_step)

    def settle(self) -> None:
        """Count the device-skipped step still pending (stop when it makes `max_consecutive`)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._count(pending.read(), pending.step)

    def _count(self, bad: bool, step: int) -> None:
        if not bad:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        log.warning(
            "non-finite loss or gradient norm at step %d: step skipped (%d in a row, %d in total)",
            step,
            self.consecutive,
            self.skipped,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"{self.consecutive} optimizer steps in a row had a non-finite loss or gradient norm (last at "
                f"step {step}); the weights are those of step {step - self.consecutive + 1}. Check the "
                f"learning rate, objective weights and precision, or allow more with {CONFIG_KEY}."
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.settle()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.settle()
        bad = non_finite_names(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteTrainingError(
                f"refusing to save a checkpoint with non-finite weights ({len(bad)} tensors, first: {bad[0]})"
            )

    def state_dict(self) -> dict:
        self.settle()  # a checkpoint stores exact counts
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = state_dict.get("skipped", 0)
        self.consecutive = state_dict.get("consecutive", 0)

    def summary_lines(self) -> list[str]:
        return [
            f"non-finite steps skipped: {self.skipped} "
            f"(the run stops after {self.max_consecutive} in a row: {CONFIG_KEY})"
        ]
