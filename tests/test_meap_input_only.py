"""MEAP with an input-only `[MASK]` (objective.meap.mask_in_output=false, models/output_vocabulary.py): the
`[MASK]` embedding row trains, the output vocabulary is the original rows only, on the plain and fast paths,
in training, evaluation, generation and after a save/load round trip."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from models import fast as fastpath
from models.causal_lm import build_tiny_llama
from models.output_vocabulary import EmbeddingPrefixHead
from recipes.llm_setup import prepare_llm
from recipes.objectives.compose import ObjectiveSet
from recipes.objectives.meap import MeapObjective
from tests.test_fast_path import LORA, loss_and_lora_grads

# 4096 original rows (as tests/test_objectives_training.py); [MASK] is the tokenizer's next id, 49152, so the
# embedding grows to 49216 rows and the rows 4096..49215 are input-only.
TINY = partial(
    build_tiny_llama,
    special_tokens={"eos_token": "<|im_end|>"},
    hidden_size=32,
    num_layers=2,
    intermediate_size=64,
    vocab_size=4096,
)
V_ORIG = 4096
FAST = {"require_cuda": False, "compile": "none", "base_dtype": "fp32"}


def build(kernels="plain", mask_in_output=False, **fast):
    """(llm, mask id): LoRA + MEAP on TINY, LoRA B and the `[MASK]` delta made non-zero (seeded)."""
    meap = MeapObjective(mode="pretrain", mask_in_output=mask_in_output)
    torch.manual_seed(0)
    llm, _ = prepare_llm(TINY, ObjectiveSet({"meap": meap}), LORA, kernels=kernels, fast={**FAST, **fast})
    torch.manual_seed(1)
    for name, param in llm.named_parameters():
        if "lora_B" in name or "trainable_tokens_delta" in name:
            param.data.normal_(0, 0.5 if "delta" in name else 0.02)
    return llm, meap.mask_token_id


def masked_batch(mask_id: int, seed: int = 0) -> dict:
    """B=3, T=12 over the original vocabulary, a quarter of the inputs `[MASK]`; prompts (-100), right
    padding (-100) and a row with a single target."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(5, V_ORIG, (3, 12), generator=gen)
    attention_mask = torch.ones_like(labels)
    attention_mask[1, 9:] = 0
    attention_mask[2, 5:] = 0
    input_ids = labels.masked_fill(torch.rand(3, 12, generator=gen) < 0.25, mask_id)
    labels = labels.clone()
    labels[:, :4] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def delta_param(llm) -> torch.nn.Parameter:
    (delta,) = [p for n, p in llm.named_parameters() if "trainable_tokens_delta" in n]
    return delta


def test_loss_is_the_cross_entropy_over_the_original_rows():
    llm, mask_id = build()
    causal_lm = llm.get_base_model()
    assert isinstance(causal_lm.lm_head, EmbeddingPrefixHead)  # untied: peft wrapped the embedding only
    assert [n for n, p in llm.named_parameters() if p.requires_grad and "lora_" not in n] == [
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    ]
    batch = masked_batch(mask_id)
    loss = llm(**batch).loss
    hidden = causal_lm.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    base = causal_lm.model.embed_tokens.token_adapter.base_layer.weight  # [49216,32], frozen
    logits = hidden @ base[:V_ORIG].T  # [3,12,4096]
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, V_ORIG), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    delta = delta_param(llm)
    assert delta.grad is not None and delta.grad.abs().sum() > 0  # [MASK]'s input row trains
    with torch.no_grad():
        base[V_ORIG:] = 100.0  # rows beyond the original vocabulary (the [MASK] input row is its delta)
    torch.testing.assert_close(llm(**batch).loss, loss.detach())  # take no part in the loss


def test_the_default_keeps_mask_in_the_output():
    """mask_in_output=true (the default): peft's trainable tokens wrap the tied head; logits cover every row."""
    llm, mask_id = build(mask_in_output=True)
    assert not isinstance(llm.get_base_model().lm_head, EmbeddingPrefixHead)
    assert type(llm.get_base_model().lm_head).__name__ == "TrainableTokensWrapper"
    assert llm(**masked_batch(mask_id)).logits.shape[-1] == 49216


def test_plain_and_chunked_fast_path_give_equal_loss_and_gradients():
    plain, mask_id = build("plain")
    fast, _ = build("fast", fused_cross_entropy="chunked", ce_chunk_tokens=7)
    batch = masked_batch(mask_id)
    loss_p, grads_p = loss_and_lora_grads(plain, batch)
    loss_f, grads_f = loss_and_lora_grads(fast, batch)
    assert fast(**batch).logits is None  # the chunked loss really ran
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_p.keys() and any("trainable_tokens_delta" in n for n in grads_p)
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-6)


def test_chunked_loss_runs_the_head_fused_without_trainable_rows(monkeypatch):
    from models import fast_loss

    calls = []
    fused = fast_loss.fused_linear_cross_entropy

    def spy(hidden, weight, labels, chunk, rows, delta, compile_rows):
        calls.append((weight.shape[0], rows, delta))
        return fused(hidden, weight, labels, chunk, rows, delta, compile_rows)

    monkeypatch.setattr(fast_loss, "fused_linear_cross_entropy", spy)
    fast, mask_id = build("fast", fused_cross_entropy="chunked")
    fast(**masked_batch(mask_id)).loss.backward()
    assert calls == [(V_ORIG, None, None)]


