"""Multi-key retrieval probe: K labelled pass keys hidden in one haystack, the question asks for one.

A harder needle test than studies/eval_passkey.py (where the trained arms all score 100%). Each trial
hides K needles "The pass key of the red door is 48213. Remember it." with K distinct door colours and K
distinct 5-digit keys, each at its own uniform random depth of a Devil's Dictionary haystack. The
question asks for ONE door: "What is the pass key of the red door?", answered by continuing "The pass
key of the red door is" (chat: user turn + prefilled assistant turn; raw: plain text, same suffix). The
model must find the right needle among K-1 look-alikes; the first number it generates is scored as
- `correct`: the asked door's key (exact match);
- `confuser`: another door's key (it retrieved a needle, the wrong one);
- `other`: anything else (no number, an invented or truncated one).
Trials are built once from a seed and saved, like the single-key ones; lengths are raw prompt lengths in
tokens (at most the target).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from studies.eval_generate import greedy_generate
from studies.eval_passkey import FORMATS, choose_filler, extract_key, haystack_pieces, piece_costs

LABELS = (
    "red", "blue", "green", "yellow", "white", "black",
    "orange", "purple", "brown", "grey", "pink", "silver",
)  # fmt: skip
INTRO = (
    "There are several pass keys hidden inside a lot of irrelevant text, one for each door. "
    "Find them and memorize them. I will quiz you about one of them.\n\n"
)
NEEDLE = "The pass key of the {label} door is {key}. Remember it."
QUESTION = "What is the pass key of the {label} door?"
ANSWER_PREFIX = "The pass key of the {label} door is"
OUTCOMES = ("correct", "confuser", "other")


def build_multikey_trials(
    tokenizer,
    lengths: Sequence[int],
    trials_per_length: int,
    keys: int = 8,
    seed: int = 0,
    pieces: list[str] | None = None,
) -> list[dict]:
    """Trials {length, index, needles, asked, label, key, depth, context}.

    needles: K dicts {label, key, depth} in the order they appear in the context (depth 0 = start of the
    haystack, 1 = end); asked: the index in `needles` of the door the question names; label, key, depth:
    that needle's (key is the reference answer). context = INTRO + haystack, sized so the raw prompt fits
    in `length` tokens; raises ValueError when the K needles and the question alone do not fit."""
    if not 1 <= keys <= len(LABELS):
        raise ValueError(f"keys must be in 1..{len(LABELS)} (one door colour each), got {keys}")
    pieces = pieces if pieces is not None else haystack_pieces()
    costs = piece_costs(tokenizer, pieces)
    rng = random.Random(seed)
    trials = []
    for length in lengths:
        for index in range(trials_per_length):
            labels = rng.sample(LABELS, keys)
            codes = rng.sample(range(10000, 100000), keys)
            depths = [rng.random() for _ in range(keys)]
            needles = sorted(
                ({"label": lab, "key": str(c), "depth": d} for lab, c, d in zip(labels, codes, depths)),
                key=lambda n: n["depth"],
            )
            asked = rng.randrange(keys)
            label = needles[asked]["label"]
            bare = _raw_prompt(INTRO + hide_needles([], needles), label)
            budget = length - len(tokenizer(bare, add_special_tokens=False)["input_ids"]) - 2
            chosen = choose_filler(pieces, costs, budget, rng) if budget > 0 else []
            context = INTRO + hide_needles(chosen, needles)
            while chosen and _raw_length(tokenizer, context, label) > length:
                chosen.pop()  # the needles keep their relative depths
                context = INTRO + hide_needles(chosen, needles)
            if _raw_length(tokenizer, context, label) > length:
                raise ValueError(f"{keys} needles and the question need more than {length} tokens")
            trials.append(
                {
                    "length": length,
                    "index": index,
                    "needles": needles,
                    "asked": asked,
                    "label": label,
                    "key": needles[asked]["key"],
                    "depth": needles[asked]["depth"],
                    "context": context,
                }
            )
    return trials


def hide_needles(chosen: list[str], needles: list[dict]) -> str:
    """The haystack: filler pieces joined by spaces, each needle inserted before piece
    round(depth * len(chosen)); needles sorted by depth keep their order."""
    slots: list[list[str]] = [[] for _ in range(len(chosen) + 1)]
    for needle in needles:
        slots[round(needle["depth"] * len(chosen))].append(NEEDLE.format(**needle))
    parts = [part for at, piece in enumerate(chosen) for part in (*slots[at], piece)]
    return " ".join(parts + slots[-1])


def _raw_prompt(context: str, label: str) -> str:
    return f"{context}\n\n{QUESTION.format(label=label)} {ANSWER_PREFIX.format(label=label)}"


def _raw_length(tokenizer, context: str, label: str) -> int:
    return len(tokenizer(_raw_prompt(context, label), add_special_tokens=False)["input_ids"])


def multikey_prompt_ids(tokenizer, trial: dict, fmt: str) -> list[int]:
    """Token ids of one trial's prompt in `fmt` ("chat" or "raw"), ending right before the asked key."""
    label = trial["label"]
    if fmt == "raw":
        text = _raw_prompt(trial["context"], label)
    elif fmt == "chat":
        messages = [{"role": "user", "content": f"{trial['context']}\n\n{QUESTION.format(label=label)}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text += ANSWER_PREFIX.format(label=label)
    else:
        raise ValueError(f"multi-key format must be one of {FORMATS}, got {fmt!r}")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def score_answer(generated: str, trial: dict) -> tuple[str, int | None]:
    """(outcome, needle index answered): outcome in OUTCOMES; the index (into trial["needles"]) of the
    needle whose key is the first number generated, None when it is no needle's key."""
    answer = extract_key(generated)
    answered = next((i for i, n in enumerate(trial["needles"]) if n["key"] == answer), None)
    if answered is None:
        return "other", None
    return ("correct" if answered == trial["asked"] else "confuser"), answered


def evaluate_multikey(model, tokenizer, trials: list[dict], fmt: str, batch_size: int = 32) -> list[dict]:
    """Greedy-decode every trial; per-trial {length, index, key, label, asked, depth, output, outcome,
    answered, correct, confuser}: asked/depth say which needle was asked (its index in context order and
    its depth), answered which needle's key came back (None: none), confuser whether it was another's."""
    prompts = [multikey_prompt_ids(tokenizer, t, fmt) for t in trials]
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=batch_size)
    rows = []
    for t, out in zip(trials, outputs):
        outcome, answered = score_answer(out, t)
        rows.append(
            {
                "length": t["length"],
                "index": t["index"],
                "key": t["key"],
                "label": t["label"],
                "asked": t["asked"],
                "depth": t["depth"],
                "output": out,
                "outcome": outcome,
                "answered": answered,
                "correct": outcome == "correct",
                "confuser": outcome == "confuser",
            }
        )
    return rows
