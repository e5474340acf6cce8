"""Packed rows (data/text/packing.py) give every token the loss it has unpacked."""

import pytest
import torch
import torch.nn.functional as F

from data.text.packing import PackingCollator, first_fit_decreasing
from models.packing import check_packing, llm_inputs


def documents(vocab: int, lengths=(7, 3, 11, 5), seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(5, vocab, (n,), generator=gen).tolist()
        labels = [-100] * (n // 3) + ids[n // 3 :]  # a prompt, then targets
        docs.append({"input_ids": ids, "labels": labels})
    return docs


def per_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[T,V], [T] -> [T-1] CE of predicting labels[1:] (0 where ignored)."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="none")


def test_first_fit_decreasing_fills_bins_without_overflow():
    bins = first_fit_decreasing([7, 3, 11, 5, 2], capacity=12)
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4]
    assert all(sum([7, 3, 11, 5, 2][i] for i in b) <= 12 for b in bins)
    assert len(bins) == 3  # 11 | 7+5 | 3+2
    with pytest.raises(ValueError, match="data.max_length"):
        first_fit_decreasing([13], capacity=12)


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_packed_per_token_losses_equal_unpacked(tiny_lm, attn):
    """sdpa: transformers' dense block-diagonal mask; flex_attention: a block mask that skips the blocks
    across documents (`backbone.attn_implementation=flex_attention`; forward compiled on CPU too, about 20 s;
    its backward needs CUDA: the GPU benchmark's packed flex rows train with it)."""
    model, tokenizer = tiny_lm
    model.set_attn_implementation(attn)
    model.eval()
    docs = documents(len(tokenizer))
    batch = PackingCollator(tokenizer.pad_token_id, max_length=16)(docs)
    assert batch["input_ids"].shape[0] == 2  # 11+5 | 7+3 (+ padding)
    inputs = llm_inputs(batch)
    assert "attention_mask" not in inputs
    with torch.no_grad():
        inputs.pop("labels")
        packed_logits = model(**inputs).logits
    compared = 0
    for row in range(batch["input_ids"].shape[0]):
        for doc in batch["document_ids"][row].unique().tolist():
            if doc < 0:
                continue
            where = (batch["document_ids"][row] == doc).nonzero().flatten()
            ids = batch["input_ids"][row, where]
            labels = batch["labels"][row, where]
            with torch.no_grad():
                alone = model(input_ids=ids[None]).logits[0]
            ref = per_token_ce(alone, labels)
            got = per_token_ce(packed_logits[row, where], labels)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
            compared += int((labels[1:] != -100).sum())
    assert compared == sum(sum(1 for y in d["labels"][1:] if y != -100) for d in docs)


def test_packed_batch_labels_never_cross_documents(tiny_lm):
    _, tokenizer = tiny_lm
    batch = PackingCollator(tokenizer.pad_token_id, max_length=16)(documents(len(tokenizer)))
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == -100).all()
    assert batch["attention_mask"].sum() == 7 + 3 + 11 + 5


def test_objectives_refuse_packed_batches(tiny_lm):
    _, tokenizer = tiny_lm
    batch = PackingCollator(tokenizer.pad_token_id, max_length=16)(documents(len(tokenizer)))
    check_packing(batch, [])  # plain CE: fine
    with pytest.raises(ValueError, match="data.packing=false"):
        check_packing(batch, ["decorr"])


def test_datamodule_packs_training_batches_only(tiny_lm):
    from pathlib import Path

    from data.text.datamodule import TextDataModule

    fixtures = Path(__file__).parent / "fixtures"
    _, tokenizer = tiny_lm
    data = TextDataModule(
        str(fixtures / "tiny_sft.jsonl"),
        str(fixtures / "tiny_sft_val.jsonl"),
        max_length=256,
        batch_size=4,
        packing=True,
    )
    data.connect_tokenizer(tokenizer)
    data.setup()
    train = next(iter(data.train_dataloader()))
    val = next(iter(data.val_dataloader()))
    assert "position_ids" in train and train["input_ids"].shape[0] < 4  # 4 short examples, fewer rows
    assert "position_ids" not in val


def test_short_rows_hold_a_few_documents_and_long_ones_get_a_row_of_their_own():
    """data.pack_length: rows of a few short documents (less attention per token than rows of max_length);
    a document longer than the row length, up to max_length, fills a row alone; beyond max_length: error."""
    docs = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (5, 5, 5, 5, 12)]
    batch = PackingCollator(0, max_length=16, row_length=10)(docs)
    real = batch["attention_mask"].sum(1).tolist()
    assert sorted(real) == [10, 10, 12] and batch["input_ids"].shape == (3, 12)
    assert int(batch["attention_mask"].sum()) == 32  # every token kept
    with pytest.raises(ValueError, match="exceeds data.max_length=16"):
        PackingCollator(0, max_length=16, row_length=10)([{"input_ids": [1] * 17, "labels": [1] * 17}])
    with pytest.raises(ValueError, match="pack_length must be in 1..data.max_length=16"):
        PackingCollator(0, max_length=16, row_length=32)


def test_the_datamodule_refuses_a_pack_length_beyond_max_length():
    from data.text.datamodule import TextDataModule

    with pytest.raises(ValueError, match="pack_length must be in 1..data.max_length=16"):
        TextDataModule(train_file="unused.jsonl", max_length=16, packing=True, pack_length=32)
