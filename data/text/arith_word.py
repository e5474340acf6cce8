"""Generated multi-step arithmetic word problems with numeric answers (for the LeaF vs KD study).

    {"prompt": "Mia has 14 apples. Her neighbour owns 9 bicycles. Mia buys 3 bags with 4 apples in each.
                Then Mia gives 5 apples to Leo. How many apples does Mia have now?",
     "response": "Mia starts with 14 apples. 3 bags of 4 is 3 * 4 = 12, so 14 + 12 = 26. She gives away
                  5: 26 - 5 = 21. The answer is 21.",
     "answer": 21}

Each problem chains 2-4 operations (gain, lose, buy groups, share equally, double) on one quantity, with
0-2 distractor sentences holding irrelevant numbers: the tokens a student should learn to ignore, which
is what LeaF's counterfactual pruning targets. Two kinds of distractor (`distractors=`):
- "other" (the default; the data of study 4's first run): other things, "Leo owns 9 bicycles.", so a
  number read from the wrong sentence rarely fits the question;
- "same-item": the question's item held or moved by another person, "Leo has 9 apples.", "Leo buys 4 more
  apples.", so a student that reads the wrong sentence uses the wrong number (a real confounder).
`distractor_numbers(prompt)` gives the numbers of a prompt's distractor sentences (both kinds),
`distractor_only_numbers(prompt, response)` those the worked answer never uses. The worked
answer ends "The answer is N." Splits are by item: every prompt is unique and belongs to exactly one of
train / val / test. Seeded; written once.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

NAMES = [
    "Mia",
    "Leo",
    "Ava",
    "Noah",
    "Emma",
    "Liam",
    "Zoe",
    "Omar",
    "Ivy",
    "Sam",
    "Nina",
    "Raj",
    "Lena",
    "Tom",
]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards", "coins", "books"]
CONTAINERS = ["bags", "boxes", "packs", "jars", "baskets"]
DISTRACTORS = [
    "{other} owns {n} bicycles.",
    "The shop opens at {n} o'clock.",
    "{other} is {n} years old.",
    "It rained for {n} days last month.",
    "{other} has {n} cousins.",
    "The bus ride takes {n} minutes.",
]
SAME_ITEM_DISTRACTORS = [
    "{other} has {n} {item}.",
    "{other} buys {n} more {item}.",
    "{other} gives away {n} {item}.",
    "Then {other} finds {n} more {item}.",
    "{other} wants {n} {item}.",
    "{other} sells {n} {item}.",
]
# As many templates of each kind: a choice among them draws the same random bits, so one seed gives both
# kinds the same stories, distractor positions and numbers; only the distractor sentences differ.
DISTRACTOR_KINDS = {"other": DISTRACTORS, "same-item": SAME_ITEM_DISTRACTORS}
ANSWER = re.compile(r"The answer is (-?\d+)")
QUESTION = re.compile(r"How many (\w+) does (\w+) have now\?$")
NUMBER = re.compile(r"\d+")


def _gain(rng, name, item, total):
    n = rng.randint(2, 30)
    return (
        f"Then {name} finds {n} more {item}.",
        f"{name} finds {n} more: {total} + {n} = {total + n}.",
        total + n,
    )


def _lose(rng, name, item, total):
    if total < 3:
        return None
    n = rng.randint(1, min(total - 1, 25))
    other = rng.choice([x for x in NAMES if x != name])
    return (
        f"Then {name} gives {n} {item} to {other}.",
        f"{name} gives away {n}: {total} - {n} = {total - n}.",
        total - n,
    )


def _groups(rng, name, item, total):
    k, m = rng.randint(2, 6), rng.randint(2, 9)
    box = rng.choice(CONTAINERS)
    return (
        f"Then {name} buys {k} {box} with {m} {item} in each.",
        f"{k} {box} of {m} is {k} * {m} = {k * m}, so {total} + {k * m} = {total + k * m}.",
        total + k * m,
    )


def _share(rng, name, item, total):
    divisors = [d for d in range(2, 6) if total % d == 0 and total // d >= 1]
    if not divisors or total > 120:
        return None
    d = rng.choice(divisors)
    return (
        f"Then {name} splits the {item} equally into {d} piles and keeps one pile.",
        f"{name} keeps one of {d} equal piles: {total} / {d} = {total // d}.",
        total // d,
    )


def _double(rng, name, item, total):
    if total > 60:
        return None
    return (
        f"Then the number of {item} {name} has doubles.",
        f"The {item} double: {total} * 2 = {total * 2}.",
        total * 2,
    )


OPERATIONS = (_gain, _lose, _groups, _share, _double)


def make_problem(rng: random.Random, distractors: str = "other") -> dict:
    """One problem: {"prompt", "response", "answer"}; distractor sentences of kind `distractors`.

    Both kinds draw the same random numbers in the same order (DISTRACTOR_KINDS), so "other" gives the
    rows it gave before "same-item" existed, and "same-item" the same problems with other distractors.
    """
    templates = _distractor_templates(distractors)
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    total = rng.randint(5, 40)
    story = [f"{name} has {total} {item}."]
    steps = [f"{name} starts with {total} {item}."]
    count = rng.randint(2, 4)
    while len(steps) <= count:
        op = rng.choice(OPERATIONS)(rng, name, item, total)
        if op is None:
            continue
        sentence, work, total = op
        story.append(sentence)
        steps.append(work)
    for _ in range(rng.randint(0, 2)):
        other = rng.choice([x for x in NAMES if x != name])
        distractor = rng.choice(templates).format(other=other, n=rng.randint(2, 40), item=item)
        story.insert(rng.randint(1, len(story)), distractor)
    prompt = " ".join(story) + f" How many {item} does {name} have now?"
    response = " ".join(steps) + f" The answer is {total}."
    return {"prompt": prompt, "response": response, "answer": total}


def _distractor_templates(kind: str) -> list[str]:
    if kind not in DISTRACTOR_KINDS:
        raise ValueError(f"distractors={kind!r}: choose one of {sorted(DISTRACTOR_KINDS)}")
    return DISTRACTOR_KINDS[kind]


def _template_pattern(template: str) -> re.Pattern:
    """A template as a regex: {other} -> (?P<other>name), {n} -> a number, {item} -> an item word."""
    pattern = re.escape(template)
    for field, regex in (
        ("other", r"(?P<other>\w+)"),
        ("n", r"(?P<n>\d+)"),
        ("item", "(?:" + "|".join(ITEMS) + ")"),
    ):
        pattern = pattern.replace(re.escape("{" + field + "}"), regex)
    return re.compile(pattern)


DISTRACTOR_PATTERNS = [_template_pattern(t) for t in DISTRACTORS + SAME_ITEM_DISTRACTORS]


def split_sentences(prompt: str) -> list[str]:
    """The prompt's sentences (each ends with "." or "?"); the generator joins them with one space."""
    return [sentence.strip() for sentence in re.findall(r"[^.?]+[.?]", prompt)]


