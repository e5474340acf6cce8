"""Study 4 (LeaF vs KD): its task generator, its exact-match scoring, its arms, and the study end to end."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
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
from studies import leaf_vs_kd
from studies.eval_answers import evaluate_answers
from studies.leaf_vs_kd import distill_arms, distractor_errors, parse_args, teacher_arm
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


def test_distractor_errors_count_wrong_answers_that_use_a_distractor_number():
    rows = [
        {"prompt": "Mia has 4 cards. Leo has 7 cards. Then Mia finds 2 more cards. How many cards does Mia have now?",
         "response": "Mia starts with 4 cards. Mia finds 2 more: 4 + 2 = 6. The answer is 6."},
        {"prompt": "Ava has 3 coins. Then Ava finds 5 more coins. How many coins does Ava have now?",
         "response": "Ava starts with 3 coins. Ava finds 5 more: 3 + 5 = 8. The answer is 8."},
    ]  # fmt: skip
    results = [
        {"correct": False, "predicted": 9, "output": "Mia starts with 7 cards. 7 + 2 = 9. The answer is 9."},
        {"correct": False, "predicted": 7, "output": "3 + 4 = 7. The answer is 7."},  # no distractor there
    ]
    counts = distractor_errors(rows, results)
    assert counts == {
        "wrong": 2,
        "wrong_distractor_number": 1,
        "wrong_distractor_answer": 0,
        "with_distractors": (0, 1),
        "without_distractors": (0, 1),
    }
    results[0] = {"correct": False, "predicted": 7, "output": "The answer is 7."}
    assert distractor_errors(rows, results)["wrong_distractor_answer"] == 1
    results[1] = {"correct": True, "predicted": 8, "output": "The answer is 8."}
    assert distractor_errors(rows, results)["without_distractors"] == (1, 1)
    with pytest.raises(ValueError, match="1 results for 2 test items"):
        distractor_errors(rows, results[:1])


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


def test_micro_batch_accumulates_to_the_same_rows_per_step(tmp_path, capsys):
    args = parse_args(["--out", str(tmp_path), "--seeds", "0", "--micro-batch", "16"])
    for arm in [teacher_arm(args), *distill_arms(args, tmp_path / "teacher" / "model")]:
        assert "data.batch_size=16" in arm.overrides and "trainer.accumulate_grad_batches=4" in arm.overrides
    cfg = compose_train(teacher_arm(args).overrides)
    assert cfg.data.batch_size == 16 and cfg.trainer.accumulate_grad_batches == 4
    default = parse_args(["--out", str(tmp_path)])
    assert not any(o.startswith("trainer.accumulate") for o in teacher_arm(default).overrides)
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--micro-batch", "24"])
    assert "micro-batch 24 does not divide the batch size 64" in capsys.readouterr().err


def test_kd_stage1_student_is_the_first_kd_arm_trained_before_stage1(tmp_path, monkeypatch):
    """Order: teacher, kd_s0, stage 1 on kd_s0's exported model (not pruned again), then every arm."""
    import leaf_prepare

    events = []

    def fake_run_arms(arms, out):
        events.append(("train", [a.name for a in arms]))
        for arm in arms:  # what a finished arm leaves: an exported model
            (Path(out) / arm.name / "model").mkdir(parents=True, exist_ok=True)
            (Path(out) / arm.name / "model" / "config.json").write_text("{}")

    def fake_prepare(argv):
        events.append(("stage1", argv))
        out = argv[argv.index("--out") + 1]
        Path(out).write_text(json.dumps({"prompt": "p", "counterfactual": False}) + "\n")
        return Counter(rows=1)

    monkeypatch.setattr(leaf_vs_kd, "run_arms", fake_run_arms)
    monkeypatch.setattr(leaf_prepare, "main", fake_prepare)
    for student in ("kd", "base"):
        events.clear()
        out = tmp_path / student
        args = parse_args(["--out", str(out), "--smoke", "--seeds", "1,2", "--stage1-student", student])
        train = out / "train.jsonl"
        out.mkdir()
        train.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "r"}) + "\n" for i in range(20)))
        _, arms, stage1 = leaf_vs_kd.train_all(args, str(train))
        order = [e[1] if e[0] == "train" else "stage1" for e in events]
        argv = next(e[1] for e in events if e[0] == "stage1")
        student_args = (argv[argv.index("--student") + 1], argv[argv.index("--student-layers") + 1])
        every = [a.name for a in arms]
        if student == "kd":
            assert order == [["teacher"], ["kd_s1"], "stage1", every]
            assert student_args == (str(out.resolve() / "kd_s1" / "model"), "")
        else:
            assert order == [["teacher"], "stage1", every] and student_args == ("tiny", "::2")
        assert stage1["student"] == student_args[0]
        assert len((out.resolve() / "data" / "kd_train.jsonl").read_text().splitlines()) == args.distill_rows


