"""Sink metrics on hand-built attention and hidden states, where the answer is known."""

import math

import pytest
import torch

from diagnostics import sink_metrics as sm


def test_first_token_attention_skips_query_zero_and_padding():
    attention = torch.tensor([[[1.0, 0.5, 0.2, 0.9], [1.0, 1.0, 1.0, 0.9]]])  # [B=1,H=2,T=4]
    valid = torch.tensor([[True, True, True, False]])
    per_head = sm.first_token_attention_per_head(attention, valid)
    assert per_head.tolist() == pytest.approx([0.35, 1.0])


def test_uniform_first_token_attention_is_mean_of_one_over_visible_keys():
    valid = torch.tensor([[True, True, True], [True, True, False]])
    # queries: (b0,q1) 1/2, (b0,q2) 1/3, (b1,q1) 1/2
    assert sm.uniform_first_token_attention(valid) == pytest.approx((0.5 + 1 / 3 + 0.5) / 3)


def test_sink_rate_counts_sample_head_pairs_above_eps():
    attention = torch.tensor(
        [
            [[1.0, 0.5, 0.3, 0.2], [1.0, 0.0, 0.0, 0.0]],  # means 0.5 (sink), 0.25 (not)
            [[1.0, 0.1, 0.9, 0.9], [1.0, 0.0, 0.9, 0.9]],  # padded after t=1: means 0.55, 0.5 (sinks)
        ]
    )
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    scores = sm.head_sink_scores(attention, valid, key_position=0)
    assert scores.flatten().tolist() == pytest.approx([0.5, 0.25, 0.55, 0.5])
    assert sm.sink_rate_percent(attention, valid, key_position=0, eps=0.3) == pytest.approx(75.0)
    assert sm.sink_rate_percent(attention, valid, key_position=0, eps=0.52) == pytest.approx(25.0)


def test_sink_rate_for_a_later_key_uses_queries_at_or_after_it():
    attention = torch.tensor([[[0.0, 0.2, 0.4, 0.6]]])  # attention to key 1 from queries 0..3
    valid = torch.ones(1, 4, dtype=torch.bool)
    assert sm.head_sink_scores(attention, valid, key_position=1).item() == pytest.approx(0.4)
    assert sm.sink_rate_percent(attention, valid, key_position=1, eps=0.3) == 100.0


def test_massive_activation_position_feature_and_median_ratio_ignore_padding():
    hidden = torch.tensor([[[1.0, -5.0, 2.0], [0.5, 0.5, 3.0], [100.0, 100.0, 100.0]]])  # [1,3,3]
    valid = torch.tensor([[True, True, False]])
    found = sm.massive_activation(hidden, valid)
    # valid |h| sorted: .5 .5 1 2 3 5 -> lower median 1
    assert (found.value, found.sample, found.position, found.feature) == (5.0, 0, 0, 1)
    assert found.median == 1.0 and found.ratio == 5.0
    assert sm.top_feature_magnitudes(hidden, valid, k=2) == [(1, 5.0), (2, 3.0)]


def test_bos_cosine_mean_over_valid_tokens_after_position_zero():
    hidden = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [1.0, 0.0]]])
    valid = torch.tensor([[True, True, True, False]])
    cosine = sm.bos_cosine(hidden)
    assert cosine[0].tolist() == pytest.approx([1.0, 1 / math.sqrt(2), -1.0, 1.0])
    assert sm.mean_bos_cosine(cosine, valid) == pytest.approx((1 / math.sqrt(2) - 1.0) / 2)
    assert math.isnan(sm.mean_bos_cosine(cosine, torch.tensor([[True, False, False, False]])))


def test_received_attention_averages_heads_and_later_valid_queries():
    to_key1 = torch.tensor([[[0.0, 0.5, 0.4, 0.2], [0.0, 1.0, 0.2, 0.6]]])  # [B=1,H=2,T=4]
    attention = to_key1[..., None]  # [1,2,4,P=1]
    keys = torch.tensor([1])
    all_valid = torch.ones(1, 4, dtype=torch.bool)
    assert sm.received_attention(attention, keys, all_valid).item() == pytest.approx(0.35)
    padded = torch.tensor([[True, True, True, False]])
    assert sm.received_attention(attention, keys, padded).item() == pytest.approx(0.3)


def test_intermediate_sinks_need_both_high_cosine_and_high_attention():
    cosine = torch.tensor([[1.0, 0.9, 0.95, 0.1], [1.0, 0.2, 0.99, 0.9]])
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    candidates = sm.intermediate_sink_candidates(cosine, valid, cosine_threshold=0.8)
    assert candidates.tolist() == [1, 2]  # position 3 is above threshold only where it is padding
    attention = torch.zeros(2, 1, 4, 2)
    attention[0, 0, 2:, 0] = 0.5  # sample 0: key 1 receives 0.5 from queries 2, 3
    attention[1, 0, 3, 1] = 0.9  # sample 1: key 2 is attended only by a padded query
    flagged = sm.intermediate_sinks(cosine, attention, candidates, valid, 0.8, 0.2)
    assert [(b, t) for b, t, _, _ in flagged] == [(0, 1)]
    assert flagged[0][2:] == pytest.approx((0.9, 0.5))
