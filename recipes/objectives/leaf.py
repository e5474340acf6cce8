"""LeaF stage 2 as a recipe objective (docs/objectives.md): distil a frozen teacher into the student.

Token normalisation across gradient accumulation and ranks: `loss` returns the SUM of the per-token KL
(`reduction = "sum"`); the recipe divides the gradients by the number of target tokens of the whole
accumulation window on all ranks (recipes/objectives/window.py). Logged values are per-token means.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from losses.leaf import distillation_loss
from models.causal_lm import resolve_dtype
from recipes.objectives.base import Objective, ObjectiveContext


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> None:
    """LeaF compares token indices: both tokenizers must map every token to the same id."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab == student_vocab:
        return
    differing = sorted(
        t for t in set(teacher_vocab) | set(student_vocab) if teacher_vocab.get(t) != student_vocab.get(t)
    )
    raise ValueError(
        "LeaF needs the teacher and the student to share one tokenizer (token ids are compared): "
        f"teacher has {len(teacher_vocab)} tokens, student {len(student_vocab)}; "
        f"{len(differing)} differ, e.g. {differing[:5]}. Pick a teacher of the student's family."
    )


class LeafDistillationObjective(Objective):
    """KL(teacher || student) at `temperature`, summed over target tokens (the recipe normalises).

    Args:
        teacher: callable returning (model, tokenizer) (a Hydra `_partial_` node, built in `setup`), or
            such a pair. The teacher is frozen, in eval mode, run under no_grad in `teacher_dtype`, and kept
            outside the LightningModule (never optimised, never checkpointed); it follows the student's
            device on first use.
        temperature: T; the loss is scaled by T^2.
        weight: 1.0; with `model.ce_weight: 0` (lm_leaf) distillation is the whole loss, as in the reference.
    """

    name = "leaf"
    reduction = "sum"
    needs_logits = True

    def __init__(
        self,
        teacher: Callable | tuple,
        temperature: float = 1.0,
        teacher_dtype: str = "bf16",
        weight: float = 1.0,
        warmup_steps: int = 0,
        start_step: int = 0,
    ):
        super().__init__(weight, warmup_steps, start_step)
        if temperature <= 0:
            raise ValueError(f"leaf.temperature must be > 0, got {temperature}")
        self.teacher_source = teacher
        self.temperature = float(temperature)
        self.teacher_dtype = resolve_dtype(teacher_dtype)
        self.teacher: torch.nn.Module | None = None

    def setup(self, model: torch.nn.Module, tokenizer) -> list[int]:
        teacher, teacher_tokenizer = (
            self.teacher_source() if callable(self.teacher_source) else self.teacher_source
        )
        check_same_tokenizer(teacher_tokenizer, tokenizer)
        teacher.requires_grad_(False)
        self.teacher = teacher.to(self.teacher_dtype).eval()
        return []

    def teacher_logits(self, batch: dict, device: torch.device) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("LeafDistillationObjective.setup(model, tokenizer) must run before loss")
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            return self.teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits

    def loss(self, ctx: ObjectiveContext) -> torch.Tensor:
        labels = ctx.batch["labels"]
        teacher_logits = self.teacher_logits(ctx.batch, ctx.logits.device)
        loss_sum = distillation_loss(ctx.logits, teacher_logits, labels, self.temperature, reduction="sum")
        del teacher_logits  # free the [B,T,V] teacher logits before the backward pass
        return loss_sum
