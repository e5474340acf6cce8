"""A retrieval-flavoured SFT set built locally from public-domain / BSD text (for the MEAP study).

Three tasks, mixed, from Debian `fortunes` (BSD) and `dict-devil` (Bierce, public domain):
- `find_quote`: several quotes, then "Which quote contains the word W? Repeat it exactly." (W occurs in
  exactly one of them); the answer is that quote;
- `nth_quote`: numbered quotes, then "Repeat quote number N exactly."; the answer is quote N;
- `define`: "Define 'X' the way Ambrose Bierce's Devil's Dictionary does." -> its definition.
The answers must be read back from a context of a few hundred tokens, the skill a pass-key probe tests,
without ever showing a pass key. Train and validation rows draw on disjoint quotes and headwords, so the
validation perplexity is measured on text the arms never trained on. Seeded; written once (idempotent).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from data.text.demo_corpus import DEVIL_DICT, DEVIL_INDEX, devil_dictionary_entries

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# ASCII art and collections that are mostly jokes about groups of people are left out.
EXCLUDED_FORTUNES = {"art", "ascii-art", "ethnic", "men-women", "translate-me"}
DEFINE_TEMPLATE = "Define '{}' the way Ambrose Bierce's Devil's Dictionary does."
TASKS = ("find_quote", "nth_quote", "define")


def fortune_quotes(
    directory: str | Path = FORTUNES_DIR, min_words: int = 12, max_words: int = 70
) -> list[str]:
    """Single-paragraph fortunes of min..max words (whitespace collapsed), sorted, without duplicates."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory} does not exist: install the Debian package `fortunes` (or pass the folder of "
            "fortune files as `fortunes_dir`)"
        )
    quotes = set()
    for path in sorted(directory.glob("*.u8")):
        if path.stem in EXCLUDED_FORTUNES:
            continue
        for text in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = " ".join(text.replace("%", " ").split())
            words = text.split()
            letters = sum(c.isalpha() for c in text)
            if min_words <= len(words) <= max_words and letters >= 0.7 * len(text.replace(" ", "")):
                quotes.add(text)
    return sorted(quotes)


def _words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z]{6,}", text)}


def find_quote_row(rng: random.Random, pool: list[str], min_quotes: int, max_quotes: int) -> dict | None:
    quotes = rng.sample(pool, rng.randint(min_quotes, max_quotes))
    target = rng.randrange(len(quotes))
    others = set().union(*(_words(q) for i, q in enumerate(quotes) if i != target))
    unique = sorted(_words(quotes[target]) - others)
    if not unique:
        return None
    word = rng.choice(unique)
    context = "\n\n".join(quotes)
    prompt = (
        f'Here are some quotes.\n\n{context}\n\nWhich quote contains the word "{word}"? Repeat it exactly.'
    )
    return {"prompt": prompt, "response": quotes[target], "task": "find_quote"}


def nth_quote_row(rng: random.Random, pool: list[str], min_quotes: int, max_quotes: int) -> dict:
    quotes = rng.sample(pool, rng.randint(min_quotes, max_quotes))
    target = rng.randrange(len(quotes))
    context = "\n\n".join(f"Quote {i + 1}: {q}" for i, q in enumerate(quotes))
    prompt = f"{context}\n\nRepeat quote number {target + 1} exactly."
    return {"prompt": prompt, "response": quotes[target], "task": "nth_quote"}


def make_rows(
    count: int,
    quotes: list[str],
    definitions: list[tuple[str, str]],
    seed: int,
    min_quotes: int = 3,
    max_quotes: int = 10,
    define_fraction: float = 0.1,
) -> list[dict]:
    """`count` rows: `define_fraction` of definitions (each at most once), the rest quote tasks half/half."""
    rng = random.Random(seed)
    n_define = min(len(definitions), round(count * define_fraction))
    rows = [
        {"prompt": DEFINE_TEMPLATE.format(word), "response": answer, "task": "define"}
        for word, answer in rng.sample(definitions, n_define)
    ]
    while len(rows) < count:
        if rng.random() < 0.5:
            row = find_quote_row(rng, quotes, min_quotes, max_quotes)
        else:
            row = nth_quote_row(rng, quotes, min_quotes, max_quotes)
        if row is not None:
            rows.append(row)
    rng.shuffle(rows)
    return rows


def build_retrieval_sft(
    out_dir: str | Path,
    num_train: int = 12000,
    num_val: int = 300,
    seed: int = 0,
    val_share: float = 0.1,
    min_quotes: int = 3,
    max_quotes: int = 10,
    fortunes_dir: str | Path = FORTUNES_DIR,
) -> dict[str, str]:
    """Write train.jsonl / val.jsonl under out_dir once (idempotent); return their paths.

    Quotes and headwords are split `val_share` / rest before any row is made (split by source text).
    """
    out_dir = Path(out_dir)
    paths = {"train": str(out_dir / "train.jsonl"), "val": str(out_dir / "val.jsonl")}
    if all(Path(p).exists() for p in paths.values()):
        return paths
    quotes = fortune_quotes(fortunes_dir)
    definitions = (
        devil_dictionary_entries(max_words=120) if DEVIL_DICT.exists() and DEVIL_INDEX.exists() else []
    )
    rng = random.Random(seed)
    rng.shuffle(quotes)
    rng.shuffle(definitions)
    q_cut, d_cut = int(len(quotes) * val_share), int(len(definitions) * val_share)
    splits = {
        "val": make_rows(num_val, quotes[:q_cut], definitions[:d_cut], seed + 1, min_quotes, max_quotes),
        "train": make_rows(num_train, quotes[q_cut:], definitions[d_cut:], seed, min_quotes, max_quotes),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        tmp = Path(paths[split] + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(paths[split])
    return paths
