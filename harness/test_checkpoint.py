"""Which weights `test_after_training` scores: the last ones, or the best by the monitored validation metric.

`test_checkpoint: best` (ASR studies: `callbacks.model_checkpoint.monitor=val/wer`) tests the checkpoint the
`ModelCheckpoint` with a `monitor` kept as best, so a run that overfits late is scored where validation
was best: selection on val only, the test split read once. The exported weights are then those too.
"""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch.callbacks import ModelCheckpoint

CHOICES = ("last", "best")


def resolve_test_checkpoint(choice: str, callbacks: Iterable) -> tuple[str | None, str]:
    """(ckpt_path for `trainer.test`, one summary line). None means the weights in memory (the last).

    `best` needs a `ModelCheckpoint` with a `monitor`; if it has no best file yet (no validation ran), the
    last weights are tested and the line says so.
    """
    if choice not in CHOICES:
        raise ValueError(f"test_checkpoint must be one of {CHOICES}, got {choice!r}")
    if choice == "last":
        return None, "tested: the last weights"
    monitored = [cb for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor]
    if not monitored:
        raise ValueError(
            "test_checkpoint=best needs a ModelCheckpoint callback with a monitor "
            "(callbacks.model_checkpoint.monitor=val/wer); use test_checkpoint=last without one"
        )
    checkpoint = monitored[0]
    if not checkpoint.best_model_path:
        return None, f"tested: the last weights (no best checkpoint by {checkpoint.monitor} was saved)"
    score = checkpoint.best_model_score
    value = f" = {float(score):.4g}" if score is not None else ""
    return (
        checkpoint.best_model_path,
        f"tested: {checkpoint.best_model_path} (best {checkpoint.monitor}{value})",
    )
