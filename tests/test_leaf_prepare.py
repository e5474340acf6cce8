"""LeaF stage 1 (leaf_prepare.py) and the layer-subset student, on tiny models with the real tokenizer."""

import json

import pytest
import torch

import leaf_prepare
from losses.leaf import confounder_scores, confounder_spans
from models.attention_capture import QueryKeyCapture
from models.layer_subset import keep_decoder_layers, parse_layer_selection

ROWS = [
    {"prompt": "Describe a river in one\nshort sentence.", "response": "A river is water that moves."},
    {"prompt": "Name two colours.", "response": "Red and blue.", "id": 7},
    {"question": "no prompt field"},
]


def test_tokenize_for_scoring_selects_exactly_the_user_text(tiny_lm):
    _, tokenizer = tiny_lm
    item = leaf_prepare.tokenize_for_scoring(tokenizer, ROWS[0]["prompt"], ROWS[0]["response"])
    prompt = ROWS[0]["prompt"]
    assert "".join(prompt[a:b] for a, b in item.char_spans) == prompt  # contiguous, complete, no template
    special = set(tokenizer.all_special_ids)
    assert not any(int(item.input_ids[i]) in special for i in item.instruction_positions)
    assert item.whitespace.tolist() == [not prompt[a:b].strip() for a, b in item.char_spans]
    assert item.whitespace.any()  # the newline token is protected
    labelled = tokenizer.decode(item.input_ids[item.labels != -100])
    assert (
        labelled.startswith(ROWS[0]["response"])
        and max(item.instruction_positions) < (item.labels != -100).nonzero().min()
    )


def test_embedding_gradients_reach_the_prompt_but_not_the_last_token(tiny_lm):
    model, tokenizer = tiny_lm
    item = leaf_prepare.tokenize_for_scoring(tokenizer, ROWS[1]["prompt"], ROWS[1]["response"])
    grads = leaf_prepare.embedding_grad_norms(model, item.input_ids, item.labels)
    assert grads.shape == item.input_ids.shape
    assert (grads[item.instruction_positions] > 0).all()
    assert grads[-1] == 0  # the last embedding only predicts a token that does not exist
    assert not any(p.grad is not None for p in model.parameters())


def test_prepare_writes_originals_then_their_counterfactuals(tiny_lm_factory):
    teacher, tokenizer = tiny_lm_factory()
    student = keep_decoder_layers(tiny_lm_factory(seed=3)[0], [0])
    out, counts = leaf_prepare.prepare(
        ROWS, teacher, student, tokenizer, quantile=0.3, cap=0.5, progress=False
    )
    originals = [r for r in out if not r["counterfactual"]]
    assert [r["source_index"] for r in originals] == [0, 1, 2]
    assert originals[1]["id"] == 7 and originals[0]["prompt"] == ROWS[0]["prompt"]
    extra = [r for r in out if r["counterfactual"]]
    assert extra and counts["counterfactual rows"] == len(extra) and counts["written"] == len(out)
    assert counts["skipped: no prompt/response"] == 1 and counts["rows"] == 3
    for row in extra:
        source = ROWS[row["source_index"]]
        assert row["response"] == source["response"] and row["pruned_text"].strip()
        assert len(row["prompt"]) == len(source["prompt"]) - len(row["pruned_text"])
        assert row["pruned_text"] in source["prompt"]
    indices = [r["source_index"] for r in out]
    assert indices == sorted(indices)  # each original is followed by its own counterfactuals


def test_command_line_end_to_end(tmp_path, capsys):
    data, out = tmp_path / "rows.jsonl", tmp_path / "leaf.jsonl"
    lines = [json.dumps(ROWS[0]), '{"prompt": "cut off in the mid', json.dumps(ROWS[1])]
    data.write_text("\n".join(lines) + "\n")  # one malformed line, as training meets them
    counts = leaf_prepare.main(
        [
            "--data",
            str(data),
            "--out",
            str(out),
            "--teacher",
            "tiny",
            "--student",
            "tiny",
            "--student-layers",
            "0",
            "--quantile",
            "0.3",
        ]
    )
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == counts["written"] == 2 + counts["counterfactual rows"]
    assert counts["skipped: malformed JSON line"] == 1 and counts["rows"] == 2
    assert all("_line" not in row for row in written)
    assert f"wrote {out}" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="--data"):
        leaf_prepare.main(["--data", str(tmp_path / "missing.jsonl"), "--out", str(out)])


