"""A quiet CPU Lightning Trainer for tests that fit a module for a few steps."""

from __future__ import annotations

import lightning as L


def quiet_cpu_trainer(**settings) -> L.Trainer:
    """CPU, no logger, no checkpoints, no progress bar or model summary; `settings` add to or override
    these (max_steps, callbacks, ...)."""
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **settings})
