"""Attention Diversification Loss (ADL, TAPADL, ICCV 2023) and its causal variant for LLMs.

Exact reference maths: docs/objectives.md (ADL). Inputs are the attention probabilities of S query
rows (all rows, or a sample recomputed by `models.attention_capture.sampled_attention_probs`).
"""

from __future__ import annotations

import torch


def _cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine along the last axis with `torch.nn.functional.cosine_similarity`'s eps convention."""
    dot = (a * b).sum(-1)
    return dot / (a.norm(dim=-1).clamp_min(eps) * b.norm(dim=-1).clamp_min(eps))


def attention_diversity_loss(
    probs: torch.Tensor,
    threshold: float = 2.0,
    causal: bool = True,
    query_positions: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """ADL of one layer: mean cosine between each (thresholded) attention row and the mean row.

    Args:
        probs: [B,H,S,K] attention probabilities of S query rows over K keys (rows of fully hidden
            queries may be all zero).
        threshold: entries below threshold / (number of keys the row can see) are zeroed.
        causal: row i sees keys 0..position(i) only (see below); False = the reference (ViT) formula.
        query_positions: [S] long, the positions of the rows; default 0..S-1 (all rows when S == K).
        key_padding_mask: [B,K], 1/True = real token. Padded keys are invisible; rows whose own
            position is padding are skipped.
    Returns:
        float32 scalar: mean over valid (b, row) of cos(mhat_b,i, Ahat_b,i); 0 when no row is valid. A row
        whose threshold tau >= 1 can never pass it and is not counted (reference: only when K <= threshold).

    Reference (causal=False, all rows, no padding) — equal to TAPADL for one layer:
        Abar = mean over heads [B,S,K]; tau = threshold / K; m = mean over rows of Abar [B,K];
        Ahat = Abar * 1[Abar > tau]; mhat = m * 1[m > tau]; loss = mean over b, i of cos(mhat_b, Ahat_b,i).
        Every axis is explicit (no squeeze), so a batch of one works (the reference squeezes the wrong axis).
        Indicators carry no gradient; gradients flow through both Abar and m.

    Causal variant (our design): row i (at position p_i) sees n_i = |{k <= p_i, k not padded}| keys, so
        - tau_i = threshold / n_i (= threshold / (p_i + 1) without padding): "twice uniform over what the
          row can see", instead of a fixed threshold / K that is meaningless for short prefixes;
        - the mean row m_b = mean over the valid sampled rows of Abar_b,i (zeros where a row cannot see);
          row i is compared with m_b restricted to its own visible keys and renormalised to sum 1
          (m_b,i = m_b * vis_i / sum(m_b * vis_i)), so both sides are distributions over the same prefix and
          tau_i means the same thing for both;
        - rows with fewer than 2 visible keys are skipped (row 0 is always cos = 1, a constant), and rows
          with n_i <= threshold (tau_i >= 1: no probability can pass) are left out of the average.
        A strong BOS sink dominates m, so lowering the loss pushes rows away from the shared sink pattern.
    Without padding and with causal=False the renormalisation is not applied (it is a no-op up to rounding).
    Cost O(B*S*K): linear in the number of rows, never pairwise.
    """
    if probs.dim() != 4:
        raise ValueError(f"probs must be [B,H,S,K], got shape {tuple(probs.shape)}")
    batch, _, rows, keys = probs.shape
    device = probs.device
    if query_positions is None:
        query_positions = torch.arange(rows, device=device)
    query_positions = query_positions.to(device)
    attn = probs.to(torch.promote_types(probs.dtype, torch.float32)).mean(dim=1)  # [B,S,K]

    key_ids = torch.arange(keys, device=device)
    visible = torch.ones(1, rows, keys, dtype=torch.bool, device=device)
    if causal:
        visible = (key_ids[None, :] <= query_positions[:, None])[None]  # [1,S,K]
    row_valid = torch.ones(batch, rows, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        real = key_padding_mask.to(device).bool()  # [B,K]
        visible = visible & real[:, None, :]
        row_valid = row_valid & real.gather(1, query_positions.clamp_max(keys - 1)[None].expand(batch, -1))
    visible = visible.expand(batch, rows, keys)
    n_visible = visible.sum(-1)  # [B,S]
    row_valid = row_valid & (n_visible >= (2 if causal else 1)) & (attn.sum(-1) > 0)
    weights = row_valid.to(attn.dtype)  # rows that make the mean row

    mean_row = (attn * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1)  # [B,K]
    mean_row = mean_row[:, None, :] * visible.to(attn.dtype)  # [B,S,K], each row's view of the mean row
    if causal:
        mean_row = mean_row / mean_row.sum(-1, keepdim=True).clamp_min(1e-12)
    tau = threshold / n_visible.clamp_min(1).to(attn.dtype)[..., None]  # [B,S,1]
    attn_hat = attn * (attn > tau)
    mean_hat = mean_row * (mean_row > tau)
    cos = _cosine(mean_hat, attn_hat)  # [B,S]
    # a row whose tau_i >= 1 (n_i <= threshold) cannot pass: no probability exceeds 1, its cosine is 0 with
    # no gradient, so it is left out of the average instead of diluting it
    counted = weights * (tau[..., 0] < 1).to(attn.dtype)
    return (cos * counted).sum() / counted.sum().clamp_min(1)
