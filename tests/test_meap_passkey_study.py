"""Study 3 (MEAP pass-key): its SFT data, its probe, its compute matching, and the study end to end."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from data.text.demo_corpus import DEVIL_DICT
from data.text.retrieval_sft import build_retrieval_sft, fortune_quotes
from studies.arms import batch_overrides
from studies.eval_generate import greedy_generate, paired_difference, wilson_interval
from studies.eval_passkey import (
    INTRO,
    NEEDLE,
    build_trials,
    evaluate_passkey,
    extract_key,
    load_jsonl,
    prompt_ids,
)
from studies.meap_passkey import make_arms, meap_token_ratio, parse_args
from tests.hydra_utils import compose_train

PIECES = [f"Filler sentence number {i} about grass and stones." for i in range(300)]


def test_retrieval_sft_rows_answer_from_context_and_split_by_quote(tmp_path):
    paths = build_retrieval_sft(tmp_path, num_train=60, num_val=20, max_quotes=4)
    train = [json.loads(line) for line in open(paths["train"])]
    val = [json.loads(line) for line in open(paths["val"])]
    assert len(train) == 60 and len(val) == 20
    for row in train + val:
        if row["task"] == "find_quote":
            word = re.search(r'contains the word "(\w+)"', row["prompt"]).group(1)
            assert row["response"] in row["prompt"] and word in row["response"].lower()
        elif row["task"] == "nth_quote":
            n = int(re.search(r"Repeat quote number (\d+)", row["prompt"]).group(1))
            assert f"Quote {n}: {row['response']}\n" in row["prompt"]
    answers = lambda rows: {r["response"] for r in rows if r["task"] != "define"}  # noqa: E731
    assert not answers(train) & answers(val), "validation quotes must never be trained on"
    assert build_retrieval_sft(tmp_path, num_train=5) == paths  # idempotent: not rebuilt
    assert len(open(paths["train"]).readlines()) == 60


def test_fortune_quotes_are_single_clean_paragraphs():
    quotes = fortune_quotes()
    assert len(quotes) > 3000
    assert all("\n" not in q and 12 <= len(q.split()) <= 70 for q in quotes)


def test_passkey_trials_fit_their_length_and_hide_the_key(tiny_lm):
    _, tokenizer = tiny_lm
    trials = build_trials(tokenizer, [128, 256], 10, seed=3, pieces=PIECES)
    assert trials == build_trials(tokenizer, [128, 256], 10, seed=3, pieces=PIECES)  # seeded
    assert [t["length"] for t in trials] == [128] * 10 + [256] * 10
    for t in trials:
        assert re.fullmatch(r"\d{5}", t["key"]) and NEEDLE.format(key=t["key"]) in t["context"]
        assert t["length"] - 24 <= len(prompt_ids(tokenizer, t, "raw")) <= t["length"]
        chat = tokenizer.decode(prompt_ids(tokenizer, t, "chat"))
        assert chat.endswith("What is the pass key?<|im_end|>\n<|im_start|>assistant\nThe pass key is")
    hay = [t["context"][len(INTRO) :] for t in trials]
    depths = [h.index(t["key"]) / len(h) for h, t in zip(hay, trials)]
    assert min(depths) < 0.3 and max(depths) > 0.7  # the needle moves through the haystack


def test_passkey_trials_are_byte_identical_to_before_the_multikey_probe(tiny_lm):
    """Pinned before studies/eval_multikey.py shared the filler selection: a resumed study folder must
    keep evaluating the same single-key trials. If this fails, the single-key probe changed."""
    _, tokenizer = tiny_lm
    trials = build_trials(tokenizer, [96, 256], 5, seed=7, pieces=PIECES)
    digest = hashlib.sha256(json.dumps(trials, sort_keys=True).encode()).hexdigest()
    assert digest == "bee28318fe8ac3a3435ba3535910b6d22333e733cb76040aea8bee4da22ea0a3"
    prompts = [prompt_ids(tokenizer, t, fmt) for t in trials for fmt in ("chat", "raw")]
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    assert digest == "104e6fb477f9e23fd8250efb1919baa90f8e1e4773664f618e9f9267a5fe221a"


@pytest.mark.slow
@pytest.mark.skipif(not DEVIL_DICT.exists(), reason="needs the Debian package dict-devil")
def test_study_passkey_trials_file_is_unchanged(tmp_path):
    """The study's own data/passkey_trials.jsonl (SmolLM2 tokenizer, Devil's Dictionary, seed 0, 200 per
    length at 256/1024/2048), as built before the multikey probe and carried to the GPU run."""
    from studies.eval_passkey import haystack_pieces, save_jsonl
    from studies.meap_passkey import _smollm2_tokenizer

    trials = build_trials(_smollm2_tokenizer(), [256, 1024, 2048], 200, seed=0, pieces=haystack_pieces())
    save_jsonl(trials, tmp_path / "passkey_trials.jsonl")
    digest = hashlib.sha256((tmp_path / "passkey_trials.jsonl").read_bytes()).hexdigest()
    assert digest == "05859fb6531236f67d7dddb5ea08fb83d9f25d2d67357185e00710321da976e6"


def test_extract_key_takes_the_first_number():
    assert extract_key(" 12345. Remember") == "12345"
    assert extract_key(" the key is 123456") == "123456"  # a longer number is not a match for 12345
    assert extract_key(" nothing") is None


def test_batched_left_padded_greedy_matches_one_by_one(tiny_lm):
    model, tokenizer = tiny_lm
    prompts = [tokenizer("Hello there, my friend")["input_ids"], tokenizer("Hi")["input_ids"]]
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    single = [greedy_generate(model, tokenizer, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_evaluate_passkey_scores_exact_match(tiny_lm, monkeypatch):
    model, tokenizer = tiny_lm
    trials = build_trials(tokenizer, [96], 4, seed=0, pieces=PIECES)
    outputs = [f" {trials[0]['key']}.", " 99999", f" {trials[2]['key']}1", " none"]
    monkeypatch.setattr("studies.eval_passkey.greedy_generate", lambda *a, **k: outputs)
    results = evaluate_passkey(model, tokenizer, trials, "chat")
    assert [r["correct"] for r in results] == [True, False, False, False]


def test_wilson_interval_and_paired_difference():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 200)[0] == 0.0 and 0.0 < wilson_interval(0, 200)[1] < 0.02
    diff, lo, hi = paired_difference([True, True, False, True], [False, True, False, False])
    assert diff == pytest.approx(0.5) and lo < 0.5 < hi


def test_meap_arm_gets_fewer_steps_for_the_same_tokens(tmp_path, tiny_lm):
    _, tokenizer = tiny_lm
    rows = [{"prompt": "Say it.", "response": " ".join(["word"] * n)} for n in (40, 40, 2, 2)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = parse_args(["--out", str(tmp_path), "--smoke", "--steps", "100", "--min-answer-tokens", "16"])
    budget = meap_token_ratio(train, tokenizer, args)
    lengths = [len(tokenizer.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}],
        tokenize=True, return_dict=True)["input_ids"]) for r in rows]  # fmt: skip
    assert budget["rows_with_copy"] == 2
    assert budget["ratio"] == pytest.approx((sum(lengths) + lengths[0] + lengths[1]) / sum(lengths))
    arms = {a.name: a.overrides for a in make_arms(args, budget)}
    assert f"trainer.max_steps={round(100 / budget['ratio'])}" in arms["meap_s0"]
    assert "trainer.max_steps=100" in arms["sft_s0"] and "experiment=meap_passkey_meap" in arms["meap_s0"]


def test_batch_overrides_keep_the_rows_per_step_and_refuse_a_non_divisor():
    assert batch_overrides(64) == batch_overrides(64, 64) == ["data.batch_size=64"]  # as before the option
    assert batch_overrides(64, 16) == ["data.batch_size=16", "trainer.accumulate_grad_batches=4"]
    assert batch_overrides(64, 1) == ["data.batch_size=1", "trainer.accumulate_grad_batches=64"]
    for bad in (24, 0, 128):
        with pytest.raises(ValueError, match=f"micro-batch {bad} does not divide the batch size 64"):
            batch_overrides(64, bad)


def test_micro_batch_reaches_both_arms_and_a_non_divisor_is_refused(tmp_path, capsys):
    args = parse_args(["--out", str(tmp_path), "--micro-batch", "16"])
    budget = {"ratio": 1.25}
    for arm in make_arms(args, budget):
        cfg = compose_train(arm.overrides)
        assert cfg.data.batch_size == 16 and cfg.trainer.accumulate_grad_batches == 4, arm.name
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--smoke", "--micro-batch", "3"])  # smoke batch: 4
    assert "micro-batch 3 does not divide the batch size 4" in capsys.readouterr().err


@pytest.mark.slow
def test_study_smoke_runs_every_arm_writes_report_and_resumes(tmp_path):
    """Pass-key probe alone first (a study folder from before the multikey probe), then both probes:
    the second run trains and re-evaluates nothing it has, and adds the multikey block; a third resumes."""
    from studies.meap_passkey import main

    args = ["--out", str(tmp_path), "--smoke", "--micro-batch", "2"]  # 2 x 2 rows per step
    text = main([*args, "--probes", "passkey"]).read_text()
    for name in ("base", "sft_s0", "meap_s0", "MEAP - SFT"):
        assert f"| {name}" in text
    assert "## Pass-key accuracy, chat format" in text and "Multi-key" not in text
    assert (tmp_path / "passkey.png").exists()
    for arm in ("sft_s0", "meap_s0"):
        assert json.loads((tmp_path / arm / "results.json").read_text())["step"] == 4  # optimizer steps
        assert "trainer.accumulate_grad_batches=2" in (tmp_path / arm / "command.txt").read_text()
    mtimes = lambda: {p.relative_to(tmp_path): p.stat().st_mtime for p in tmp_path.glob("*/*.json*")}  # noqa: E731
    first = mtimes()

    text = main(args).read_text()  # default: both probes
    blocks = text.split("## Multi-key (3 needles) accuracy")
    assert "## Pass-key accuracy, chat format" in blocks[0] and len(blocks) == 3  # chat and raw blocks
    assert blocks[1].count("| MEAP - SFT, seed 0") == 1 and "Confuser answers (chat)" in blocks[1]
    assert re.search(r"\| meap_s0 \| \d+/6 \(\d+\.\d%\) \| \d+/6 \(", blocks[1])  # 6 trials, 128 and 256 tok
    assert (tmp_path / "multikey.png").exists()
    assert len(load_jsonl(tmp_path / "data" / "multikey_trials.jsonl")) == 12
    second = mtimes()
    assert {k: v for k, v in second.items() if k in first} == first  # nothing retrained or re-evaluated
    assert set(second) - set(first) == {
        Path(f"eval/{m}_multikey_{f}.jsonl") for m in ("base", "sft_s0", "meap_s0") for f in ("chat", "raw")
    } | {Path("data/multikey_trials.jsonl")}

    main(args)  # resumes: nothing retrained or re-evaluated
    assert mtimes() == second


def test_goal_line_says_when_the_secondary_format_contradicts_it(tmp_path):
    """Study 3's multi-key run: +6.5 points in the chat format (the goal's), -5.5 in raw. The goal line
    reports both, and flags the opposite sign instead of a bare "met"."""
    from argparse import Namespace

    from studies.meap_passkey import probe_section

    def rows(hits: int) -> list[dict]:  # 20 trials at 1024 tokens, the first `hits` correct
        return [{"length": 1024, "index": i, "correct": i < hits, "confuser": False} for i in range(20)]

    results = {
        "sft_s0": {"chat": rows(8), "raw": rows(12)},
        "meap_s0": {"chat": rows(10), "raw": rows(11)},
    }
    args = Namespace(out=str(tmp_path), seeds=[0], lengths=[1024], multikey_lengths=[1024], keys=8)
    goal = [line for line in probe_section(args, "passkey", results) if line.startswith("Goal")][0]
    assert ": met (MEAP - SFT = +10.0 points" in goal
    assert "raw format -5.0 (opposite sign: not robust)" in goal
    results["meap_s0"]["raw"] = rows(13)
    goal = [line for line in probe_section(args, "passkey", results) if line.startswith("Goal")][0]
    assert "raw format +5.0)" in goal and "not robust" not in goal
