"""Checkpoints hold only what trains: LoRA weights, trainable embedding rows, projectors, encoder stats."""

from __future__ import annotations

import torch

# wrapper segments FSDP and activation checkpointing add to module names, absent from state_dict keys
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _clean(name: str) -> str:
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def trainable_state_keys(model: torch.nn.Module) -> set[str]:
    """state_dict keys that change in training: trainable parameters and the buffers of their modules."""
    keys = set()
    for prefix, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if any(p.requires_grad for p in own.values()):
            dot = f"{prefix}." if prefix else ""
            keys.update(f"{dot}{name}" for name, p in own.items() if p.requires_grad)
            keys.update(f"{dot}{name}" for name, _ in module.named_buffers(recurse=False))
    return {_clean(key) for key in keys}


def keep_trainable_state(checkpoint: dict, model: torch.nn.Module, prefix: str) -> None:
    """Drop frozen weights from a Lightning checkpoint; `prefix` is the model's attribute name + '.'."""
    keep = {f"{prefix}{key}" for key in trainable_state_keys(model)}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


def gathered_part(state_dict: dict | None, prefix: str, merged: bool, is_peft: bool) -> dict | None:
    """The entries of a gathered (FSDP) state dict under `prefix`, prefix removed; None stays None.
    A gathered state holds only the trainable weights: enough for an adapter, not for a merged or full model."""
    if state_dict is None:
        return None
    if merged or not is_peft:
        raise ValueError(
            "under FSDP only the LoRA adapter is exported: set `export_merged=false` (merge afterwards with "
            "PeftModel.from_pretrained(base, '<run>/adapter').merge_and_unload()), or train with trainer=ddp"
        )
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