def test_a_rerun_with_other_distractors_or_stage1_student_is_refused(tmp_path):
    from studies.leaf_vs_kd import check_study_settings

    check_study_settings(parse_args(["--out", str(tmp_path), "--distractors", "same-item"]))
    check_study_settings(parse_args(["--out", str(tmp_path), "--distractors", "same-item"]))  # same: fine
    with pytest.raises(
        SystemExit, match="built with --distractors same-item; this run asks for --distractors other"
    ):
        check_study_settings(parse_args(["--out", str(tmp_path)]))
    legacy = tmp_path / "legacy"
    (legacy / "data" / "arith").mkdir(parents=True)  # made before the flags: the defaults
    with pytest.raises(SystemExit, match="--stage1-student base"):
        check_study_settings(parse_args(["--out", str(legacy), "--stage1-student", "kd"]))
    assert check_study_settings(parse_args(["--out", str(legacy)])) == {
        "distractors": "other",
        "stage1_student": "base",
    }


@pytest.mark.slow
def test_study_smoke_runs_every_arm_writes_report_and_resumes(tmp_path):
    """Same-item distractors, stage 1 with the trained KD student, micro-batches of 2 (batch 4)."""
    from studies.leaf_vs_kd import main

    argv = ["--out", str(tmp_path), "--smoke", "--seeds", "0", "--distractors", "same-item"]
    argv += ["--stage1-student", "kd", "--micro-batch", "2"]
    report = main(argv)
    text = report.read_text()
    for name in ("teacher", "student_before", "kd_s0", "leaf_s0", "LeaF - KD"):
        assert f"| {name}" in text
    assert "Stage 1 with the trained KD arm kd_s0" in text and "distractor sentences `same-item`" in text
    test_rows = [json.loads(line) for line in open(tmp_path / "data" / "arith" / "test.jsonl")]
    assert any(distractor_numbers(r["prompt"]) for r in test_rows)
    assert "trainer.accumulate_grad_batches=2" in (tmp_path / "kd_s0" / "command.txt").read_text()
    counts = json.loads((tmp_path / "data" / "leaf_counts.json").read_text())
    assert counts["student"] == str(tmp_path.resolve() / "kd_s0" / "model")
    leaf_rows = [json.loads(line) for line in open(tmp_path / "data" / "leaf_train.jsonl")]
    kd_rows = [json.loads(line) for line in open(tmp_path / "data" / "kd_train.jsonl")]
    assert [r["prompt"] for r in leaf_rows if not r["counterfactual"]] == [r["prompt"] for r in kd_rows]
    first = {p.name: p.stat().st_mtime for p in (tmp_path / "eval").iterdir()}
    main(argv)  # resumes: nothing retrained or re-evaluated
    assert {p.name: p.stat().st_mtime for p in (tmp_path / "eval").iterdir()} == first
    with pytest.raises(SystemExit, match="--distractors same-item"):
        main(["--out", str(tmp_path), "--smoke", "--seeds", "0", "--stage1-student", "kd"])
