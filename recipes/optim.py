"""Optimiser and learning-rate schedule from Hydra partials (shared by every recipe)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the base LR, then cosine decay to `min_lr_ratio` x base at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def configure_optimizers(module, optimizer_factory, scheduler_factory=None):
    """Lightning `configure_optimizers` body: AdamW-like partial over trainable params + step-wise schedule."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check `peft` and the freeze/unfreeze regexes")
    optimizer = optimizer_factory(params)
    if scheduler_factory is None:
        return optimizer
    total = module.trainer.estimated_stepping_batches if module._trainer is not None else 1
    scheduler = scheduler_factory(optimizer, total_steps=max(1, int(total)))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