def test_layer_subset_renumbers_layers_and_keeps_capture_working(tiny_lm_factory):
    assert parse_layer_selection("::2", 5) == [0, 2, 4]
    assert parse_layer_selection(2, 5) == [0, 2, 4] and parse_layer_selection([4, 1], 5) == [4, 1]
    assert parse_layer_selection("0", 5) == [0] and parse_layer_selection("1,3", 5) == [1, 3]
    with pytest.raises(ValueError, match="distinct"):
        parse_layer_selection([0, 9], 5)
    model, _ = tiny_lm_factory(num_layers=4)
    full, _ = tiny_lm_factory(num_layers=4)
    ids = torch.randint(0, 1000, (1, 9))
    keep_decoder_layers(full, "0:4")
    with torch.no_grad():
        assert torch.allclose(full(input_ids=ids).logits, model(input_ids=ids).logits)
    keep_decoder_layers(model, [0, 3])
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    with torch.no_grad(), QueryKeyCapture(model) as captured:
        out = model(input_ids=ids, output_hidden_states=True)
    assert sorted(captured) == [0, 1] and len(out.hidden_states) == 3


# Batched scoring (leaf_prepare.score_items): prompts and responses of different lengths, so every batch is
# padded and rows hold different numbers of target tokens (a batch-mean loss would scale row b by n_b / N).
MIXED_ROWS = [
    {"prompt": "Name two colours.", "response": "Red and blue."},
    {
        "prompt": "Tom has 3 apples and buys 4 more. His sister owns 2 dogs.\nHow many apples now?",
        "response": "Tom starts with 3.\n3 + 4 = 7.\nThe answer is 7.",
    },
    {"question": "no prompt field"},
    {"prompt": "Hi.", "response": "Hello there.\nHow can I help you today? I can answer questions.", "id": 3},
    {"prompt": "Describe a river in one\nshort sentence.", "response": "A river is water that moves."},
    {"prompt": "Count: one, two, three, four, five, six.", "response": "Six words.\nSix numbers."},
]
RTOL = 1e-5  # fp32; the measured differences are about 2e-7 relative (summation order)


def assert_same_grads(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within RTOL relative (plus 1e-7 of the row's largest norm, for the exact zeros)."""
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-7 * float(want.abs().max()))


def _teacher_student(tiny_lm_factory):
    teacher, tokenizer = tiny_lm_factory()
    student = keep_decoder_layers(tiny_lm_factory(seed=3)[0], [0])
    return teacher.requires_grad_(False), student.requires_grad_(False), tokenizer


def test_batched_gradients_are_each_rows_own_one_row_gradients(tiny_lm_factory):
    teacher, student, tokenizer = _teacher_student(tiny_lm_factory)
    rows = [r for r in MIXED_ROWS if "prompt" in r]
    items = [leaf_prepare.tokenize_for_scoring(tokenizer, r["prompt"], r["response"]) for r in rows]
    items = [items[i] for i in (1, 0, 3, 4, 2)]  # not sorted by length: padded rows inside the batch
    lengths = [int(item.input_ids.numel()) for item in items]
    targets = [int((item.labels != -100).sum()) for item in items]
    assert len(set(lengths)) == len(items) and len(set(targets)) > 1
    for model in (teacher, student):
        one = [leaf_prepare.embedding_grad_norms(model, item.input_ids, item.labels) for item in items]
        batched = leaf_prepare.batch_embedding_grad_norms(
            model, [(item.input_ids, item.labels) for item in items]
        )
        for got, want, n in zip(batched, one, targets):
            assert_same_grads(got, want)  # the shape too: padding is cut off
            # the gradient a batch-mean loss gives this row is far outside the tolerance
            assert not torch.allclose(want * n / sum(targets), want, rtol=RTOL, atol=0)
    assert not any(p.grad is not None for p in teacher.parameters())


def test_logits_only_at_labelled_positions_leaves_the_model_as_it_was(tiny_lm_factory, monkeypatch):
    model, tokenizer = tiny_lm_factory()
    model.requires_grad_(False)
    items = [leaf_prepare.tokenize_for_scoring(tokenizer, r["prompt"], r["response"]) for r in MIXED_ROWS[:2]]
    pairs = [(item.input_ids, item.labels) for item in items]
    selected = leaf_prepare.batch_embedding_grad_norms(model, pairs)
    ids = items[0].input_ids[None]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))  # the hook is gone
    monkeypatch.setattr(model, "get_output_embeddings", lambda: None)  # no head to hook: full logits
    for got, want in zip(selected, leaf_prepare.batch_embedding_grad_norms(model, pairs)):
        assert_same_grads(got, want)


