"""FSDP glue: which layers to shard, and the trainable weights gathered on every rank before rank 0 exports.

Lightning 2.6.6 runs FSDP on GPUs only (its accelerator connector refuses `accelerator=cpu`); the check is
`benchmarks/fsdp_check.sh` (2 GPUs: train, checkpoint, resume, export, load into PEFT, compare with DDP).
Checkpoints are "full" (gathered on rank 0, then reduced to the trainable weights by the recipes'
`on_save_checkpoint`): Lightning's full-checkpoint loader loads with `strict_loading` (False in our recipes),
whereas its sharded loader asks the checkpoint for every weight, frozen ones included.
"""

from __future__ import annotations

import contextlib
import importlib

import lightning as L
import torch


def layer_classes(names: list[str]) -> set[type]:
    """Module classes from dotted paths (`transformers.models.llama.modeling_llama.LlamaDecoderLayer`):
    FSDPStrategy's `auto_wrap_policy` / `activation_checkpointing_policy` take such a set."""
    classes = set()
    for name in names:
        module, _, attr = name.rpartition(".")
        classes.add(getattr(importlib.import_module(module), attr))
    return classes


def is_fsdp(trainer: L.Trainer) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(getattr(trainer, "strategy", None), FSDPStrategy)  # stand-in trainers have none


def gather_trainable_state(trainer: L.Trainer, module: torch.nn.Module) -> dict | None:
    """Under FSDP: the full state dict of the trainable weights on rank 0 (a collective: every rank must call
    it), {} on the other ranks; None without FSDP (export reads the module itself)."""
    if not is_fsdp(trainer):
        return None
    from lightning.fabric.strategies.fsdp import _get_full_state_dict_context

    from recipes.checkpoint import trainable_state_keys

    keep = trainable_state_keys(module)
    with _get_full_state_dict_context(trainer.strategy.model, world_size=trainer.world_size):
        full = trainer.strategy.model.state_dict()
    return {k: v for k, v in full.items() if k in keep}


def root_params_gathered(trainer: L.Trainer):
    """Under FSDP: a context in which the root unit's parameters (embedding, final norm, LM head: what the
    decoder-layer wrap policy leaves to the root) are whole, for a forward that bypasses the wrapped
    module (the sink probe calls `pl_module.llm` itself: outside the root's forward the embedding weight is
    a flat shard, "'weight' must be 2-D" on 2 H200s). The wrapped decoder layers gather their own
    parameters in their forward. A no-op context without FSDP."""
    if trainer is None or not is_fsdp(trainer):
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, recurse=False, writeback=False)
