"""Plain-text LM data (format=lm): blocks of max_length tokens, and full_blocks_only for one batch shape."""

import pytest

from data.text.datamodule import TextDataModule


def corpus_module(tmp_path, tokenizer, words: int, **kw) -> TextDataModule:
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"word{i % 37}" for i in range(words)), encoding="utf-8")
    data = TextDataModule(str(text), format="lm", max_length=32, batch_size=4, val_fraction=0.2, **kw)
    data.connect_tokenizer(tokenizer)
    data.setup()
    return data


def test_full_blocks_only_drops_the_short_last_block_and_says_so(tmp_path, tiny_lm):
    _, tokenizer = tiny_lm
    ragged = corpus_module(tmp_path, tokenizer, words=300)
    blocks = ragged.train_set.dataset.examples
    assert len(blocks[-1]) < 32 and all(len(b) == 32 for b in blocks[:-1])  # the default keeps it

    full = corpus_module(tmp_path, tokenizer, words=300, full_blocks_only=True)
    kept = full.train_set.dataset.examples
    assert kept == blocks[:-1]
    bos = 1 if tokenizer.bos_token_id is not None else 0
    assert full.train_set.dataset.dropped_tokens == len(blocks[-1]) - bos > 0
    assert any("dropped (data.full_blocks_only)" in line for line in full.summary_lines())
    shapes = {tuple(b["input_ids"].shape[1:]) for b in full.train_dataloader()}
    masks_full = all(bool(b["attention_mask"].all()) for b in full.train_dataloader())
    assert shapes == {(32,)} and masks_full  # one shape, no padding: one compiled graph


def test_full_blocks_only_keeps_a_corpus_of_one_short_block_and_refuses_sft(tmp_path, tiny_lm):
    _, tokenizer = tiny_lm
    tiny = corpus_module(tmp_path, tokenizer, words=4, full_blocks_only=True, val_file=None)
    assert len(tiny.train_set.dataset.examples) == 1  # nothing else to train on: kept, not emptied
    with pytest.raises(ValueError, match="format=lm"):
        TextDataModule(str(tmp_path / "x.jsonl"), format="sft", full_blocks_only=True)


def test_drop_last_gives_one_batch_size_and_counts_what_it_leaves_out(tmp_path, tiny_lm):
    """With full blocks and drop_last every training batch is [batch_size, max_length] (one compiled graph);
    the rows left out of an epoch are said in the summary, and validation keeps every row."""
    _, tokenizer = tiny_lm
    data = corpus_module(tmp_path, tokenizer, words=300, full_blocks_only=True, drop_last=True)
    rows = len(data.train_set)
    assert rows % 4  # the corpus leaves a smaller last batch to drop
    batches = [b["input_ids"].shape for b in data.train_dataloader()]
    assert set(batches) == {(4, 32)} and len(batches) == rows // 4
    assert any(f"{rows % 4} training row(s) per epoch" in line for line in data.summary_lines())
    assert sum(b["input_ids"].shape[0] for b in data.val_dataloader()) == len(data.val_set)
    keeps = corpus_module(tmp_path, tokenizer, words=300, full_blocks_only=True)
    assert sum(b["input_ids"].shape[0] for b in keeps.train_dataloader()) == rows


def test_drop_last_never_empties_an_epoch(tmp_path, tiny_lm):
    _, tokenizer = tiny_lm
    small = corpus_module(tmp_path, tokenizer, words=40, drop_last=True, val_file=None)
    assert len(small.train_set) < 4 and len(list(small.train_dataloader())) == 1
    assert not any("data.drop_last" in line for line in small.summary_lines())  # nothing was left out
