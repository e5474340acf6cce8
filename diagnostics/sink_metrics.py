"""Attention-sink and massive-activation metrics as pure functions on tensors.

Every function takes plain tensors and a boolean `valid` mask [B, T] (True = real token, False = padding),
so the numbers can be checked by hand. Padding never counts: not as a query, not as a key, not as a token.
Sequences are right-padded: position 0 is the first real token of every sample ("BOS" below, whatever
token it is). Definitions (also in docs/diagnostics.md):

- first-token attention: mean over heads and over valid queries q > 0 of the attention to position 0.
- sink rate (Gu et al.): a (sample, head) is a sink for key k when the mean attention that k receives from
  the valid queries at or after k exceeds eps (0.3); reported as a percentage of (sample, head) pairs.
- massive activation (Sun et al.): largest |h| over valid tokens and features, with its position and
  feature, and its ratio to the median |h| over the same entries.
- BOS cosine: mean of cos(h[0], h[t]) over valid t >= 1.
- attention entropy: mean over heads and valid queries q > 0 of -sum_k p log p (nats), and the same
  divided by log(q + 1) (1 = uniform attention over the visible keys).
- intermediate sinks: positions t > 0 with a high cosine to BOS (> 0.8) that receive high attention (mean
  over heads and over the queries after them > 0.2); per layer their count per sequence, summed received
  attention per sequence, mean cosine to BOS, and the largest |h| at t >= 1 on BOS's massive features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from losses.decorrelation import bos_cosines


def query_positions_mask(valid: torch.Tensor, first_query: int = 1) -> torch.Tensor:
    """valid [B,T] bool -> [B,T] bool: valid queries at positions >= first_query."""
    positions = torch.arange(valid.shape[1], device=valid.device)
    return valid.bool() & (positions >= first_query)[None, :]


def mean_attention_from_queries(attention_to_key: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """Per-head mean attention that one key receives from the selected queries.

    Args:
        attention_to_key: [B,H,T] probability that query t (of head h, sample b) gives to the key.
        query_mask: [B,T] bool, the queries to average over (pooled over samples).
    Returns:
        [H] float32; zeros when no query is selected.
    """
    weights = query_mask.float()[:, None, :]
    total = (attention_to_key.float() * weights).sum(dim=(0, 2))
    return total / weights.sum().clamp_min(1.0)


def first_token_attention_per_head(attention_to_first: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """attention_to_first [B,H,T], valid [B,T] -> [H]: mean attention to position 0 from valid queries q > 0.

    The layer's first-token attention is the mean of this over heads.
    """
    return mean_attention_from_queries(attention_to_first, query_positions_mask(valid, 1))


def uniform_first_token_attention(valid: torch.Tensor) -> float:
    """Reference level: first-token attention if every query spread attention evenly over its keys.

    Query q sees q + 1 keys (right padding), so this is the mean of 1/(q+1) over valid queries q > 0.
    """
    queries = query_positions_mask(valid, 1)
    positions = torch.arange(valid.shape[1], device=valid.device, dtype=torch.float32)
    uniform = (1.0 / (positions + 1.0))[None, :].expand_as(queries)
    return float(uniform[queries].mean()) if queries.any() else 0.0


def head_sink_scores(attention_to_key: torch.Tensor, valid: torch.Tensor, key_position: int) -> torch.Tensor:
    """attention_to_key [B,H,T] -> [B,H]: mean attention the key receives from valid queries q >= key_position."""
    queries = query_positions_mask(valid, key_position).float()[:, None, :]
    return (attention_to_key.float() * queries).sum(-1) / queries.sum(-1).clamp_min(1.0)


def sink_rate_percent(
    attention_to_key: torch.Tensor, valid: torch.Tensor, key_position: int = 0, eps: float = 0.3
) -> float:
    """Percentage of (sample, head) pairs whose `head_sink_scores` exceed eps (samples where the key is padding
    are left out). attention_to_key [B,H,T], valid [B,T]."""
    has_key = valid[:, key_position].bool()
    if not has_key.any():
        return 0.0
    is_sink = head_sink_scores(attention_to_key, valid, key_position) > eps  # [B,H]
    return 100.0 * float(is_sink[has_key].float().mean())


@dataclass
class MassiveActivation:
    """The largest |h| of one layer and where it sits."""

    value: float
    sample: int
    position: int
    feature: int
    median: float
    ratio: float


def massive_activation(hidden: torch.Tensor, valid: torch.Tensor) -> MassiveActivation:
    """hidden [B,T,D], valid [B,T] -> largest |h| over valid tokens, its (sample, position, feature), and its
    ratio to the median |h| over all valid entries (torch.median: the lower middle value)."""
    magnitude = hidden.detach().float().abs()
    masked = magnitude.masked_fill(~valid.bool()[..., None], -1.0)
    flat_index = int(masked.argmax())
    _, t, d = magnitude.shape
    sample, rest = divmod(flat_index, t * d)
    position, feature = divmod(rest, d)
    value = float(masked.flatten()[flat_index])
    median = float(magnitude[valid.bool()].median())
    return MassiveActivation(value, sample, position, feature, median, value / max(median, 1e-12))


def top_feature_magnitudes(hidden: torch.Tensor, valid: torch.Tensor, k: int = 3) -> list[tuple[int, float]]:
    """hidden [B,T,D] -> the k features with the largest max |h| over valid tokens, as (feature, max |h|)."""
    magnitude = hidden.detach().float().abs().masked_fill(~valid.bool()[..., None], -1.0)
    per_feature = magnitude.flatten(0, 1).max(dim=0).values  # [D]
    values, features = per_feature.topk(min(k, per_feature.numel()))
    return [(int(f), float(v)) for f, v in zip(features, values)]


def bos_cosine(hidden: torch.Tensor) -> torch.Tensor:
    """hidden [B,T,D] -> [B,T] float32: cos(h[b,0], h[b,t]) (position 0 gives 1); the loss's own maths."""
    return bos_cosines([hidden.detach()], [0])[0].float()


