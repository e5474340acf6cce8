"""Intermediate sinks (t >= 1) and tracking of the step-0 sinks: hand-made tensors and the tiny model."""

import math

import pytest
import torch

from diagnostics import sink_metrics as sm
from diagnostics.callback import intermediate_log_metrics
from diagnostics.probe import measure_sinks
from diagnostics.report import band_layers, band_means, before_after_lines, tracked_change, tracked_headline


def test_sink_mask_needs_both_thresholds_a_valid_token_and_a_position_after_zero():
    key_positions = torch.tensor([0, 2, 3, 4])
    key_cosine = torch.tensor([[1.0, 0.9, 0.9, 0.5], [1.0, 0.95, 0.7, 0.99]])
    received = torch.tensor([[0.9, 0.3, 0.1, 0.6], [0.9, 0.25, 0.5, 0.5]])
    valid = torch.tensor([[True] * 5, [True, True, True, True, False]])
    mask = sm.intermediate_sink_mask(key_cosine, received, key_positions, valid, 0.8, 0.2)
    # position 0 never; (0,3) low attention; (0,4) low cosine; (1,3) low cosine; (1,4) padding
    assert mask.tolist() == [[False, True, False, False], [False, True, False, False]]
    summary = sm.sink_summary(mask, received, key_cosine, num_sequences=2)
    assert summary["count"] == pytest.approx(1.0)
    assert summary["attention"] == pytest.approx((0.3 + 0.25) / 2)
    assert summary["bos_cosine"] == pytest.approx((0.9 + 0.95) / 2)
    empty = sm.sink_summary(torch.zeros_like(mask), received, key_cosine, 2)
    assert empty["count"] == 0.0 and empty["attention"] == 0.0 and math.isnan(empty["bos_cosine"])


def test_max_activation_on_bos_features_skips_position_zero_padding_and_other_features():
    hidden = torch.zeros(2, 4, 6)
    hidden[:, 0, 5] = 1000.0  # BOS's massive feature
    hidden[0, 2, 5] = -300.0  # a sink carrying it
    hidden[0, 1, 1] = 900.0  # large, but on another feature
    hidden[1, 3, 5] = 800.0  # padding
    valid = torch.tensor([[True] * 4, [True, True, True, False]])
    features = sm.bos_massive_features(hidden, k=1)
    assert features.tolist() == [5]
    assert sm.max_activation_on_features(hidden, valid, features) == 300.0
    assert math.isnan(sm.max_activation_on_features(hidden, torch.zeros_like(valid), features))


