"""LeaF stage 2 as a recipe objective (OBJECTIVES.md §4): distil a frozen teacher into the student.

Token normalisation across gradient accumulation and ranks
-----------------------------------------------------------
We want the gradient of  KL_window = (sum over every target token of the accumulation window, on every
rank, of kl_t) / N,  N = number of those tokens. Lightning divides each micro-batch loss by A
(`accumulate_grad_batches`) and DDP averages gradients over the R ranks, so the gradient applied is
(1/R) sum_r (1/A) sum_i grad(l_{r,i}). Returning, for micro-batch i on rank r,

    l_{r,i} = S_{r,i} * A * R / N        (S_{r,i} = sum of kl_t over its own target tokens)

gives exactly grad(KL_window), whatever the token counts of the micro-batches. N comes from
`batch["target_tokens_in_window"]` when the data side provides it (exact: the loader looks ahead over
the window and all-reduces). Otherwise N is estimated as A * (this micro-batch's target tokens summed
over ranks by all_reduce): exact when A = 1, and the usual per-micro-batch normalisation when A > 1.
With A = R = 1 the value is the plain token mean, so logged values are comparable across set-ups.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from losses.leaf import IGNORE_INDEX, distillation_loss
from models.causal_lm import resolve_dtype
from recipes.objectives.base import Objective, ObjectiveContext

WINDOW_TOKENS_KEY = "target_tokens_in_window"


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def normalise_over_window(loss_sum: torch.Tensor, local_tokens: torch.Tensor, accumulate_grad_batches: int,
                          window_tokens: torch.Tensor | int | None = None, ranks: int | None = None) -> torch.Tensor:
    """S * A * R / N (see the module docstring); N estimated from `local_tokens` when not given."""
    ranks = world_size() if ranks is None else ranks
    if window_tokens is None:
        window_tokens = sum_over_ranks(local_tokens.float()) * accumulate_grad_batches
    window_tokens = torch.as_tensor(window_tokens, dtype=torch.float32, device=loss_sum.device)
    return loss_sum * (accumulate_grad_batches * ranks) / window_tokens.clamp_min(1)


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> None:
    """LeaF compares token indices: both tokenizers must map every token to the same id."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab == student_vocab:
        return
    differing = sorted(t for t in set(teacher_vocab) | set(student_vocab)
                       if teacher_vocab.get(t) != student_vocab.get(t))
    raise ValueError(
        "LeaF needs the teacher and the student to share one tokenizer (token ids are compared): "
        f"teacher has {len(teacher_vocab)} tokens, student {len(student_vocab)}; "
        f"{len(differing)} differ, e.g. {differing[:5]}. Pick a teacher of the student's family."
    )


class LeafDistillationObjective(Objective):
    """KL(teacher || student) at `temperature` over target tokens, normalised over the window.

    Args:
        teacher: callable returning (model, tokenizer) (a Hydra `_partial_` node, built in `setup`), or
            such a pair. The teacher is frozen, in eval mode, run under no_grad in `teacher_dtype`, and kept
            outside the LightningModule (never optimised, never checkpointed); it follows the student's
            device on first use.
        temperature: T; the loss is scaled by T^2.
        accumulate_grad_batches: A, the trainer's value (config: `${trainer.accumulate_grad_batches}`).
        weight: 1.0; with `model.ce_weight: 0` (lm_leaf) distillation is the whole loss, as in the reference.
    """

    name = "leaf"

    def __init__(self, teacher: Callable | tuple, temperature: float = 1.0, teacher_dtype: str = "bf16",
                 accumulate_grad_batches: int = 1, weight: float = 1.0, warmup_steps: int = 0):
        super().__init__(weight, warmup_steps)
        if temperature <= 0:
            raise ValueError(f"leaf.temperature must be > 0, got {temperature}")
        self.teacher_source = teacher
        self.temperature = float(temperature)
        self.teacher_dtype = resolve_dtype(teacher_dtype)
        self.accumulate_grad_batches = max(1, int(accumulate_grad_batches))
        self.teacher: torch.nn.Module | None = None

    def setup(self, model: torch.nn.Module, tokenizer) -> list[int]:
        teacher, teacher_tokenizer = self.teacher_source() if callable(self.teacher_source) else self.teacher_source
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
            return self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss(self, ctx: ObjectiveContext) -> torch.Tensor:
        labels = ctx.batch["labels"]
        teacher_logits = self.teacher_logits(ctx.batch, ctx.logits.device)
        loss_sum = distillation_loss(ctx.logits, teacher_logits, labels, self.temperature, reduction="sum")
        del teacher_logits
        local_tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
        return normalise_over_window(loss_sum, local_tokens, self.accumulate_grad_batches,
                                     ctx.batch.get(WINDOW_TOKENS_KEY))
