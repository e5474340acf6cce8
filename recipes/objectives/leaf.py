"""LeaF stage 2 as a recipe objective (docs/objectives.md): distil a frozen teacher into the student.

Token normalisation across gradient accumulation and ranks: `loss` returns the SUM of the per-token KL
(`reduction = "sum"`); the recipe divides the gradients by the number of target tokens of the whole
accumulation window on all ranks (recipes/objectives/window.py). Logged values are per-token means.

`fused: true` (the default) computes the KL from both models' final hidden states and frozen heads, chunk by
chunk (models/fused_linear_kl.py): neither model's [B,T,V] logits are made, so on the fast path the student's
CE stays fused too. `fused: false`, or a head that is not a frozen bias-free Linear, reads full logits
(`losses/leaf.py: distillation_loss`), as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from losses.leaf import distillation_loss
from models.causal_lm import resolve_dtype
from models.compiled import compile_by_default
from models.fast_loss import frozen_head_parts
from models.fused_linear_kl import fused_linear_kl
from models.segments import IGNORE_INDEX
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
        fused: KL from hidden states without [B,T,V] logits (see the module docstring); chunk_tokens: the
            positions whose two logit blocks are alive at once.
        compile: (fused) each chunk's softmaxes and KL gradient through torch.compile
            (models/fused_linear_kl.py: kl_rows); null (default) = on CUDA for models at least 1024 wide
            (1B shape: 0.704x -> 0.817x of the fast step, 20.5 -> 16.1 GiB), off below and on CPU.
    """

    name = "leaf"
    reduction = "sum"

    def __init__(
        self,
        teacher: Callable | tuple,
        temperature: float = 1.0,
        teacher_dtype: str = "bf16",
        weight: float = 1.0,
        warmup_steps: int = 0,
        start_step: int = 0,
        fused: bool = True,
        chunk_tokens: int = 2048,
        compile: bool | None = None,
    ):
        super().__init__(weight, warmup_steps, start_step)
        self.fused, self.chunk_tokens, self.compile = bool(fused), int(chunk_tokens), compile
        self.needs_logits, self.needs_hidden_states = not self.fused, self.fused
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

    def _teacher_on(self, device: torch.device) -> torch.nn.Module:
        """The set-up teacher, moved to `device` on first use."""
        if self.teacher is None:
            raise RuntimeError("LeafDistillationObjective.setup(model, tokenizer) must run before loss")
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        return self.teacher

    def teacher_logits(self, batch: dict, device: torch.device) -> torch.Tensor:
        with torch.no_grad():
            return self._teacher_on(device)(**_teacher_inputs(batch)).logits

    def loss(self, ctx: ObjectiveContext) -> torch.Tensor:
        labels = ctx.batch["labels"]
        if self.fused:
            heads = self._frozen_heads(ctx)
            if heads is not None:
                return self._fused_loss(ctx, labels, *heads)
            if ctx.logits is None:
                raise ValueError(
                    "objective.leaf.fused=true needs frozen, bias-free Linear heads on both models (a trainable "
                    "or tied-and-adapted head has none here): set objective.leaf.fused=false"
                )
        teacher_logits = self.teacher_logits(ctx.batch, ctx.logits.device)
        loss_sum = distillation_loss(ctx.logits, teacher_logits, labels, self.temperature, reduction="sum")
        del teacher_logits  # free the [B,T,V] teacher logits before the backward pass
        return loss_sum

    def _frozen_heads(self, ctx: ObjectiveContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(student head [V,D], teacher head [V',D']) when both are frozen bias-free Linears, else None."""
        if ctx.model is None or ctx.hidden_states is None:
            return None
        teacher_model = self._teacher_on(ctx.hidden_states[-1].device)
        student = frozen_head_parts(ctx.model.get_output_embeddings())
        teacher = teacher_model.get_output_embeddings()
        if student is None or student[1] is not None or not isinstance(teacher, torch.nn.Linear):
            return None
        if teacher.bias is not None or teacher_model.get_decoder() is None:
            return None
        return student[0], teacher.weight

    def _fused_loss(self, ctx, labels, student_head, teacher_head) -> torch.Tensor:
        hidden = ctx.hidden_states[-1]  # [B,T,D], after the final norm
        with torch.no_grad():
            decoder = self._teacher_on(hidden.device).get_decoder()
            teacher_hidden = decoder(**_teacher_inputs(ctx.batch)).last_hidden_state
        counted = labels[:, 1:] != IGNORE_INDEX  # logits at t predict labels[t+1]
        return fused_linear_kl(
            hidden[:, :-1][counted],
            student_head,
            teacher_hidden[:, :-1][counted],
            teacher_head,
            self.temperature,
            self.chunk_tokens,
            compile_by_default(self.compile, hidden.device, hidden.shape[-1]),
        )


def _teacher_inputs(batch: dict) -> dict:
    """What the teacher reads of a batch (both paths: the full model for logits, its decoder for states)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
