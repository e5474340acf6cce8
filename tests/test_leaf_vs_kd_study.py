"""Study 4 (LeaF vs KD): its task generator, its exact-match scoring, its arms, and the study end to end."""

from __future__ import annotations

import json
import random
import re

import pytest

from data.text.arith_word import build_arith_word, make_problem, parse_answer
from studies.eval_answers import evaluate_answers
from studies.leaf_vs_kd import distill_arms, parse_args, teacher_arm
from tests.hydra_utils import compose_train


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
