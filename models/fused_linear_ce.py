"""LM head + cross-entropy with the gradient computed in the forward pass, chunk by chunk, in pure torch.

The checkpointed chunked loss (models/fast_loss.py) runs the LM-head GEMM three times per chunk: forward,
the recomputed forward in backward, and backward. Here each chunk's logits are made once: the loss, the
softmax and the gradient of the hidden states (and of a few trainable head rows) come out of the same
pass, and `backward` only scales what was stored, as liger-kernel's fused linear cross-entropy does (no
Triton needed, so it also runs where Liger does not, and with peft's trainable tokens on a tied head:
MEAP's `[MASK]` row, which kept the 1B fast path off Liger at 0.81x: benchmarks/RESULTS.md).

Head: logits = h @ W^T with W frozen ([V,D], no dW), except rows `rows` ([R]) whose values are
`delta` ([R,D], trainable): logits[:, rows] = h @ delta^T. Gradients: d h = P @ W_eff, d delta =
P[:, rows]^T @ h, with P = (softmax - onehot(target)) * valid / number_of_targets.

`compile_rows=True` runs the per-chunk softmax and its gradient (`softmax_rows`) as one torch.compile'd
function: eager torch makes an fp32 copy of each [chunk, V] block of logits and passes over it five more
times (logsumexp, subtract, exp, scale, cast), about 46 bytes of memory traffic per logit, which at
Llama-3.2-1B shape (16k tokens x 128k vocabulary per step) is about 30 ms of an H200's step, the measured gap
to liger-kernel's Triton loss (0.857x). Compiled, the block is read twice in its own dtype and the gradient
written once. Same values as eager (tests/test_fused_linear_ce.py).
"""

from __future__ import annotations

import torch

from models.compiled import compiled_unless_tracing
from models.segments import IGNORE_INDEX


def softmax_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    inv_count: torch.Tensor,
    need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's CE and its gradient w.r.t. the logits.

    Args:
        logits: [c,V] in the compute dtype (softmax in fp32); fp32 logits are overwritten.
        target: [c] long, in [0, V) (ignored rows clamped to 0).
        valid: [c] bool, the rows that count.
        inv_count: [] fp32, 1 / number of targets of the whole batch.
        need_grad: also return the gradient.
    Returns:
        (summed CE over the valid rows [] fp32, (softmax - onehot) * valid * inv_count [c,V] in logits' dtype,
        or None without need_grad).
    """
    x = logits.float()  # the logits themselves when they are fp32: overwritten
    lse = torch.logsumexp(x, dim=-1)  # [c]
    picked = x.gather(1, target.unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, lse - picked, 0.0).sum()
    if not need_grad:
        return loss, None
    probs = x.sub_(lse.unsqueeze(1)).exp_()  # softmax in place (eager: one fp32 [c,V] block alive)
    probs.scatter_add_(1, target.unsqueeze(1), -torch.ones_like(picked).unsqueeze(1))
    probs.mul_((valid.to(torch.float32) * inv_count).unsqueeze(1))
    return loss, probs.to(logits.dtype)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean CE of `h @ W_eff^T` against `labels`; see the module docstring.

    Args (forward):
        hidden: [N,D] (already aligned with `labels`: no shift here).
        weight: [V,D] frozen head weight (its dtype is the compute dtype).
        labels: [N] long, IGNORE_INDEX = no target.
        chunk_tokens: rows of logits alive at once ([chunk, V] fp32).
        rows: [R] long head rows replaced by `delta`, or None.
        delta: [R,D] trainable rows, or None.
        compile_rows: run `softmax_rows` compiled (see the module docstring).
    Returns:
        scalar fp32: summed CE over targets / max(1, number of targets).
    Memory: the gradient of `hidden` ([N,D]) is kept from forward to backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens, rows=None, delta=None, compile_rows=False):
        dtype = weight.dtype
        h_all = hidden.to(dtype)
        valid_all = labels != IGNORE_INDEX
        inv_count = 1.0 / valid_all.sum().clamp_min(1).to(torch.float32)  # a tensor: no host sync
        need_h = ctx.needs_input_grad[0]
        need_delta = delta is not None and ctx.needs_input_grad[5]
        correction = None if rows is None else delta.to(dtype) - weight.index_select(0, rows)  # [R,D]
        grad_hidden = torch.empty_like(h_all) if need_h else None
        grad_delta = (
            torch.zeros(delta.shape, dtype=torch.float32, device=delta.device) if need_delta else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows_fn = compiled_unless_tracing(softmax_rows, compile_rows, fullgraph=True)
        for start in range(0, h_all.shape[0], chunk_tokens):
            h = h_all[start : start + chunk_tokens]
            y = labels[start : start + chunk_tokens]
            valid = valid_all[start : start + chunk_tokens]
            logits = h @ weight.t()  # [c,V]
            if correction is not None:
                logits.index_add_(1, rows, h @ correction.t())
            chunk_loss, grad_logits = rows_fn(logits, y.clamp_min(0), valid, inv_count, need_h or need_delta)
            total = total + chunk_loss
            del logits
            if grad_logits is None:
                continue
            if need_h:
                grad_h = grad_logits @ weight
                if correction is not None:
                    grad_h = grad_h + grad_logits.index_select(1, rows) @ correction
                grad_hidden[start : start + chunk_tokens] = grad_h
            if need_delta:
                grad_delta += (grad_logits.index_select(1, rows).t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_delta)
        ctx.hidden_dtype = hidden.dtype
        ctx.delta_dtype = None if delta is None else delta.dtype
        return total * inv_count

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_delta = ctx.saved_tensors
        d_hidden = None if grad_hidden is None else (grad_hidden * grad_out).to(ctx.hidden_dtype)
        d_delta = None if grad_delta is None else (grad_delta * grad_out).to(ctx.delta_dtype)
        return d_hidden, None, None, None, None, d_delta, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_tokens: int = 4096,
    rows: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    compile_rows: bool = False,
) -> torch.Tensor:
    """hidden [N,D], weight [V,D] (frozen), labels [N] -> mean CE (see FusedLinearCrossEntropy)."""
    if weight.requires_grad:
        raise ValueError("fused_linear_cross_entropy: the head weight must be frozen (no dW is computed)")
    if (rows is None) != (delta is None):
        raise ValueError("fused_linear_cross_entropy: pass rows and delta together")
    return FusedLinearCrossEntropy.apply(
        hidden, weight, labels, int(chunk_tokens), rows, delta, bool(compile_rows)
    )
