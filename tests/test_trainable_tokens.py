"""The row-sparse trainable-token forward equals peft's own, in values and in gradients."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from models.trainable_tokens import use_row_sparse_trainable_tokens
from recipes.objectives.meap import grow_embeddings


def _tiny_tied_lm(tiny_lm_factory):
    model, tokenizer = tiny_lm_factory(num_layers=1)
    new_id = len(tokenizer)
    grow_embeddings(model, new_id + 1)
    assert model.get_input_embeddings().weight.shape[0] % 64 == 0
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", trainable_token_indices=[new_id, 5])
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if "trainable_tokens_delta" in name:
            torch.nn.init.normal_(param, std=0.5)  # make the trainable rows differ from the base rows
    return model, new_id


def _logits_and_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    (logits.float().square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def test_row_sparse_forward_matches_peft(tiny_lm_factory):
    model, new_id = _tiny_tied_lm(tiny_lm_factory)
    ids = torch.tensor([[1, 5, 7, new_id, 9, new_id], [3, 4, new_id, 5, 2, 2]])
    expected_logits, expected_grads = _logits_and_grads(model, ids)
    assert use_row_sparse_trainable_tokens(model) == 2  # embedding + tied LM head
    assert use_row_sparse_trainable_tokens(model) == 0  # idempotent
    logits, grads = _logits_and_grads(model, ids)
    assert torch.allclose(logits, expected_logits, atol=1e-5)
    assert expected_grads.keys() == grads.keys()
    delta_grads = [n for n in grads if "trainable_tokens_delta" in n]
    assert delta_grads and all(grads[n].abs().sum() > 0 for n in delta_grads)
    for name in grads:
        assert torch.allclose(grads[name], expected_grads[name], atol=1e-5, rtol=1e-4), name


def test_row_sparse_forward_falls_back_when_adapters_disabled(tiny_lm_factory):
    model, new_id = _tiny_tied_lm(tiny_lm_factory)
    ids = torch.tensor([[1, new_id, 5]])
    with model.disable_adapter():
        expected = model(input_ids=ids).logits
    use_row_sparse_trainable_tokens(model)
    with model.disable_adapter():
        got = model(input_ids=ids).logits
    assert torch.allclose(got, expected)