def test_tracked_sinks_report_eager_attention_to_their_positions(tiny_lm_factory):
    model, tokenizer = tiny_lm_factory(num_layers=2)
    batch = dict(
        tokenizer(["The cat sat on the mat by the door.", "A dog."], return_tensors="pt", padding=True)
    )
    tracked = [{"sample": 0, "position": 3, "layers": [1]}, {"sample": 1, "position": 1, "layers": [0, 1]}]
    report = measure_sinks(model, batch, tracked_sinks=tracked)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(**batch, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    valid = batch["attention_mask"].bool()

    def received(layer, sample, position):
        probs = eager.attentions[layer][sample].mean(0)[:, position]  # [T] over queries
        queries = valid[sample].clone()
        queries[: position + 1] = False
        return float(probs[queries].sum() / queries.sum())

    for row, probs in zip(report.layers, eager.attentions):  # attention entropy against eager attention
        queries = valid.clone()
        queries[:, 0] = False
        rows = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean(1)  # [B,T]
        assert row.attention_entropy == pytest.approx(float(rows[queries].mean()), abs=1e-4)
        positions = torch.arange(valid.shape[1], dtype=torch.float32)
        normalised = rows / torch.log(positions + 1).clamp_min(1e-12)
        assert row.attention_entropy_normalized == pytest.approx(float(normalised[queries].mean()), abs=1e-4)
    layer0, layer1 = report.layer(0), report.layer(1)
    assert layer0.tracked_sink_count == pytest.approx(0.5) and layer1.tracked_sink_count == pytest.approx(1.0)
    assert layer0.tracked_sink_attention == pytest.approx(received(0, 1, 1) / 2, abs=1e-5)
    assert layer1.tracked_sink_attention == pytest.approx(
        (received(1, 0, 3) + received(1, 1, 1)) / 2, abs=1e-5
    )
    # no tracked list: the sinks found now are tracked, so the two agree
    found = measure_sinks(
        model, batch, intermediate_cosine_threshold=-1.0, intermediate_attention_threshold=0.0
    )
    for row in found.layers:
        assert row.intermediate_sink_count > 0
        assert row.tracked_sink_attention == pytest.approx(row.intermediate_sink_attention)


def _sinks(step, values):
    """A minimal sinks.json dict: layers 0..3 with the given tracked attention."""
    return {
        "step": step,
        "layers": [
            {
                "layer": i,
                "tracked_sink_attention": v,
                "tracked_sink_max_activation": 100.0 * v,
                "intermediate_sink_count": v,
                "first_token_attention": 0.5,
                "sink_rate": 50.0,
                "activation_ratio": 10.0,
                "bos_cosine": 0.3,
                "by_segment": {"audio": {"intermediate_sink_count": 2 * v, "intermediate_sink_attention": v}},
            }
            for i, v in enumerate(values)
        ],
        "intermediate_sinks": [{"sample": 0, "position": 3, "layers": [1, 2]}],
    }


def test_bands_tracked_change_and_headline():
    first, last = _sinks(0, [0.0, 0.4, 0.4, 0.0]), _sinks(100, [0.0, 0.1, 0.1, 0.0])
    bands = {"early": [1, 2], "late": [3, None], "absent": [9, 12]}
    assert band_layers(first, bands) == {"early": [1, 2], "late": [3]}
    assert band_layers(first, None) == {"all": [0, 1, 2, 3]}
    assert band_means(last, bands)["early"]["intermediate_sink_count"] == pytest.approx(0.1)
    change = tracked_change(first, last)
    assert change["attention_change_pct"] == pytest.approx(-75.0)
    assert "lost 75.0% of their attention" in tracked_headline(first, last)
    assert "(0.400 -> 0.100, mean over layers early (1-2))" in tracked_headline(first, last, bands)
    lines = before_after_lines(first, last, bands=bands)
    assert lines[2].startswith("| intermediate sinks per sequence, layers early (1-2) | 0.400 | 0.100 |")
    assert "| intermediate sinks per sequence, audio tokens, layers early | 0.800 | 0.200 |" in lines
    assert not any("audio tokens, layers late" in line for line in lines)
    metrics = intermediate_log_metrics(last, first, [1], bands)
    assert metrics["sinks/intermediate/tracked_attention/early"] == pytest.approx(0.1)
    assert metrics["sinks/intermediate/tracked_attention_change_pct"] == pytest.approx(-75.0)
    assert metrics["sinks/intermediate/tracked_attention_change_pct/early"] == pytest.approx(-75.0)
    assert metrics["sinks/intermediate/count/layer_1"] == pytest.approx(0.1)
    assert "sinks/intermediate/count/layer_2" not in metrics
    assert metrics["sinks/intermediate/count/audio/mean"] == pytest.approx(0.1)  # 2 * (0 + .1 + .1 + 0) / 4


def test_run_summary_leads_with_the_sink_block():
    from types import SimpleNamespace

    from harness.summary import TrainLossHistory, summary_lines

    extra = [
        "exported: adapter -> x",
        "sinks on the probe batch: step 0 -> step 9",
        "the 3 sinks...",
        "| a |",
        "| b |",
    ]
    extra.append("data: 0 unusable line(s) skipped")
    lines = summary_lines(
        {}, {"val/loss": 1.0}, TrainLossHistory(), "run", SimpleNamespace(global_step=9), extra
    )
    assert lines[5:9] == extra[1:5]  # right after the "steps:" line
    assert lines[9].startswith("train/loss") and lines[-3:-1] == [extra[0], extra[5]]
