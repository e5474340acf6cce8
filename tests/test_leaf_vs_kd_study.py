"""Study 4 (LeaF vs KD): its task generator, its exact-match scoring, its arms, and the study end to end."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest

from data.text.arith_word import (
    build_arith_word,
    distractor_numbers,
    distractor_only_numbers,
    distractor_sentences,
    make_problem,
    parse_answer,
    split_sentences,
)
from studies.eval_answers import evaluate_answers
from studies.leaf_vs_kd import distill_arms, parse_args, teacher_arm
from tests.hydra_utils import compose_train

OTHER_WORDS = ("bicycles", "o'clock", "years old", "rained", "cousins", "bus")
# sha256 of the default build (seed 0, 20k/200/600) before `distractors=` existed: study 4's first run
DEFAULT_BUILD_SHA256 = {
    "train": "819954f8da5ba9edd8f223235fd067efa5757364b778525f47286241e543388f",
    "val": "1b92081fc3a390bd53d0f83e1d06658dc3d51f2930708e13bfbf497d6f368c81",
    "test": "d3a316e43d4bddf27410f4c89d12d0960a646094536db5f447300c29f0c2fd13",
}


def _check_work(response: str) -> int:
    """Recompute every 'a op b = c' of a worked answer; return the final value."""
    value = None
    for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", response):
        a, b, c = int(a), int(b), int(c)
        assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] == c, response
        assert op != "/" or a % b == 0, response
        value = c
    return value


def test_problems_are_multi_step_and_their_worked_answers_are_right():
    rng = random.Random(0)
    for _ in range(300):
        row = make_problem(rng)
        steps = row["response"].count(" = ")
        assert steps >= 2, row
        assert _check_work(row["response"]) == row["answer"] == parse_answer(row["response"])
        assert row["answer"] >= 0


def test_splits_are_disjoint_by_item_and_seeded(tmp_path):
    paths = build_arith_word(tmp_path / "a", num_train=300, num_val=20, num_test=50)
    again = build_arith_word(tmp_path / "b", num_train=300, num_val=20, num_test=50)
    split = {k: [json.loads(line)["prompt"] for line in open(p)] for k, p in paths.items()}
    assert [len(split[k]) for k in ("train", "val", "test")] == [300, 20, 50]
    assert not set(split["test"]) & set(split["train"]) and not set(split["val"]) & set(split["train"])
    assert open(paths["test"]).read() == open(again["test"]).read()
    distracted = sum(
        any(w in p for w in ("bicycles", "o'clock", "years old", "rained", "cousins", "bus"))
        for p in split["train"]
    )
    assert 0.3 < distracted / 300 < 0.9  # distractor sentences are common but not everywhere


def test_other_distractors_build_the_same_files_as_before(tmp_path):
    paths = build_arith_word(tmp_path, distractors="other")
    digests = {k: hashlib.sha256(Path(p).read_bytes()).hexdigest() for k, p in paths.items()}
    assert digests == DEFAULT_BUILD_SHA256


def test_same_item_distractors_shadow_the_other_kind_and_are_found(tmp_path):
    """Same seed: the same story and distractor numbers in the same places; only the sentences differ."""
    rng_other, rng_same = random.Random(7), random.Random(7)
    with_distractors = 0
    for _ in range(300):
        other, same = make_problem(rng_other, "other"), make_problem(rng_same, "same-item")
        assert other["response"] == same["response"]
        found_other, found_same = distractor_sentences(other["prompt"]), distractor_sentences(same["prompt"])
        assert len(found_other) == sum(
            any(w in s for w in OTHER_WORDS) for s in split_sentences(other["prompt"])
        )
        assert len(found_same) == len(found_other) and distractor_numbers(
            same["prompt"]
        ) == distractor_numbers(other["prompt"])
        item, subject = re.search(r"How many (\w+) does (\w+) have now", same["prompt"]).groups()
        for sentence in found_same:  # the question's item, another person
            assert item in sentence and subject not in sentence, sentence
        story = [s for s in split_sentences(same["prompt"]) if s not in found_same]
        assert story == [s for s in split_sentences(other["prompt"]) if s not in found_other]
        numbers = {int(n) for s in story for n in re.findall(r"\d+", s)}
        assert numbers <= {int(n) for n in re.findall(r"\d+", same["response"])}  # the story is all used
        with_distractors += bool(found_same)
    assert 0.3 < with_distractors / 300 < 0.9
    paths = build_arith_word(tmp_path, num_train=300, num_val=20, num_test=50, distractors="same-item")
    split = {k: [json.loads(line)["prompt"] for line in open(p)] for k, p in paths.items()}
    prompts = [p for rows in split.values() for p in rows]
    assert len(set(prompts)) == len(prompts) == 370  # unique, so disjoint splits
    with pytest.raises(ValueError, match="same-item"):
        build_arith_word(tmp_path / "x", distractors="same")


def test_distractor_only_numbers_leave_out_the_numbers_the_answer_uses():
    prompt = (
        "Mia has 14 apples. Leo has 5 apples. Then Mia finds 9 more apples. Zoe owns 30 bicycles. "
        "How many apples does Mia have now?"
    )
    response = "Mia starts with 14 apples. Mia finds 9 more: 14 + 9 = 23. The answer is 23."
    assert distractor_sentences(prompt) == ["Leo has 5 apples.", "Zoe owns 30 bicycles."]
    assert distractor_numbers(prompt) == {5, 30}  # "Mia has 14 apples." is the story, not a distractor
    assert distractor_only_numbers(prompt, response) == {5, 30}
    assert distractor_only_numbers(prompt, response.replace("23", "30")) == {5}


def test_parse_answer_takes_the_first_stated_answer():
    assert parse_answer("5 + 3 = 8. The answer is 8. The answer is 9.") == 8
    assert parse_answer("no answer here 12") is None


def test_evaluate_answers_scores_the_stated_answer(tiny_lm, monkeypatch):
    model, tokenizer = tiny_lm
    rows = [{"prompt": "Ava has 3 cards. How many?", "answer": 3}, {"prompt": "Leo has 4.", "answer": 4}]
    outputs = ["3 + 0 = 3. The answer is 3.", "The answer is 5. 4"]
    monkeypatch.setattr("studies.eval_answers.greedy_generate", lambda *a, **k: outputs)
    assert [r["correct"] for r in evaluate_answers(model, tokenizer, rows)] == [True, False]


def test_kd_and_leaf_arms_differ_only_in_their_training_file(tmp_path):
    args = parse_args(["--out", str(tmp_path), "--seeds", "0,1"])
    arms = {a.name: a.overrides for a in distill_arms(args, tmp_path / "teacher" / "model")}
    assert sorted(arms) == ["kd_s0", "kd_s1", "leaf_s0", "leaf_s1"]
    for seed in (0, 1):
        kd, leaf = arms[f"kd_s{seed}"], arms[f"leaf_s{seed}"]
        differ = set(kd) ^ set(leaf)
        assert differ == {f"data.train_file={tmp_path.resolve()}/data/kd_train.jsonl",
                          f"data.train_file={tmp_path.resolve()}/data/leaf_train.jsonl"}  # fmt: skip
        assert f"seed={seed}" in kd and "trainer=gpu" in kd
    cfg = compose_train(arms["leaf_s0"])  # the teacher override composes into the objective
    assert cfg.objective.leaf.teacher.source == str(tmp_path / "teacher" / "model")
    assert cfg.model.ce_weight == 0 and cfg.model.lora is None and cfg.student.layers == "::2"
    assert cfg.data.train_file.endswith("leaf_train.jsonl") and cfg.data.val_file.endswith("arith/val.jsonl")
    assert compose_train(teacher_arm(args).overrides).trainer.max_steps == 400


@pytest.mark.slow
def test_study_smoke_runs_every_arm_writes_report_and_resumes(tmp_path):
    from studies.leaf_vs_kd import main

    report = main(["--out", str(tmp_path), "--smoke", "--seeds", "0"])
    text = report.read_text()
    for name in ("teacher", "student_before", "kd_s0", "leaf_s0", "LeaF - KD"):
        assert f"| {name}" in text
    leaf_rows = [json.loads(line) for line in open(tmp_path / "data" / "leaf_train.jsonl")]
    kd_rows = [json.loads(line) for line in open(tmp_path / "data" / "kd_train.jsonl")]
    assert [r["prompt"] for r in leaf_rows if not r["counterfactual"]] == [r["prompt"] for r in kd_rows]
    first = {p.name: p.stat().st_mtime for p in (tmp_path / "eval").iterdir()}
    main(["--out", str(tmp_path), "--smoke", "--seeds", "0"])  # resumes: nothing retrained or re-evaluated
    assert {p.name: p.stat().st_mtime for p in (tmp_path / "eval").iterdir()} == first
