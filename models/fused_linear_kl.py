"""Distillation KL from hidden states, chunk by chunk: neither model's [B,T,V] logits ever exist.

LeaF's distillation (losses/leaf.py: `distillation_loss`) reads the student's and the teacher's full
logits: at Llama-3.2-1B shape (V = 128,256, B=8, T=2048) that is several 4-8 GB tensors and most of the
70 GiB the 1B LeaF row used (benchmarks/RESULTS.md). Here each chunk of counted positions makes its two
logit blocks from the final hidden states and the frozen heads, adds its KL, and computes the gradient of
the student's hidden states in the same pass (as `models/fused_linear_ce.py` does for the CE), so `backward`
only scales what was stored.

    s = h_s @ W_s^T / T,  t = (h_t @ W_t^T)[:, :V] / T,  loss = T^2 * sum_rows KL(softmax(t) || softmax(s))
    d loss / d h_s = T * (softmax(s) - softmax(t)) @ W_s          (the teacher gets no gradient)

`compile_rows=True` runs each chunk's two softmaxes, the KL and its gradient (`kl_rows`) as one
torch.compile'd function instead of eager passes over fp32 copies of both [chunk, V] blocks.
"""

from __future__ import annotations

import torch

from models.compiled import compiled_unless_tracing


def kl_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's summed T^2 KL(p_teacher || p_student) and its gradient w.r.t. the student's logits.

    Args:
        student_logits: [c,V] (compute dtype); teacher_logits: [c,V] (already cut to V).
        temperature: T > 0. need_grad: also return the gradient.
    Returns:
        (sum over rows [] in fp32, fp64 for fp64 logits; T * (p_student - p_teacher) [c,V] in the student
        logits' dtype, or None).
    """
    acc = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_student = torch.log_softmax(student_logits.to(acc) / temperature, dim=-1)
    log_p_teacher = torch.log_softmax(teacher_logits.to(acc) / temperature, dim=-1)
    p_teacher = log_p_teacher.exp()
    total = (p_teacher * (log_p_teacher - log_p_student)).sum() * temperature**2
    if not need_grad:
        return total, None
    grad = log_p_student.exp_().sub_(p_teacher).mul_(temperature)  # d/ds of T^2 KL, s the undivided logits
    return total, grad.to(student_logits.dtype)


class FusedLinearKL(torch.autograd.Function):
    """Summed T^2 * KL(p_teacher || p_student) over rows; see the module docstring.

    Args (forward):
        hidden: [N,D] student final hidden states of the counted positions.
        weight: [V,D] frozen student head (its dtype is the compute dtype).
        teacher_hidden: [N,D'] teacher final hidden states of the same positions (no gradient).
        teacher_weight: [V',D'] frozen teacher head, V' >= V (cut to the first V logits).
        temperature: T > 0.
        chunk_tokens: rows whose logits are alive at once (two [chunk, V] fp32 blocks).
        compile_rows: run `kl_rows` compiled.
    Returns:
        scalar (fp32, fp64 for fp64 heads): the sum over rows (the caller normalises).
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, teacher_hidden, teacher_weight, temperature, chunk_tokens, compile_rows=False
    ):
        dtype, vocab = weight.dtype, weight.shape[0]
        acc = torch.promote_types(dtype, torch.float32)  # softmaxes in fp32 (fp64 heads stay fp64)
        need_h = ctx.needs_input_grad[0]
        h_all = hidden.to(dtype)
        t_all = teacher_hidden.to(teacher_weight.dtype)
        grad_hidden = torch.empty_like(h_all) if need_h else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        rows_fn = compiled_unless_tracing(kl_rows, compile_rows, fullgraph=True)
        for start in range(0, h_all.shape[0], chunk_tokens):
            h = h_all[start : start + chunk_tokens]
            teacher_logits = (t_all[start : start + chunk_tokens] @ teacher_weight.t())[:, :vocab]
            chunk_total, grad_logits = rows_fn(h @ weight.t(), teacher_logits, temperature, need_h)
            total = total + chunk_total
            if need_h:
                grad_hidden[start : start + chunk_tokens] = grad_logits @ weight
        ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        d_hidden = None if grad_hidden is None else (grad_hidden * grad_out).to(ctx.hidden_dtype)
        return d_hidden, None, None, None, None, None, None


def fused_linear_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 2048,
    compile_rows: bool = False,
) -> torch.Tensor:
    """hidden [N,D], weight [V,D], teacher_hidden [N,D'], teacher_weight [V',D'] -> summed T^2 KL."""
    if weight.requires_grad or teacher_weight.requires_grad:
        raise ValueError("fused_linear_kl: both heads must be frozen (no head gradient is computed)")
    if teacher_weight.shape[0] < weight.shape[0]:
        raise ValueError(
            f"teacher vocabulary ({teacher_weight.shape[0]}) is smaller than the student's ({weight.shape[0]})"
        )
    if hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"student rows {hidden.shape[0]} != teacher rows {teacher_hidden.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return FusedLinearKL.apply(
        hidden,
        weight,
        teacher_hidden,
        teacher_weight,
        float(temperature),
        int(chunk_tokens),
        bool(compile_rows),
    )
