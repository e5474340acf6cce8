"""A plain-text corpus of several million words from local Debian text packages, split by document.

Sources (each optional; whatever is installed is used, see scripts/setup.sh):
- `fortunes` (BSD): one fortune = one document (`/usr/share/games/fortunes/*`, ASCII-art files left out);
- `dict-devil` (public domain): one Devil's Dictionary entry = one document;
- `dict-gcide` (GPL-3, 1913 Webster): one dictionary entry = one document, editorial markup removed.
Without any of them, a generated arithmetic-and-facts text is written so that training still runs.

Every document goes to exactly one split, chosen by a hash of its text (stable across machines and
runs), so validation and test text never occur in training. The files are plain text for
`data.text.datasets.TextCorpusDataset` (documents separated by a blank line).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path

from data.text.demo_corpus import DEVIL_DICT, DEVIL_INDEX, _decode_b64_number

log = logging.getLogger(__name__)

FORTUNES_DIR = Path("/usr/share/games/fortunes")
GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")
GCIDE_INDEX = Path("/usr/share/dictd/gcide.index")
SKIPPED_FORTUNES = {"art", "ascii-art"}  # pictures, not prose
SPLITS = ("train", "val", "test")


def fortune_documents(root: Path = FORTUNES_DIR) -> Iterator[str]:
    """Each fortune of every (non-offensive, non-ASCII-art) file, whitespace-normalised per line."""
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if path.suffix or path.name in SKIPPED_FORTUNES or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for chunk in re.split(r"^%\s*$", text, flags=re.M):
            lines = [" ".join(line.split()) for line in chunk.strip().splitlines()]
            document = "\n".join(line for line in lines if line)
            if len(document.split()) >= 4:
                yield document


def dictd_documents(dict_path: Path, index_path: Path) -> Iterator[str]:
    """Each entry of a dictd dictionary (gzip-readable .dict.dz + .index), markup removed."""
    if not (dict_path.exists() and index_path.exists()):
        return
    data = gzip.open(dict_path).read()
    for line in index_path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00"):
            continue
        start, size = _decode_b64_number(parts[1]), _decode_b64_number(parts[2])
        document = clean_dictionary_entry(data[start : start + size].decode("utf-8", "replace"))
        if len(document.split()) >= 6:
            yield document


def clean_dictionary_entry(text: str) -> str:
    """Drop source tags ([1913 Webster], [PJC]), pronunciation \\...\\ and link braces; one line a paragraph."""
    text = re.sub(
        r"\[(?:1913 Webster|PJC|WordNet 1\.5|Century Dict\.|Webster 1913 Suppl\.)[^\]]*\]", "", text
    )
    text = re.sub(r"\\[^\\\n]*\\", "", text)
    text = text.replace("{", "").replace("}", "")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n".join(p for p in paragraphs if p)


def generated_documents(count: int = 20000, seed: int = 0) -> Iterator[str]:
    """Fallback without any text package: short arithmetic statements."""
    rng = random.Random(seed)
    for _ in range(count):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        yield f"The sum of {a} and {b} is {a + b}. The product of {a} and {b} is {a * b}."


def split_of(document: str, val_percent: float, test_percent: float) -> str:
    """'train', 'val' or 'test' from a hash of the document text (stable across machines)."""
    bucket = int.from_bytes(hashlib.sha1(document.encode("utf-8")).digest()[:4], "big") % 10000 / 100.0
    if bucket < val_percent:
        return "val"
    if bucket < val_percent + test_percent:
        return "test"
    return "train"


def build_public_domain_text(
    out_dir: str | Path,
    max_words: int = 4_000_000,
    val_percent: float = 1.0,
    test_percent: float = 1.0,
    max_eval_words: int = 60_000,
    sources: tuple[str, ...] = ("fortunes", "devil", "gcide"),
) -> dict[str, str]:
    """Write train.txt/val.txt/test.txt (and stats.json) under out_dir once (idempotent); return the paths.

    Args:
        max_words: stop adding documents once the corpus holds this many words (sources in order).
        val_percent, test_percent: share of documents (by hash) held out for validation / test.
        max_eval_words: cap on the words of each held-out split (evaluation stays quick).
    """
    out_dir = Path(out_dir)
    paths = {split: str(out_dir / f"{split}.txt") for split in SPLITS}
    if all(Path(p).exists() for p in paths.values()):
        return paths
    readers = {
        "fortunes": fortune_documents,
        "devil": lambda: dictd_documents(DEVIL_DICT, DEVIL_INDEX),
        "gcide": lambda: dictd_documents(GCIDE_DICT, GCIDE_INDEX),
    }
    unknown = sorted(set(sources) - set(readers))
    if unknown:
        raise ValueError(
            f"unknown corpus sources {unknown} (config key `data.prepare.sources`; known: {sorted(readers)})"
        )
    documents = {split: [] for split in SPLITS}
    words = {split: 0 for split in SPLITS}
    per_source: dict[str, int] = {}
    seen: set[str] = set()
    for source in sources:
        for document in readers[source]():
            if sum(words.values()) >= max_words:
                break
            if document in seen:
                continue
            seen.add(document)
            split = split_of(document, val_percent, test_percent)
            count = len(document.split())
            if split != "train" and words[split] >= max_eval_words:
                continue
            documents[split].append(document)
            words[split] += count
            per_source[source] = per_source.get(source, 0) + 1
    if not documents["train"] or not documents["val"] or not documents["test"]:
        log.warning("no (or too little) local text found: writing a generated corpus instead")
        documents = {split: [] for split in SPLITS}
        for document in generated_documents():
            documents[split_of(document, 5.0, 5.0)].append(document)
        per_source = {"generated": sum(len(d) for d in documents.values())}
        words = {split: sum(len(d.split()) for d in docs) for split, docs in documents.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        Path(paths[split]).write_text("\n\n".join(documents[split]) + "\n", encoding="utf-8")
    stats = {
        "documents": {split: len(docs) for split, docs in documents.items()},
        "words": words,
        "sources": per_source,
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("public-domain text corpus in %s: %s", out_dir, stats)
    return paths
