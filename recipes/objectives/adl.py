"""Attention Diversification Loss as a recipe objective (docs/objectives.md), on sampled query rows.

The main forward keeps SDPA/flash attention; the recipe captures post-RoPE queries/keys of
`attention_layers` and this objective recomputes the probabilities of S sampled rows per layer
(`models.attention_capture.sampled_head_mean_probs`, O(S*T) per head; the loss reads their mean over
heads) before `attention_diversity_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from losses.attention_diversity import attention_diversity_loss
from models.attention_capture import sampled_head_mean_probs
from models.compiled import compile_by_default
from recipes.objectives.base import Objective, ObjectiveContext


def sample_query_positions(
    attention_mask: torch.Tensor, num_rows: int, generator: torch.Generator
) -> torch.Tensor:
    """Sorted [S] long positions t >= 1 on the mask's device, S = min(num_rows, T - 1).

    Drawn uniformly without replacement among the positions that are real in some row; when fewer than S
    are, all of them plus positions that are padding in every row, which the loss skips (their rows see no
    real query). Position 0 is never drawn (it sees one key: no information). No host sync: the
    permutation comes from `generator` on the host (it needs only T), the mask is read on its device, so a
    GPU step does not wait here for its forward pass.
    """
    length = attention_mask.shape[1]
    count = min(num_rows, length - 1)
    device = attention_mask.device
    order = torch.randperm(length - 1, generator=generator) + 1  # [T-1], host
    if device.type == "cuda":
        order = order.pin_memory().to(device, non_blocking=True)  # pageable copies wait for the stream
    else:
        order = order.to(device)
    real = attention_mask.bool().any(0)[order]  # [T-1], in draw order
    first_real = (~real).long() * length + torch.arange(length - 1, device=device)  # real ones first
    return order[first_real.argsort()[:count]].sort().values


class AttentionDiversityObjective(Objective):
    """Mean over `layers` of ADL on `num_rows` sampled query rows per step.

    Args:
        weight: reference default 1.0.
        layers: decoder layer indices (0-based), or None for all layers.
        num_rows: S, the query rows sampled per step (shared by the batch and by all layers).
        threshold: entries below threshold / (visible keys) are ignored (reference: 2).
        causal: our causal variant (default) or the reference ViT formula (see the loss docstring).
        compile: fuse the recomputed rows with `torch.compile` (models/attention_capture.py:
            sampled_head_mean_probs); null (default) = on CUDA for models at least 1024 wide (1B shape:
            0.839x -> 0.864x of the fast step), off below (small B*S*T: launch-bound) and on CPU.
        seed: with `ctx.sample_key` (the step, or the micro-batch's key under accumulation), seeds the row
            sample, so a resumed run draws the same rows.
    """

    name = "adl"

    def __init__(
        self,
        weight: float = 1.0,
        warmup_steps: int = 0,
        start_step: int = 0,
        layers: Sequence[int] | None = None,
        num_rows: int = 64,
        threshold: float = 2.0,
        causal: bool = True,
        seed: int = 0,
        compile: bool | None = None,
    ):
        super().__init__(weight, warmup_steps, start_step)
        if num_rows < 1:
            raise ValueError(f"adl.num_rows must be >= 1, got {num_rows}")
        self.layers = list(layers) if layers is not None else None
        self.num_rows = int(num_rows)
        self.threshold = float(threshold)
        self.causal = bool(causal)
        self.seed = int(seed)
        self.compile = compile

    def attention_layers(self, num_layers: int) -> list[int]:
        if self.layers is None:
            return list(range(num_layers))
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"adl.layers {bad} out of range: the model has layers 0..{num_layers - 1}")
        return self.layers

    def loss(self, ctx: ObjectiveContext) -> torch.Tensor:
        if not ctx.attention:
            raise ValueError(
                "adl needs captured queries/keys: the recipe must wrap the forward in QueryKeyCapture"
            )
        attention_mask = ctx.batch["attention_mask"]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(ctx.sample_key))
        positions = sample_query_positions(attention_mask, self.num_rows, generator)
        query = next(iter(ctx.attention.values())).query  # [B,H,T,hd]: H * hd is the model's width
        compiled = compile_by_default(self.compile, query.device, query.shape[1] * query.shape[-1])
        per_layer = []
        for layer in sorted(ctx.attention) if self.layers is None else self.layers:
            probs = sampled_head_mean_probs(
                ctx.attention[layer], positions, attention_mask, self.causal, compiled
            )
            per_layer.append(
                attention_diversity_loss(probs, self.threshold, self.causal, positions, attention_mask)
            )
        return torch.stack(per_layer).mean()
