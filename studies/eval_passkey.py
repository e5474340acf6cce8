"""Pass-key retrieval probe: a 5-digit key hidden at a random depth of a Devil's Dictionary haystack.

A trial is `intro + haystack-with-key` followed by the question; the model must continue
"The pass key is" with the key (exact match of the first number it generates). Two formats:
- `chat` (primary): the user turn holds the haystack and "What is the pass key?", the assistant turn is
  prefilled with "The pass key is" (the SFT arms are trained in this template);
- `raw`: plain text ending "What is the pass key? The pass key is" (no template).
Trials are built once from a seed and saved (text, key, depth), so every model sees the same trials,
and the GPU machine needs no Debian text. Lengths are prompt lengths in tokens (raw format, at most the
target; the chat template adds its few header tokens).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

from studies.eval_generate import greedy_generate

INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n\n"
)
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
FORMATS = ("chat", "raw")


def haystack_pieces(smoke: bool = False) -> list[str]:
    """Filler sentences: Devil's Dictionary entries ("Word: definition"), or generated ones in smoke mode
    when the Debian package is absent."""
    from data.text.demo_corpus import DEVIL_DICT, devil_dictionary_entries

    if DEVIL_DICT.exists():
        return [f"{word}: {text}" for word, text in devil_dictionary_entries(max_words=120)]
    if not smoke:
        raise FileNotFoundError(
            f"{DEVIL_DICT} does not exist: install the Debian package `dict-devil` to build the haystacks "
            "(or build the trials on a machine that has it and carry the study folder)"
        )
    rng = random.Random(0)
    words = ["grass", "river", "cloud", "stone", "bird", "field", "night", "wind", "tree", "road"]
    return [" ".join(rng.choice(words) for _ in range(8)).capitalize() + "." for _ in range(200)]


def build_trials(
    tokenizer, lengths: Sequence[int], trials_per_length: int, seed: int = 0, pieces: list[str] | None = None
) -> list[dict]:
    """Trials {length, index, key, depth, context}: context = intro + haystack with the needle inserted
    between filler pieces at `depth` (0 = start, 1 = end), sized so the raw prompt fits in `length` tokens."""
    pieces = pieces if pieces is not None else haystack_pieces()
    costs = piece_costs(tokenizer, pieces)
    rng = random.Random(seed)
    trials = []
    for length in lengths:
        for index in range(trials_per_length):
            key = rng.randint(10000, 99999)
            depth = rng.random()
            needle = NEEDLE.format(key=key)
            fixed = _raw_prompt(INTRO, "")
            budget = length - len(tokenizer(fixed + " " + needle, add_special_tokens=False)["input_ids"]) - 2
            chosen = choose_filler(pieces, costs, budget, rng)
            at = round(depth * len(chosen))
            haystack = " ".join(chosen[:at] + [needle] + chosen[at:])
            while len(chosen) > 1 and _raw_length(tokenizer, INTRO + haystack) > length:
                if at < len(chosen):  # trim a piece after the needle, else one before it
                    chosen.pop()
                else:
                    chosen.pop(0)
                    at -= 1
                haystack = " ".join(chosen[:at] + [needle] + chosen[at:])
            trials.append(
                {
                    "length": length,
                    "index": index,
                    "key": str(key),
                    "depth": depth,
                    "context": INTRO + haystack,
                }
            )
    return trials


def piece_costs(tokenizer, pieces: list[str]) -> list[int]:
    """Tokens each filler piece adds to a haystack (joined with spaces, so each counted with one)."""
    return [len(tokenizer(" " + p, add_special_tokens=False)["input_ids"]) for p in pieces]


def choose_filler(pieces: list[str], costs: list[int], budget: int, rng: random.Random) -> list[str]:
    """Filler pieces in a random order (one `rng.shuffle`) whose costs sum to at most `budget` tokens,
    stopping once fewer than 8 tokens are left."""
    order = list(range(len(pieces)))
    rng.shuffle(order)
    chosen, used = [], 0
    for i in order:
        if used + costs[i] > budget:
            continue
        chosen.append(pieces[i])
        used += costs[i]
        if budget - used < 8:
            break
    return chosen


def _raw_length(tokenizer, context: str) -> int:
    return len(tokenizer(_raw_prompt(context), add_special_tokens=False)["input_ids"])


def _raw_prompt(context: str, suffix: str = f" {ANSWER_PREFIX}") -> str:
    return f"{context}\n\n{QUESTION}{suffix}"


def prompt_ids(tokenizer, trial: dict, fmt: str) -> list[int]:
    """Token ids of one trial's prompt in `fmt` ("chat" or "raw"), ending right before the key."""
    if fmt == "raw":
        text = _raw_prompt(trial["context"])
    elif fmt == "chat":
        messages = [{"role": "user", "content": f"{trial['context']}\n\n{QUESTION}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text += ANSWER_PREFIX
    else:
        raise ValueError(f"pass-key format must be one of {FORMATS}, got {fmt!r}")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def extract_key(generated: str) -> str | None:
    """The first number in the continuation (digits only), or None."""
    match = re.search(r"\d+", generated)
    return match.group(0) if match else None


def evaluate_passkey(model, tokenizer, trials: list[dict], fmt: str, batch_size: int = 32) -> list[dict]:
    """Greedy-decode every trial; returns per-trial {length, index, key, output, correct}."""
    prompts = [prompt_ids(tokenizer, t, fmt) for t in trials]
    outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=batch_size)
    return [
        {
            "length": t["length"],
            "index": t["index"],
            "key": t["key"],
            "output": out,
            "correct": extract_key(out) == t["key"],
        }
        for t, out in zip(trials, outputs)
    ]


def save_jsonl(rows: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def load_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
