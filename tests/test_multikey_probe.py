"""Study 3's multi-key probe (studies/eval_multikey.py): its trials, its scoring, its report block."""

from __future__ import annotations

import re

import pytest

from studies.eval_multikey import (
    ANSWER_PREFIX,
    INTRO,
    NEEDLE,
    QUESTION,
    build_multikey_trials,
    evaluate_multikey,
    multikey_prompt_ids,
    score_answer,
)
from studies.meap_passkey import check_trials, eval_path, parse_args, probe_section

PIECES = [f"Filler sentence number {i} about grass and stones." for i in range(300)]


def test_multikey_trials_hide_k_distinct_needles_and_ask_one(tiny_lm):
    _, tokenizer = tiny_lm
    trials = build_multikey_trials(tokenizer, [256, 512], 12, keys=5, seed=3, pieces=PIECES)
    assert trials == build_multikey_trials(tokenizer, [256, 512], 12, keys=5, seed=3, pieces=PIECES)
    assert trials != build_multikey_trials(tokenizer, [256, 512], 12, keys=5, seed=4, pieces=PIECES)
    assert [t["length"] for t in trials] == [256] * 12 + [512] * 12
    for t in trials:
        needles = t["needles"]
        assert len({n["label"] for n in needles}) == len({n["key"] for n in needles}) == 5
        assert all(re.fullmatch(r"\d{5}", n["key"]) for n in needles)
        places = [t["context"].index(NEEDLE.format(**n)) for n in needles]
        assert places == sorted(places), "needles appear in the order of their depths"
        assert t["context"].startswith(INTRO) and t["context"].count("The pass key of the") == 5
        asked = needles[t["asked"]]
        assert (t["key"], t["label"], t["depth"]) == (asked["key"], asked["label"], asked["depth"])
        assert t["length"] - 24 <= len(multikey_prompt_ids(tokenizer, t, "raw")) <= t["length"]
        suffix = f"{QUESTION.format(label=t['label'])} {ANSWER_PREFIX.format(label=t['label'])}"
        assert tokenizer.decode(multikey_prompt_ids(tokenizer, t, "raw")).endswith(suffix)
        chat = tokenizer.decode(multikey_prompt_ids(tokenizer, t, "chat"))
        assert chat.endswith(
            f"{QUESTION.format(label=t['label'])}<|im_end|>\n<|im_start|>assistant\n"
            + ANSWER_PREFIX.format(label=t["label"])
        )
    assert len({t["asked"] for t in trials}) >= 4  # the asked needle varies, so does its depth
    depths = [t["depth"] for t in trials]
    assert min(depths) < 0.3 and max(depths) > 0.7


def test_multikey_trials_refuse_what_cannot_fit(tiny_lm):
    _, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="need more than 64 tokens"):
        build_multikey_trials(tokenizer, [64], 1, keys=3, pieces=PIECES)
    with pytest.raises(ValueError, match="keys must be in 1..12"):
        build_multikey_trials(tokenizer, [512], 1, keys=13, pieces=PIECES)


def test_score_answer_tells_correct_confuser_and_other():
    trial = {"asked": 1, "needles": [{"key": "11111"}, {"key": "22222"}, {"key": "33333"}]}
    assert score_answer(" 22222. Remember it.", trial) == ("correct", 1)
    assert score_answer(" 33333.", trial) == ("confuser", 2)
    assert score_answer(" 11111", trial) == ("confuser", 0)
    assert score_answer(" 222221", trial) == ("other", None)  # a longer number is no needle's key
    assert score_answer(" 44444", trial) == ("other", None)
    assert score_answer(" unknown", trial) == ("other", None)


def test_evaluate_multikey_records_the_asked_needle_and_confusers(tiny_lm, monkeypatch):
    model, tokenizer = tiny_lm
    trials = build_multikey_trials(tokenizer, [160], 3, keys=3, seed=0, pieces=PIECES)
    other = [n["key"] for n in trials[1]["needles"] if n["key"] != trials[1]["key"]][0]
    outputs = [f" {trials[0]['key']}.", f" {other}.", " 12"]
    monkeypatch.setattr("studies.eval_multikey.greedy_generate", lambda *a, **k: outputs)
    rows = evaluate_multikey(model, tokenizer, trials, "chat")
    assert [r["outcome"] for r in rows] == ["correct", "confuser", "other"]
    assert [r["correct"] for r in rows] == [True, False, False]
    assert [r["confuser"] for r in rows] == [False, True, False]
    assert rows[1]["answered"] == [n["key"] for n in trials[1]["needles"]].index(other)
    assert [(r["asked"], r["depth"]) for r in rows] == [(t["asked"], t["depth"]) for t in trials]


def test_probe_flags_and_cache_names(tmp_path, capsys):
    args = parse_args(["--out", str(tmp_path)])
    assert args.probes == ["passkey", "multikey"] and args.keys == 8
    assert args.lengths == [256, 1024, 2048] and args.multikey_lengths == [256, 1024, 2048, 4096]
    smoke = parse_args(["--out", str(tmp_path), "--smoke", "--probes", "multikey", "--keys", "4"])
    assert smoke.probes == ["multikey"] and smoke.keys == 4 and smoke.multikey_lengths == [128, 256]
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--probes", "passkey,needle"])
    assert "['needle'] not among" in capsys.readouterr().err
    assert eval_path(tmp_path, "passkey", "sft_s0", "chat") == tmp_path / "eval" / "sft_s0_chat.jsonl"
    assert eval_path(tmp_path, "multikey", "sft_s0", "raw") == tmp_path / "eval" / "sft_s0_multikey_raw.jsonl"
    saved = [{"length": n, "needles": [{}] * 8} for n in (256, 1024, 2048, 4096)]
    check_trials(args, "multikey", saved)  # what the defaults build
    with pytest.raises(ValueError, match=r"holds lengths \[256, 1024, 2048, 4096\] with \[8\] keys"):
        check_trials(parse_args(["--out", str(tmp_path), "--keys", "6"]), "multikey", saved)
    with pytest.raises(ValueError, match="delete it"):
        check_trials(args, "multikey", saved[:3])  # no 4096-token trials


def test_multikey_report_block_counts_confusers_and_states_the_goal(tmp_path):
    args = parse_args(["--out", str(tmp_path), "--multikey-lengths", "1024"])

    def rows(outcomes):
        return [
            {"length": 1024, "index": i, "correct": o == "correct", "confuser": o == "confuser"}
            for i, o in enumerate(outcomes)
        ]

    outcomes = {
        "base": ["other", "other", "confuser", "correct"],
        "sft_s0": ["correct", "confuser", "confuser", "other"],
        "meap_s0": ["correct", "correct", "confuser", "other"],
    }
    results = {model: {fmt: rows(o) for fmt in ("chat", "raw")} for model, o in outcomes.items()}
    text = "\n".join(probe_section(args, "multikey", results))
    assert "## Multi-key (8 needles) accuracy, chat format (primary)" in text
    assert "| sft_s0 | 2/4 (50.0%) |" in text and "| meap_s0 | 1/4 (25.0%) |" in text
    assert "| MEAP - SFT, seed 0 (points, paired) | +25.0 [" in text
    assert "Goal, multikey probe (>= +5 points at 1024 tokens, chat format): met (MEAP - SFT = +25.0" in text
    assert (tmp_path / "multikey.png").exists()
