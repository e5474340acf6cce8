"""LeaF (Learning to Focus, NeurIPS 2025): confounder scores, spans, and the distillation loss.

Exact maths: docs/objectives.md (LeaF). Pure functions; the teacher, the tokenizer and the
normalisation across accumulation steps and ranks live in `recipes/objectives/leaf.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.segments import IGNORE_INDEX


def min_max(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max normalise along the last axis to [0, 1]; a constant row maps to 0."""
    low = x.amin(dim=-1, keepdim=True)
    span = x.amax(dim=-1, keepdim=True) - low
    return torch.where(span > eps, (x - low) / span.clamp_min(eps), torch.zeros_like(x))


def confounder_scores(teacher_grad_norms: torch.Tensor, student_grad_norms: torch.Tensor) -> torch.Tensor:
    """d = minmax(minmax(g_T) - minmax(g_S)) along the last axis; [T] or [B,T] in, same shape out.

    Low d: a token the student leans on much more than the teacher does (a confounder candidate).
    """
    if teacher_grad_norms.shape != student_grad_norms.shape:
        raise ValueError(
            f"shape mismatch: teacher {tuple(teacher_grad_norms.shape)} "
            f"vs student {tuple(student_grad_norms.shape)}"
        )
    return min_max(min_max(teacher_grad_norms.float()) - min_max(student_grad_norms.float()))


def confounder_spans(
    scores: torch.Tensor, quantile: float, cap: float = 0.5, protected: torch.Tensor | None = None
) -> list[tuple[int, int]]:
    """Maximal runs of confounder tokens as half-open (start, end) pairs, in order.

    scores: [n] confounder scores (e.g. of the instruction tokens). A token is a confounder when
        score <= min(sorted(scores)[floor(n * quantile)], cap) and it is not `protected` ([n] bool,
        e.g. whitespace/newline tokens, which are never pruned).
    Scores that are all equal (teacher and student gradients tie up to scale, so `confounder_scores` is 0
    everywhere) single out no token: no span, rather than the whole prompt.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    n = scores.numel()
    if n == 0 or float(scores.max() - scores.min()) <= 1e-12:
        return []
    index = min(math.floor(n * quantile), n - 1)
    threshold = min(float(scores.sort().values[index]), cap)
    flags = scores <= threshold
    if protected is not None:
        flags = flags & ~protected.bool()
    spans, start = [], None
    for i, flag in enumerate(flags.tolist()):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, n))
    return spans


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL(p_T || p_S) at temperature T, times T^2, over target positions.

    Args:
        student_logits: [B,T,V]; teacher_logits: [B,T,V'] with V' >= V (cut to the first V entries).
        labels: [B,T], HF convention: the logits at t predict labels[t+1], so position t counts when
            labels[:, t+1] != -100 (the last position never counts).
        reduction: "mean" = divided by the number of counted positions (0 when there are none);
            "sum" = the plain sum, for callers that normalise by a global token count.
    Softmaxes in float32 (float64 inputs stay float64), only on the counted positions.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    vocab = student_logits.shape[-1]
    if teacher_logits.shape[-1] < vocab:
        raise ValueError(
            f"teacher vocabulary ({teacher_logits.shape[-1]}) is smaller than the student's ({vocab})"
        )
    counted = labels[:, 1:] != IGNORE_INDEX  # [B,T-1]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp32 softmax (fp64 stays fp64)
    student = student_logits[:, :-1][counted].to(dtype) / temperature  # [N,V]
    teacher = teacher_logits[:, :-1, :vocab][counted].to(dtype) / temperature
    log_p_student = F.log_softmax(student, dim=-1)
    log_p_teacher = F.log_softmax(teacher, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1) * temperature**2  # [N]
    total = kl.sum()
    if reduction == "sum":
        return total
    return total / max(kl.numel(), 1)
