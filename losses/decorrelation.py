"""BOS decorrelation loss: push hidden states away from the direction of the first token.

Reference: the "sink loss" of Llama-AVSR (arXiv 2510.22603); exact maths in docs/objectives.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def bos_cosines(hidden_states: Sequence[torch.Tensor], layers: Sequence[int] | None = None) -> torch.Tensor:
    """cos(h_l[b,0], h_l[b,t]) for the chosen layers, as float32 (float64 for float64 input) [len(layers), B, T].

    hidden_states: the HF tuple of L+1 tensors [B,T,D] (index 0 = embeddings, L = final normed state).
    layers: indices into that tuple; default 1..L-1 (the decoder layer outputs before the final norm).

    Cheap in memory: per layer it makes one [B,T] dot product with the BOS vector (a batched GEMM with
    fp32 accumulation) and one [B,T] vector norm accumulated in fp32; no [B,T,D] fp32 temporary.
    float16 is the exception: |h_0|.|h_t| overflows its range (65504) as soon as both norms pass about 256,
    and SmolLM2's BOS feature alone is about 24,500, so fp16 states are normalised in fp32 first (one
    [B,T,D] fp32 temporary per layer); bfloat16 has float32's range and keeps the GEMM path.
    """
    if layers is None:
        layers = range(1, len(hidden_states) - 1)
    layers = list(layers)
    if not layers:
        raise ValueError("bos decorrelation needs at least one layer")
    dots, norms = [], []
    for index in layers:
        h = hidden_states[index]
        accumulate = torch.promote_types(h.dtype, torch.float32)  # fp32 for bf16/fp16, fp64 stays fp64
        if h.dtype == torch.float16:
            h = h.float()
            h = h / torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min(1e-12)  # unit rows, fp32
        bos = h[:, 0]  # [B,D], not detached: gradients flow into both sides
        dots.append(torch.einsum("btd,bd->bt", h, bos).to(accumulate))
        norms.append(torch.linalg.vector_norm(h, dim=-1, dtype=accumulate))
    dot = torch.stack(dots)  # [Ls,B,T]
    norm = torch.stack(norms)  # [Ls,B,T]
    return dot / (norm * norm[..., :1]).clamp_min(1e-12)


def bos_decorrelation_loss(
    hidden_states: Sequence[torch.Tensor],
    token_mask: torch.Tensor,
    layers: Sequence[int] | None = None,
    margin: float = 0.0,
) -> torch.Tensor:
    """Mean over layers of the masked mean of cos^2(h_l[b,0], h_l[b,t]) (unweighted).

    Args:
        hidden_states: HF tuple of L+1 tensors [B,T,D], any float dtype.
        token_mask: [B,T] bool, positions compared with position 0; position 0 itself never counts.
        layers: indices into `hidden_states`; default 1..L-1.
        margin: penalise only the part of cos^2 above `margin` (relu(cos^2 - margin)); 0 = reference.
    Returns:
        float32 scalar (float64 for float64 input); 0 (with a graph, not NaN) when no position is selected.

    Every layer sees the same token set, so the mean over layers of per-layer masked means equals
    sum over (layer, selected b,t) / (layers * selected).
    """
    mask = token_mask.bool().clone()
    mask[:, 0] = False
    cos = bos_cosines(hidden_states, layers)
    penalty = cos.square()
    if margin > 0:
        penalty = torch.relu(penalty - margin)
    selected = mask.sum()
    total = (penalty * mask.to(penalty.dtype)).sum()
    return total / (selected.clamp_min(1) * penalty.shape[0])