@pytest.mark.parametrize(("mask_in_output", "expected"), [(False, "liger"), (True, "chunked")])
def test_auto_loss_picks_liger_when_no_head_row_trains(monkeypatch, mask_in_output, expected):
    """`auto` on a wide Llama with Liger available: Liger once `[MASK]` is input-only; the chunked loss while
    the tied head carries the trainable `[MASK]` row. prepare_llm's flag is checked, then the choice it makes
    at 1B width (liger-kernel itself is not needed: CI has no GPU packages)."""
    seen = []
    apply_before_lora = fastpath.apply_before_lora

    def spy(model, fast, needs_logits=False, trainable_tokens=False):
        seen.append(trainable_tokens)
        return apply_before_lora(model, fast, needs_logits, trainable_tokens)

    monkeypatch.setattr(fastpath, "apply_before_lora", spy)
    build("fast", mask_in_output, fused_cross_entropy="auto")
    assert seen == [mask_in_output]  # the head trains a token row only when [MASK] stays in the output
    monkeypatch.setattr(fastpath, "liger_available", lambda: True)
    settings = fastpath.FastPath(fused_cross_entropy="auto")
    assert fastpath.cross_entropy_mode(settings, False, seen[0], "llama", 2048) == expected


@pytest.mark.parametrize("kernels", ["plain", "fast"])
def test_eval_and_generation_never_see_mask(kernels):
    llm, mask_id = build(kernels, fused_cross_entropy="chunked")
    with torch.no_grad():
        delta_param(llm).copy_(
            llm.get_base_model().model.norm.weight * 1e3
        )  # the default's tied head then emits [MASK]
    llm.eval()
    batch = masked_batch(mask_id)
    logits = llm(**batch).logits
    assert logits.shape == (3, 12, V_ORIG)
    generated = llm.generate(
        input_ids=batch["input_ids"][:1], max_new_tokens=4, do_sample=False, pad_token_id=0
    )
    assert generated.shape == (1, 16) and (generated[:, 12:] < V_ORIG).all()


def test_adapter_and_merged_exports_give_the_same_logits(tmp_path):
    """The adapter loads into a recipe rebuilt the same way (as evaluate.py loads one); the merged model
    loads with from_pretrained: its first V_orig columns are the trained model's logits, and generation
    suppresses the rest."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import AutoModelForCausalLM

    from recipes.causal_lm import CausalLMRecipe

    def recipe():
        meap = MeapObjective(mode="pretrain", mask_in_output=False)
        torch.manual_seed(0)
        return CausalLMRecipe(TINY, torch.optim.AdamW, lora=LORA, objectives={"meap": meap})

    trained = recipe()
    torch.manual_seed(1)
    for param in trained.llm.parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.5)
    mask_id = trained.tokenizer.mask_token_id
    batch = masked_batch(mask_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    expected = trained.llm.eval()(**inputs).logits.detach()
    trained.export(tmp_path, merged=True)

    rebuilt = recipe()
    set_peft_model_state_dict(rebuilt.llm, load_peft_weights(str(tmp_path / "adapter"), device="cpu"))
    torch.testing.assert_close(rebuilt.llm.eval()(**inputs).logits, expected)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    logits = merged(**inputs).logits
    assert logits.shape[-1] == 49216
    torch.testing.assert_close(logits[..., :V_ORIG], expected, rtol=1e-4, atol=1e-5)
    assert merged.generation_config.suppress_tokens == list(range(V_ORIG, 49216))
    assert isinstance(trained.llm.get_output_embeddings(), EmbeddingPrefixHead)  # restored after saving


def test_mask_in_output_false_needs_a_new_token(tiny_lm_factory):
    model, tokenizer = tiny_lm_factory(hidden_size=32, intermediate_size=64)
    tokenizer.add_special_tokens({"mask_token": "<|im_end|>"})  # an id inside the original rows
    with pytest.raises(ValueError, match="mask_in_output=false needs"):
        MeapObjective(mask_in_output=False).setup(model, tokenizer)


def test_benchmark_row_builds_the_input_only_recipe(tiny_lm_factory, tmp_path):
    """benchmarks/fast_path.py lm1b's `meap_input_only` row: its recipe (--tiny: CPU, fast path without
    CUDA) builds with the `[MASK]` row out of the output vocabulary and takes a training step."""
    from types import SimpleNamespace

    from benchmarks.fast_path import fixed_batches, lm_recipe, recipe_vocab

    _, tokenizer = tiny_lm_factory()
    tokenizer.save_pretrained(tmp_path)
    recipe = lm_recipe("fast", "meap_input_only", SimpleNamespace(tiny=True, tokenizer=str(tmp_path)))
    assert isinstance(recipe.llm.get_base_model().lm_head, EmbeddingPrefixHead)
    assert recipe.objectives.objectives["meap"].mask_in_output is False
    batch = fixed_batches(2, 16, recipe_vocab(recipe))
    recipe.training_step(batch, 0).backward()
    assert delta_param(recipe.llm).grad.abs().sum() > 0
