"""LoRA through `peft`, and which parameters train, by configuration (NeMo-style regexes)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch
from peft import LoraConfig, get_peft_model

from models.trainable_tokens import use_row_sparse_trainable_tokens

log = logging.getLogger(__name__)


def apply_lora(
    model: torch.nn.Module,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: Sequence[str] | str = "all-linear",
    trainable_token_indices: Sequence[int] | None = None,
    modules_to_save: Sequence[str] | None = None,
):
    """Wrap a causal LM with LoRA adapters.

    Args:
        target_modules: module names (``[q_proj, v_proj]``) or ``"all-linear"``.
        trainable_token_indices: embedding rows that train in full (e.g. a new ``[MASK]`` token); saved
            with the adapter.
    Returns:
        the `PeftModel`; the base weights are frozen.
    """
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        trainable_token_indices=list(trainable_token_indices) if trainable_token_indices else None,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    if trainable_token_indices:
        use_row_sparse_trainable_tokens(
            model
        )  # same values, no full-vocabulary dW (models/trainable_tokens.py)
    return model


def head_gets_trainable_tokens(model: torch.nn.Module) -> bool:
    """Whether peft's `trainable_token_indices` wrap the LM head as well as the embedding: peft does so for
    a head tied to the embedding (`config.tie_word_embeddings`; models/output_vocabulary.py unties one)."""
    return bool(getattr(model.config, "tie_word_embeddings", False))


def set_trainable(model: torch.nn.Module, freeze: Sequence[str] = (), unfreeze: Sequence[str] = ()) -> None:
    """Freeze parameters whose names match any `freeze` regex, then unfreeze those matching `unfreeze`.

    Unfreeze wins, so ``freeze=[".*"]`` + ``unfreeze=["lora_"]`` reads as "only LoRA trains".
    """
    frozen = [re.compile(p) for p in freeze]
    unfrozen = [re.compile(p) for p in unfreeze]
    for name, param in model.named_parameters():
        if any(p.search(name) for p in frozen):
            param.requires_grad_(False)
        if any(p.search(name) for p in unfrozen):
            param.requires_grad_(True)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def log_parameter_counts(model: torch.nn.Module) -> None:
    trainable, total = count_parameters(model)
    log.info(
        "parameters: %s trainable of %s (%.3f%%)",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(1, total),
    )