def mean_bos_cosine(cosine: torch.Tensor, token_mask: torch.Tensor) -> float:
    """cosine [B,T] from `bos_cosine`, token_mask [B,T] bool -> mean over selected tokens at t >= 1 (nan if none)."""
    selected = query_positions_mask(token_mask, 1)
    return float(cosine[selected].mean()) if selected.any() else float("nan")


def received_attention(
    attention_to_keys: torch.Tensor, key_positions: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Mean attention each key receives from the valid queries strictly after it, averaged over heads.

    Args:
        attention_to_keys: [B,H,T,P] probability that query t gives to key key_positions[p].
        key_positions: [P] long.
        valid: [B,T] bool.
    Returns:
        [B,P] float32 (0 where no valid query follows the key).
    """
    positions = torch.arange(valid.shape[1], device=valid.device)
    after = positions[None, :, None] > key_positions.to(valid.device)[None, None, :]  # [1,T,P]
    queries = (valid.bool()[:, :, None] & after).float()  # [B,T,P]
    summed = (attention_to_keys.float().mean(dim=1) * queries).sum(dim=1)  # [B,P]
    return summed / queries.sum(dim=1).clamp_min(1.0)


def intermediate_sink_candidates(
    cosine: torch.Tensor, valid: torch.Tensor, cosine_threshold: float, max_candidates: int = 32
) -> torch.Tensor:
    """Positions t > 0 whose cosine to BOS exceeds the threshold in some sample, highest first.

    cosine [B,T], valid [B,T] -> [P] long, P <= max_candidates (the union over samples, so that one
    `attention_to_keys` call serves the whole batch).
    """
    eligible = query_positions_mask(valid, 1) & (cosine > cosine_threshold)
    best = cosine.masked_fill(~eligible, float("-inf")).max(dim=0).values  # [T]
    order = best.argsort(descending=True)
    order = order[torch.isfinite(best[order])]
    return order[:max_candidates].sort().values


def intermediate_sinks(
    cosine: torch.Tensor,
    attention_to_keys: torch.Tensor,
    key_positions: torch.Tensor,
    valid: torch.Tensor,
    cosine_threshold: float,
    attention_threshold: float,
) -> list[tuple[int, int, float, float]]:
    """Tokens at t > 0 with cos to BOS > cosine_threshold and received attention > attention_threshold.

    Args:
        cosine: [B,T] from `bos_cosine`; attention_to_keys: [B,H,T,P] for key_positions [P] (t > 0);
        valid: [B,T] bool.
    Returns:
        (sample, position, cosine, received attention) for each flagged token.
    """
    received = received_attention(attention_to_keys, key_positions, valid)  # [B,P]
    positions = key_positions.to(cosine.device)
    key_cosine = cosine[:, positions]  # [B,P]
    flagged = intermediate_sink_mask(
        key_cosine, received, positions, valid, cosine_threshold, attention_threshold
    )
    return [
        (int(b), int(positions[p]), float(key_cosine[b, p]), float(received[b, p]))
        for b, p in flagged.nonzero().tolist()
    ]


def intermediate_sink_mask(
    key_cosine: torch.Tensor,
    received: torch.Tensor,
    key_positions: torch.Tensor,
    valid: torch.Tensor,
    cosine_threshold: float,
    attention_threshold: float,
) -> torch.Tensor:
    """[B,P] bool: key p of sample b is an intermediate sink (position > 0, valid, both thresholds passed).

    key_cosine [B,P] = cosine[:, key_positions]; received [B,P] from `received_attention`; valid [B,T].
    """
    positions = key_positions.to(valid.device)
    return (
        valid.bool()[:, positions]
        & (key_cosine > cosine_threshold)
        & (received > attention_threshold)
        & (positions[None, :] > 0)
    )


def bos_massive_features(hidden: torch.Tensor, k: int = 1) -> torch.Tensor:
    """hidden [B,T,D] -> [k] long: the features where position 0 is largest (|h[:,0,:]| averaged over samples).

    These are "BOS's massive features" (feature 507 in SmolLM2-135M's early layers)."""
    return hidden[:, 0].detach().float().abs().mean(0).topk(min(k, hidden.shape[-1])).indices


def max_activation_on_features(
    hidden: torch.Tensor, token_mask: torch.Tensor, features: torch.Tensor
) -> float:
    """Largest |h[b,t,f]| over tokens with token_mask [B,T] at t >= 1 and f in features [k]; nan if no token."""
    tokens = query_positions_mask(token_mask, 1)
    if not tokens.any():
        return float("nan")
    return float(hidden.detach()[..., features.to(hidden.device)].float().abs()[tokens].max())


def sink_summary(
    flagged: torch.Tensor, received: torch.Tensor, key_cosine: torch.Tensor, num_sequences: int
) -> dict[str, float]:
    """Count, attention and BOS cosine of a set of sinks, per sequence.

    Args:
        flagged: [B,P] bool, which (sample, key) pairs are sinks; received, key_cosine: [B,P].
        num_sequences: the divisor (every probe sequence counts, with or without sinks).
    Returns:
        count: sinks per sequence; attention: per sequence, the summed received attention (mean over heads
        and over the queries after the sink) of its sinks, averaged over sequences (0 without sinks);
        bos_cosine: mean cosine to BOS of the sinks (nan if none).
    """
    n = max(int(num_sequences), 1)
    flagged = flagged.bool()
    return {
        "count": float(flagged.sum()) / n,
        "attention": float((received.float() * flagged).sum()) / n,
        "bos_cosine": float(key_cosine[flagged].float().mean()) if flagged.any() else float("nan"),
    }


def attention_entropy(entropy: torch.Tensor, valid: torch.Tensor) -> tuple[float, float]:
    """Mean attention entropy over heads and valid queries q > 0, in nats and normalised by log(q + 1).

    entropy [B,H,T]: -sum_k p log p of each query row; query q sees q + 1 keys (right padding), so
    log(q + 1) is its largest possible entropy (uniform attention) and the normalised value is in [0, 1].
    """
    queries = query_positions_mask(valid, 1)
    if not queries.any():
        return float("nan"), float("nan")
    positions = torch.arange(valid.shape[1], device=valid.device, dtype=torch.float32)
    per_query = entropy.float().mean(1)  # [B,T] mean over heads
    normalised = per_query / torch.log(positions + 1.0).clamp_min(1e-12)[None, :]
    return float(per_query[queries].mean()), float(normalised[queries].mean())
