"""Checkpoints hold only what trains: LoRA weights, trainable embedding rows, projectors, encoder stats."""

from __future__ import annotations

import torch


def trainable_state_keys(model: torch.nn.Module) -> set[str]:
    """state_dict keys that change in training: trainable parameters and the buffers of their modules."""
    keys = set()
    for prefix, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if any(p.requires_grad for p in own.values()):
            dot = f"{prefix}." if prefix else ""
            keys.update(f"{dot}{name}" for name, p in own.items() if p.requires_grad)
            keys.update(f"{dot}{name}" for name, _ in module.named_buffers(recurse=False))
    return keys


def keep_trainable_state(checkpoint: dict, model: torch.nn.Module, prefix: str) -> None:
    """Drop frozen weights from a Lightning checkpoint; `prefix` is the model's attribute name + '.'."""
    keep = {f"{prefix}{key}" for key in trainable_state_keys(model)}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
