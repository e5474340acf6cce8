"""The recipes' gradient clipping (`configure_gradient_clipping`), where Lightning's own refuses to clip.

- FSDP: norm clipping through FSDP's `clip_grad_norm_` (Lightning's FSDPPrecision refuses
  `gradient_clip_algorithm='norm'`: seen on 2 H200s).
- A fused optimizer under bf16 autocast (fused AdamW is the default on CUDA: recipes/optim.py): Lightning's
  MixedPrecision refuses to clip for any optimizer that "performs unscaling internally", scaler or not. With
  bf16 there is no GradScaler and nothing to unscale, so the gradients are clipped here with torch's
  `clip_grad_norm_` / `clip_grad_value_`, as Lightning would without the check. With fp16 (a scaler) the
  refusal stands, and recipes/optim.py does not pick fused there.
- Otherwise Lightning's clipping, unchanged.
"""

from __future__ import annotations

import lightning as L
import torch

from harness.fsdp import is_fsdp


def amp_scaler(trainer) -> object | None:
    """The precision plugin's GradScaler (fp16 mixed precision), or None."""
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None)


def unscales_internally(optimizer) -> bool:
    """What Lightning checks: fused Adam/AdamW set `_step_supports_amp_scaling`."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def clip_gradients(module: L.LightningModule, optimizer, gradient_clip_val, gradient_clip_algorithm) -> None:
    trainer = module.trainer
    by_norm = gradient_clip_algorithm in (None, "norm")
    if gradient_clip_val and is_fsdp(trainer) and by_norm:
        trainer.strategy.model.clip_grad_norm_(float(gradient_clip_val))
        return
    if gradient_clip_val and unscales_internally(optimizer) and amp_scaler(trainer) is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if by_norm:
            torch.nn.utils.clip_grad_norm_(params, float(gradient_clip_val))
        else:
            torch.nn.utils.clip_grad_value_(params, float(gradient_clip_val))
        return
    module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