def test_batched_scores_mark_the_same_tokens_as_one_row_scoring(tiny_lm_factory):
    teacher, student, tokenizer = _teacher_student(tiny_lm_factory)
    rows = [r for r in MIXED_ROWS if "prompt" in r]
    items = [leaf_prepare.tokenize_for_scoring(tokenizer, r["prompt"], r["response"]) for r in rows]
    one = leaf_prepare.score_items(items, teacher, student, batch_size=1, progress=False)
    batched = leaf_prepare.score_items(items, teacher, student, batch_size=3, progress=False)
    marked = 0
    for item, (t1, s1), (tb, sb) in zip(items, one, batched):
        assert t1.shape == tb.shape == (len(item.instruction_positions),)  # input order restored
        assert_same_grads(tb, t1)
        assert_same_grads(sb, s1)
        scores_one, scores_batched = confounder_scores(t1, s1), confounder_scores(tb, sb)
        torch.testing.assert_close(scores_batched, scores_one, atol=1e-5, rtol=0)
        spans = confounder_spans(scores_one, 0.3, 0.5, protected=item.whitespace)
        assert confounder_spans(scores_batched, 0.3, 0.5, protected=item.whitespace) == spans
        marked += bool(spans)
    assert marked >= 3


@pytest.mark.parametrize("level", ["instruction", "response"])
def test_batched_prepare_writes_exactly_the_one_row_output(tiny_lm_factory, level):
    teacher, student, tokenizer = _teacher_student(tiny_lm_factory)
    prepare = leaf_prepare.prepare_rows(level, r"\n+")
    one, one_counts = prepare(MIXED_ROWS, teacher, student, tokenizer, 0.3, progress=False, batch_size=1)
    assert sum(r["counterfactual"] for r in one) >= 3
    for batch_size in (2, 64):
        out, counts = prepare(
            MIXED_ROWS, teacher, student, tokenizer, 0.3, progress=False, batch_size=batch_size
        )
        assert json.dumps(out) == json.dumps(one)  # same rows, same order, same keys
        assert list(counts.items()) == list(one_counts.items())


def test_command_line_batch_size_does_not_change_the_file(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in MIXED_ROWS))
    argv = ["--data", str(data), "--teacher", "tiny", "--student", "tiny", "--student-layers", "0"]
    for batch_size in ("1", "4"):
        leaf_prepare.main(
            [*argv, "--out", str(tmp_path / f"b{batch_size}.jsonl"), "--batch-size", batch_size]
        )
    leaf_prepare.main([*argv, "--out", str(tmp_path / "default.jsonl"), "--quantile", "0.1"])
    assert (tmp_path / "b1.jsonl").read_bytes() == (tmp_path / "b4.jsonl").read_bytes()
    assert (tmp_path / "b1.jsonl").read_bytes() == (tmp_path / "default.jsonl").read_bytes()
    with pytest.raises(ValueError, match="batch_size"):
        leaf_prepare.main([*argv, "--out", str(tmp_path / "x.jsonl"), "--batch-size", "0"])
