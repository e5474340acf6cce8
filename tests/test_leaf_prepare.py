"""LeaF stage 1 (leaf_prepare.py) and the layer-subset student, on tiny models with the real tokenizer."""

import json

import pytest
import torch

import leaf_prepare
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
