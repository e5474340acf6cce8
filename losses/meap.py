"""MEAP (Mask-Enhanced Autoregressive Prediction, ICML 2025): mask a fraction of input tokens.

Exact maths: docs/objectives.md (MEAP). Pure tensor code, no tokenizer access: the caller passes the
id of the `[MASK]` token.
"""

from __future__ import annotations

import torch

from models.segments import IGNORE_INDEX

MODES = ("pretrain", "sft")


def _random_scores(
    shape: torch.Size, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """Uniform scores drawn on the generator's device (so one CPU generator serves GPU batches too)."""
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device).to(device)


def choose_positions(
    eligible: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick exactly max(1, floor(ratio * n_b)) of the n_b eligible positions of each row, uniformly.

    eligible: [B,T] bool. Returns [B,T] bool; rows with n_b = 0 get nothing. Vectorised: a random score
    per position (ineligible ones pushed last), the rank of each score inside its row, then rank < count.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    n = eligible.sum(dim=1)  # [B]
    count = torch.clamp(torch.floor(n.double() * ratio).long(), min=1)
    count = torch.minimum(count, n)
    scores = _random_scores(eligible.shape, eligible.device, generator)
    scores = scores.masked_fill(~eligible, 2.0)  # ineligible ranks after every eligible position
    order = scores.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(eligible.shape[1], device=eligible.device).expand_as(order))
    return (rank < count[:, None]) & eligible


def meap_mask(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    mask_token_id: int,
    ratio: float,
    mode: str,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a fraction of input positions by `mask_token_id`; returns new (input_ids, labels).

    Args:
        input_ids, labels: [B,T] long, HF convention (labels unshifted, -100 = no target; the model
            predicts labels[t+1] from position t).
        ratio: fraction of eligible positions to mask; each row gets exactly max(1, floor(ratio * n)) of
            its n eligible positions (rows with n = 0 are returned unchanged).
        mode: "pretrain": eligible = labels != -100 except position 0; labels are returned unchanged
                  (targets stay the clean tokens).
              "sft": eligible = answer positions (labels != -100) except position 0 (labels[0] is never a
                  target under the HF shift); returns the masked copy: labels are -100 everywhere
                  except at the masked positions, which keep their original token, so position p-1
                  learns to predict the token hidden at p.
        generator: makes the draw reproducible (may live on another device than the inputs).
    The inputs are never modified in place.
    """
    if mode not in MODES:
        raise ValueError(f"MEAP mode must be one of {MODES}, got {mode!r}")
    eligible = labels != IGNORE_INDEX
    eligible[:, 0] = False
    chosen = choose_positions(eligible, ratio, generator)
    masked_ids = input_ids.masked_fill(chosen, mask_token_id)
    if mode == "pretrain":
        return masked_ids, labels.clone()
    return masked_ids, torch.where(chosen, labels, torch.full_like(labels, IGNORE_INDEX))
