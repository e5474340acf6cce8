"""Query/key capture refuses layers whose attention is not plain causal softmax, on tiny random models of
the families that have them; the same families without those features still recompute eager's numbers."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from models.attention_capture import QueryKeyCapture, sampled_attention_probs

TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
)  # fmt: skip
LENGTH = 12


def _model(model_class, config):
    torch.manual_seed(0)
    config._attn_implementation = "sdpa"
    return model_class(config).eval()


def _capture(model, layers=None):
    ids = torch.randint(0, 64, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), QueryKeyCapture(model, layers) as captured:
        model(input_ids=ids)
    return ids, dict(captured)


REFUSED = {
    "gemma2 (soft-capping, sliding window)": lambda: _model(
        Gemma2ForCausalLM, Gemma2Config(**TINY, sliding_window=4, attn_logit_softcapping=50.0)
    ),
    "gemma2 (soft-capping alone)": lambda: _model(
        Gemma2ForCausalLM, Gemma2Config(**TINY, sliding_window=64, attn_logit_softcapping=50.0)
    ),
    "gemma3 (sliding-window layers)": lambda: _model(
        Gemma3ForCausalLM, Gemma3TextConfig(**TINY, sliding_window=4, layer_types=["sliding_attention"] * 2)
    ),
    "mistral (sliding window)": lambda: _model(MistralForCausalLM, MistralConfig(**TINY, sliding_window=4)),
    "qwen2 (use_sliding_window)": lambda: _model(
        Qwen2ForCausalLM,
        Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4, layer_types=["sliding_attention"] * 2),
    ),
}


@pytest.mark.parametrize("family", list(REFUSED))
def test_capture_raises_instead_of_returning_wrong_probabilities(family):
    with pytest.raises(NotImplementedError, match="layer 0 uses"):
        _capture(REFUSED[family]())


@pytest.mark.parametrize(
    "build",
    [
        lambda: _model(MistralForCausalLM, MistralConfig(**TINY, sliding_window=None)),
        lambda: _model(MistralForCausalLM, MistralConfig(**TINY, sliding_window=LENGTH)),  # window >= keys
        lambda: _model(
            Gemma3ForCausalLM, Gemma3TextConfig(**TINY, layer_types=["full_attention"] * 2, sliding_window=4)
        ),
    ],
)
def test_plain_causal_layers_of_the_same_families_still_match_eager(build):
    model = build()
    ids, captured = _capture(model)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(input_ids=ids, output_attentions=True).attentions
    for layer, probs in enumerate(eager):
        recomputed = sampled_attention_probs(captured[layer], torch.arange(LENGTH))
        torch.testing.assert_close(recomputed, probs, atol=1e-5, rtol=1e-4)
