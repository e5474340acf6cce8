"""Optimiser and learning-rate schedule from Hydra partials (shared by every recipe)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping

import torch

from harness.clipping import amp_scaler
from recipes.flat_params import FlatParameters

log = logging.getLogger(__name__)


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


FUSABLE = (torch.optim.AdamW, torch.optim.Adam)


def device_defaults(optimizer_factory, params: list, scaler=None) -> dict:
    """{"fused": True} for torch Adam/AdamW over CUDA parameters when the config leaves `fused` unset
    (null), sets no `foreach` and no fp16 GradScaler is in use (`scaler`: Lightning refuses to clip
    gradients for an optimizer that unscales internally; under bf16 harness/clipping.py clips); {} otherwise.

    Why: LoRA has hundreds of small tensors (420 in SmolLM2-135M with r16 on every linear layer). The
    default foreach AdamW spends host time per tensor (bias corrections from CPU step counters: two
    `.item()` per tensor per step), which a launch-bound small-model step cannot hide; the fused kernel
    updates every tensor in one call. Same maths (torch tests fused against foreach).
    """
    func = getattr(optimizer_factory, "func", optimizer_factory)
    keywords = getattr(optimizer_factory, "keywords", {}) or {}
    explicit = keywords.get("fused") is not None or keywords.get("foreach") is not None
    if func not in FUSABLE or explicit or scaler is not None:
        return {}
    on_cuda = all(p.device.type == "cuda" and p.is_floating_point() for p in params)
    return {"fused": True} if params and on_cuda else {}


def scaled_param_groups(
    named_params: list[tuple[str, torch.nn.Parameter]], base_lr: float, lr_scale: Mapping[str, float]
) -> list[dict]:
    """Parameter groups whose learning rate is `base_lr` times the factor of the first `lr_scale` regex
    (re.search over the parameter name) that matches, 1 where none does; e.g. {"model.encoders.audio": 0.05}
    trains an unfrozen pretrained encoder 20x slower than the adapters. A pattern that matches no trainable
    parameter, or a factor <= 0 (freeze those weights instead), is an error."""
    patterns = {pattern: float(factor) for pattern, factor in lr_scale.items()}
    bad = {pattern: factor for pattern, factor in patterns.items() if factor <= 0}
    if bad:
        raise ValueError(f"model.lr_scale factors must be > 0 (freeze those parameters instead): {bad}")
    groups: dict[float, list[torch.nn.Parameter]] = {}
    used = set()
    for name, param in named_params:
        pattern = next((pat for pat in patterns if re.search(pat, name)), None)
        used.add(pattern)
        groups.setdefault(patterns.get(pattern, 1.0), []).append(param)
    unused = [pattern for pattern in patterns if pattern not in used]
    if unused:
        raise ValueError(
            f"model.lr_scale: {unused} match no trainable parameter (names look like "
            f"{[name for name, _ in named_params[:3]]}...)"
        )
    return [{"params": params, "lr": base_lr * factor} for factor, params in sorted(groups.items())]


def configure_optimizers(
    module, optimizer_factory, scheduler_factory=None, flat: bool = False, lr_scale: Mapping | None = None
):
    """Lightning `configure_optimizers` body: AdamW-like partial over trainable params + step-wise schedule
    (fused AdamW on CUDA unless the config says otherwise: `device_defaults`). `flat`: the trainable params
    become views of one buffer per dtype/device (recipes/flat_params.py) and the optimizer gets the buffers;
    set as `module.flat_params`, whose `zero_grad` the recipe's `optimizer_zero_grad` calls.
    Single process only: under DDP/FSDP the strategies own the gradient layout, so it is left off there.
    `lr_scale`: {regex: factor} learning-rate multipliers by parameter name (`scaled_param_groups`); the
    schedule scales every group alike."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError("no trainable parameters: check `peft` and the freeze/unfreeze regexes")
    if lr_scale and flat:
        raise ValueError("model.lr_scale needs separate parameter groups: set model.flat_params=false")
    if flat:
        world = module.trainer.world_size if module._trainer is not None else 1
        if world > 1:
            log.warning("model.flat_params=true is single-process only: left off with %d processes", world)
        else:
            module.flat_params = FlatParameters(params)
            params = list(module.flat_params.flat)
    scaler = amp_scaler(module._trainer) if module._trainer is not None else None
    defaults = device_defaults(optimizer_factory, params, scaler)
    if lr_scale:
        base_lr = (getattr(optimizer_factory, "keywords", {}) or {}).get("lr")
        if base_lr is None:
            raise ValueError("model.lr_scale needs the optimizer's lr in its config (optimizer.lr)")
        optimizer = optimizer_factory(scaled_param_groups(named, float(base_lr), lr_scale), **defaults)
    else:
        optimizer = optimizer_factory(params, **defaults)
    if scheduler_factory is None:
        return optimizer
    total = module.trainer.estimated_stepping_batches if module._trainer is not None else 1
    scheduler = scheduler_factory(optimizer, total_steps=max(1, int(total)))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
