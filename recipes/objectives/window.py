"""Normalise summed token losses by the target tokens of the whole accumulation window, on all ranks.

Objectives with `reduction = "sum"` (LeaF distillation) return a sum over their target tokens. We want the
applied gradient to be grad(sum of every token loss of the window, on every rank) / N, N = the number of
those tokens, however unevenly they fall into micro-batches (torchtune's normalisation). Lightning divides
each micro-batch loss by A (`accumulate_grad_batches`) and DDP averages gradients over R ranks, so each
micro-batch loss is multiplied by A * R here, its tokens are counted, and just before the optimizer step
(after the last micro-batch, before gradient clipping) the gradients are divided by N, all-reduced over
ranks. N is only known at the end of the window, which is why the division acts on gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class WindowTokenNormaliser:
    def __init__(self):
        self.local_tokens: torch.Tensor | None = None

    def scale(
        self, loss_sum: torch.Tensor, local_tokens: torch.Tensor, accumulate: int, ranks: int
    ) -> torch.Tensor:
        """Count this micro-batch's target tokens; return the loss to back-propagate (sum * A * R)."""
        tokens = local_tokens.detach().to(torch.float64)
        self.local_tokens = tokens if self.local_tokens is None else self.local_tokens + tokens
        return loss_sum * (accumulate * ranks)

    def apply(self, parameters) -> float:
        """Divide the accumulated gradients by N (all ranks, whole window); returns N and resets."""
        if self.local_tokens is None:
            return 0.0
        total = self.local_tokens.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        self.local_tokens = None
        scale = 1.0 / max(float(total), 1.0)
        for param in parameters:
            if param.grad is not None:
                param.grad.mul_(scale)
        return float(total)
