"""measure_sinks (fused attention + chunked recomputation) against eager attention on the tiny model."""

import pytest
import torch

from diagnostics import sink_metrics as sm
from diagnostics.probe import measure_sinks
from models.segments import PROMPT, TARGET

TEXTS = ["The cat sat on the mat and looked at the door.", "A short one."]


@pytest.fixture(scope="module")
def tiny(tiny_lm_factory):
    model, tokenizer = tiny_lm_factory(num_layers=3)
    batch = dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    return model, tokenizer, batch


def test_chunked_sdpa_metrics_match_eager_attention(tiny):
    model, tokenizer, batch = tiny
    report = measure_sinks(model, batch, chunk_size=3, sink_key_position=2)  # small chunks: several per layer
    valid = batch["attention_mask"].bool()
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(**batch, output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation("sdpa")
    assert [row.layer for row in report.layers] == [0, 1, 2]
    for row, probs, hidden in zip(report.layers, eager.attentions, eager.hidden_states[1:]):
        queries = valid.clone()
        queries[:, 0] = False
        expected_per_head = (probs[..., 0] * queries[:, None]).sum((0, 2)) / queries.sum()
        assert row.first_token_attention_per_head == pytest.approx(expected_per_head.tolist(), abs=1e-5)
        assert row.first_token_attention == pytest.approx(float(expected_per_head.mean()), abs=1e-5)
        assert row.sink_rate == sm.sink_rate_percent(probs[..., 2], valid, key_position=2, eps=0.3)
        massive = sm.massive_activation(hidden, valid)
        assert (row.max_activation_position, row.max_activation_feature) == (
            massive.position,
            massive.feature,
        )
        assert row.activation_ratio == pytest.approx(massive.ratio, rel=1e-5)
        assert row.bos_cosine == pytest.approx(sm.mean_bos_cosine(sm.bos_cosine(hidden), valid), abs=1e-5)


def test_extra_padding_changes_nothing(tiny):
    model, _, batch = tiny
    longer = {key: torch.nn.functional.pad(value, (0, 5), value=7) for key, value in batch.items()}
    longer["attention_mask"][:, -5:] = 0  # garbage ids under a zero mask
    short, padded = measure_sinks(model, batch), measure_sinks(model, longer)
    for a, b in zip(short.layers, padded.layers):
        assert a.first_token_attention == pytest.approx(b.first_token_attention, abs=1e-5)
        assert a.sink_rate == b.sink_rate
        assert a.activation_ratio == pytest.approx(b.activation_ratio, rel=1e-4)
        assert a.bos_cosine == pytest.approx(b.bos_cosine, abs=1e-5)
    assert short.uniform_first_token_attention == pytest.approx(padded.uniform_first_token_attention)


def test_inputs_embeds_with_segments_report_per_segment(tiny):
    model, _, batch = tiny
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    segments = torch.full_like(batch["input_ids"], PROMPT)
    segments[:, 4:] = TARGET
    segments[batch["attention_mask"] == 0] = 0
    model.train()
    report = measure_sinks(
        model, {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}, segments
    )
    assert model.training, "the probe must restore the module's train/eval mode"
    for row in report.layers:
        prompt, target = row.by_segment["prompt"], row.by_segment["target"]
        combined = (prompt["bos_cosine"] * prompt["tokens"] + target["bos_cosine"] * target["tokens"]) / (
            prompt["tokens"] + target["tokens"]
        )
        assert combined == pytest.approx(row.bos_cosine, abs=1e-5)
        assert 0.0 < prompt["first_token_attention"] <= 1.0


def test_peft_model_and_layer_subset(tiny):
    from peft import LoraConfig, get_peft_model

    model, _, batch = tiny
    base = measure_sinks(model, batch, layers=[1])
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    try:
        wrapped = measure_sinks(lora, batch, layers=[1])  # LoRA starts as the identity
    finally:
        lora.unload()
    assert [row.layer for row in wrapped.layers] == [1]
    assert wrapped.layers[0].first_token_attention == pytest.approx(
        base.layers[0].first_token_attention, abs=1e-6
    )


def test_left_padding_is_refused(tiny):
    model, _, batch = tiny
    left = {key: value.flip(1) for key, value in batch.items()}
    with pytest.raises(ValueError, match="right padding"):
        measure_sinks(model, left)


def test_intermediate_sinks_are_merged_over_layers_and_named(tiny):
    model, tokenizer, batch = tiny
    report = measure_sinks(
        model,
        batch,
        tokenizer=tokenizer,
        intermediate_cosine_threshold=-2.0,
        intermediate_attention_threshold=-1.0,
    )
    valid = batch["attention_mask"].bool()
    expected = [(b, t) for b in range(2) for t in range(1, valid.shape[1]) if valid[b, t]]
    assert [(s["sample"], s["position"]) for s in report.intermediate_sinks] == expected
    first = report.intermediate_sinks[0]
    assert first["layers"] == [0, 1, 2]
    assert first["token"] == tokenizer.convert_ids_to_tokens(int(batch["input_ids"][0, 1]))
