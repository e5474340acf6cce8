"""The embedded default's text: real public-domain definitions, built locally with no download.

Bierce's Devil's Dictionary (Debian `dict-devil`, public domain) becomes an instruction dataset:
"Define X the way Ambrose Bierce's Devil's Dictionary does." -> its definition. Without the package the
builder writes a small generated arithmetic-and-facts dataset instead, so the demo always runs.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
from pathlib import Path

log = logging.getLogger(__name__)

DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")
DEVIL_INDEX = Path("/usr/share/dictd/devil.index")
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _decode_b64_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


def devil_dictionary_entries(max_words: int = 80) -> list[tuple[str, str]]:
    """(headword, first sentences of the definition) pairs from the dictd files."""
    data = gzip.open(DEVIL_DICT).read()
    entries = []
    for line in DEVIL_INDEX.read_text(encoding="utf-8").splitlines():
        word, offset, size = line.split("\t")
        if word.startswith("00"):
            continue
        start = _decode_b64_number(offset)
        text = data[start : start + _decode_b64_number(size)].decode("utf-8", "replace")
        match = re.match(r"^([A-Z][A-Z' -]*),\s*\w+\.\s+(.*)", text, flags=re.S)
        if not match:
            continue
        body = " ".join(match.group(2).split())
        sentences = re.split(r"(?<=[.!?])\s+", body)
        definition = " ".join(sentences[:2])
        if 4 <= len(definition.split()) <= max_words and "_" not in definition:
            entries.append((match.group(1).strip().title(), definition))
    return entries


def generated_entries(count: int = 400, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        rows.append((f"{a} plus {b}", f"{a} plus {b} is {a + b}."))
    return rows


def build_demo_sft(out_dir: str | Path, val_size: int = 48, seed: int = 0) -> dict[str, str]:
    """Write train.jsonl/val.jsonl under out_dir once (idempotent); return their paths."""
    out_dir = Path(out_dir)
    paths = {"train": str(out_dir / "train.jsonl"), "val": str(out_dir / "val.jsonl")}
    if all(Path(p).exists() for p in paths.values()):
        return paths
    if DEVIL_DICT.exists() and DEVIL_INDEX.exists():
        entries, source = devil_dictionary_entries(), "devil"
        template = "Define '{}' the way Ambrose Bierce's Devil's Dictionary does."
    else:
        entries, source = generated_entries(seed=seed), "generated"
        template = "What is {}?"
    random.Random(seed).shuffle(entries)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"val": entries[:val_size], "train": entries[val_size:]}
    for split, rows in splits.items():
        with open(paths[split], "w", encoding="utf-8") as handle:
            for word, answer in rows:
                handle.write(json.dumps({"prompt": template.format(word), "response": answer}) + "\n")
    log.info(
        "demo corpus (%s): %d train, %d val rows in %s",
        source,
        len(splits["train"]),
        len(splits["val"]),
        out_dir,
    )
    return paths


def build_demo_text(out_file: str | Path) -> str:
    """A plain-text corpus (definitions joined) for language-model training."""
    out_file = Path(out_file)
    if not out_file.exists():
        entries = devil_dictionary_entries() if DEVIL_DICT.exists() else generated_entries()
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text("\n\n".join(f"{w}: {d}" for w, d in entries), encoding="utf-8")
    return str(out_file)