def distractor_sentences(prompt: str) -> list[str]:
    """The sentences of a generated prompt that are distractors (of either kind).

    A same-item template also matches the story's own first sentence ("Mia has 14 apples."), so a match
    counts only when its person is not the one the question asks about.
    """
    question = QUESTION.search(prompt)
    subject = question.group(2) if question else None
    found = []
    for sentence in split_sentences(prompt):
        for pattern in DISTRACTOR_PATTERNS:
            match = pattern.fullmatch(sentence)
            if match and match.groupdict().get("other") != subject:
                found.append(sentence)
                break
    return found


def distractor_numbers(prompt: str) -> set[int]:
    """The numbers that occur in the distractor sentences of a generated prompt (either kind)."""
    return {int(n) for s in distractor_sentences(prompt) for n in NUMBER.findall(s)}


def distractor_only_numbers(prompt: str, response: str) -> set[int]:
    """Numbers of the distractor sentences that the reference worked answer never uses: an output that
    contains one took it from a distractor."""
    return distractor_numbers(prompt) - {int(n) for n in NUMBER.findall(response)}


def parse_answer(text: str) -> int | None:
    """The number after the first "The answer is", or None."""
    match = ANSWER.search(text)
    return int(match.group(1)) if match else None


def build_arith_word(
    out_dir: str | Path,
    num_train: int = 20000,
    num_val: int = 200,
    num_test: int = 600,
    seed: int = 0,
    distractors: str = "other",
) -> dict[str, str]:
    """Write train/val/test.jsonl under out_dir once (idempotent), unique prompts, disjoint splits.

    distractors: "other" (unrelated things) or "same-item" (the question's item, another person); see the
    module docstring. Existing files are returned as they are: give each kind its own out_dir.
    """
    _distractor_templates(distractors)
    out_dir = Path(out_dir)
    paths = {split: str(out_dir / f"{split}.jsonl") for split in ("train", "val", "test")}
    if all(Path(p).exists() for p in paths.values()):
        return paths
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    total = num_train + num_val + num_test
    attempts = 0
    while len(rows) < total:
        attempts += 1
        if attempts > 50 * total:
            raise RuntimeError(f"could not generate {total} distinct problems; ask for fewer")
        row = make_problem(rng, distractors)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    splits = {
        "test": rows[:num_test],
        "val": rows[num_test : num_test + num_val],
        "train": rows[num_test + num_val :],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, part in splits.items():
        tmp = Path(paths[split] + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        tmp.replace(paths[split])
    return paths
