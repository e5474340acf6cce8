"""LeaF stage 1 at the response level: steps, per-prefix scoring inputs, counterfactual rows, the CLI switch."""

import json

import torch

import leaf_prepare
from data.leaf.response_level import (
    prepare_response_level,
    split_at_region_change,
    split_steps,
    tokenize_prefix_for_scoring,
)
from models.layer_subset import keep_decoder_layers

PROMPT = "Tom has 3 apples and buys 4 more.\nHow many apples now?"
RESPONSE = "Step 1: Tom starts with 3 apples.\nStep 2: He buys 4, so 3 + 4 = 7.\nStep 3: The answer is 7."
ROWS = [
    {"prompt": PROMPT, "response": RESPONSE, "id": "a"},
    {"prompt": "Say hi.", "response": "Hi."},  # one step: nothing to do at the response level
]


def test_split_steps_keeps_every_character():
    by_newline = split_steps(RESPONSE)
    assert len(by_newline) == 3 and "".join(by_newline) == RESPONSE and by_newline[0].endswith("\n")
    by_label = split_steps("Step 1: a. Step 2: b. Step 3: c.", r"(?=Step \d+:)")
    assert by_label == ["Step 1: a. ", "Step 2: b. ", "Step 3: c."]
    assert split_steps("one step") == ["one step"]


def test_prefix_scoring_covers_the_prompt_and_the_prefix_and_predicts_the_next_step(tiny_lm):
    _, tokenizer = tiny_lm
    steps = split_steps(RESPONSE)
    item = tokenize_prefix_for_scoring(tokenizer, PROMPT, steps, 2)
    prompt_spans = [s for s, p in zip(item.char_spans, item.in_prompt) if p]
    prefix_spans = [s for s, p in zip(item.char_spans, item.in_prompt) if not p]
    assert "".join(PROMPT[a:b] for a, b in prompt_spans) == PROMPT
    prefix = "".join(steps[:2])
    assert "".join(prefix[a:b] for a, b in prefix_spans) == prefix
    assert item.in_prompt == sorted(item.in_prompt, reverse=True)  # prompt first, then the prefix
    target = tokenizer.decode(item.input_ids[item.labels != -100])
    assert target == steps[2]
    assert max(item.positions) < int((item.labels != -100).nonzero().min())
    assert split_at_region_change([(0, 4)], [True, True, False, False]) == [(0, 2), (2, 4)]


def test_counterfactual_rows_cut_one_span_from_the_prompt_or_the_prefix(tiny_lm_factory):
    teacher, tokenizer = tiny_lm_factory()
    student = keep_decoder_layers(tiny_lm_factory(seed=3)[0], [0])
    out, counts = prepare_response_level(ROWS, teacher, student, tokenizer, quantile=0.3, progress=False)
    assert [r["source_index"] for r in out if not r["counterfactual"]] == [0, 1]
    extra = [r for r in out if r["counterfactual"]]
    assert extra and counts["counterfactual rows"] == len(extra) and counts["steps scored"] == 2
    assert counts["skipped: fewer than 2 steps"] == 1
    steps = split_steps(RESPONSE)
    assert {r["pruned_from"] for r in extra} <= {"prompt", "response"}
    for row in extra:
        k = row["step"]
        assert k in (1, 2) and row["id"] == "a" and row["pruned_text"].strip()
        assert row["response"].endswith(steps[k])
        prefix = "".join(steps[:k])
        if row["pruned_from"] == "prompt":
            assert row["response"] == prefix + steps[k]
            assert len(row["prompt"]) == len(PROMPT) - len(row["pruned_text"])
        else:
            assert row["prompt"] == PROMPT
            assert len(row["response"]) == len(prefix + steps[k]) - len(row["pruned_text"])


def test_cli_level_switch(tmp_path):
    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    torch.manual_seed(0)
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
            "--level",
            "response",
            "--quantile",
            "0.3",
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts["steps scored"] == 2 and len(rows) == counts["written"]
    assert all("step" in r for r in rows if r["counterfactual"])
