"""Short plain sentences for the synthetic corpus, in LRS3 style (uppercase letters and apostrophes).

Sources, first available wins: Bierce's Devil's Dictionary (Debian dict-devil, public domain, gzip),
BSD fortunes (Debian fortunes), then the built-in list `builtin_sentences.txt` shipped with the repo.
"""

import gzip
import re
from pathlib import Path

from data.text.public_domain_corpus import dictd_documents

DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")
GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")  # its index beside it: gcide.index
FORTUNES_DIR = Path("/usr/share/games/fortunes")
BUILTIN_SENTENCES = Path(__file__).with_name("builtin_sentences.txt")
MIN_SENTENCES_PER_SOURCE = 100

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_ABBREVIATION_DOT = re.compile(r"\b(Mr|Mrs|Dr|St|Mt|Jr|Sr|Rev|Gen|Col|Capt|Prof|vs|viz|etc)\.")
_HEADWORD = re.compile(r"^[A-Z][A-Z'\- ]*,\s*(?:[a-z]+\.\s*)+")  # "ABSTAINER, n.  "
_BRACKETS = re.compile(r"\[[^\]]*\]|\{[^}]*\}|\([^)]*\)")
_SEPARATORS = re.compile(r"--|[,\"`]|\s+")
_WORD = re.compile(r"^[A-Za-z]+(?:'[A-Za-z]+)?$")


def clean_sentence(text: str, min_words: int = 3, max_words: int = 10) -> str | None:
    """Uppercase plain sentence of min..max words of letters/apostrophes, or None if it has anything else."""
    text = _BRACKETS.sub(" ", text).strip().rstrip(".!?;:")
    words = [word.strip("'") for word in _SEPARATORS.split(text) if word.strip("'")]
    if not min_words <= len(words) <= max_words or not all(_WORD.match(word) for word in words):
        return None
    return " ".join(words).upper()


def _sentences_from_paragraphs(paragraphs: list[str], min_words: int, max_words: int) -> list[str]:
    cleaned = []
    for paragraph in paragraphs:
        paragraph = _ABBREVIATION_DOT.sub(r"\1", " ".join(paragraph.split()))
        for sentence in _SENTENCE_END.split(paragraph):
            sentence = clean_sentence(sentence, min_words, max_words)
            if sentence:
                cleaned.append(sentence)
    return list(dict.fromkeys(cleaned))  # unique, first-seen order


def devil_dictionary_sentences(min_words: int = 3, max_words: int = 10, path: Path = DEVIL_DICT) -> list[str]:
    """Prose sentences of the definitions (verse, which is indented, and headwords are dropped)."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as stream:
        lines = [line for line in stream.read().splitlines() if not line.startswith((" ", "\t", "00-"))]
    paragraphs = [_HEADWORD.sub("", block) for block in "\n".join(lines).split("\n\n")]
    return _sentences_from_paragraphs(paragraphs, min_words, max_words)


def fortune_sentences(min_words: int = 3, max_words: int = 10, directory: Path = FORTUNES_DIR) -> list[str]:
    """Sentences of the fortune cookies (records separated by lines holding only '%')."""
    paragraphs = []
    for path in sorted(directory.glob("*")):
        if path.is_file() and path.suffix not in (".dat", ".u8") and not path.is_symlink():
            paragraphs += path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
    return _sentences_from_paragraphs(paragraphs, min_words, max_words)


def gcide_sentences(min_words: int = 3, max_words: int = 10, path: Path = GCIDE_DICT) -> list[str]:
    """Sentences of the 1913 Webster (Debian dict-gcide, GPL-3): definitions and quotations, about 260,000
    of 3-12 words, so a training split can have far more distinct sentences than fortunes and the Devil's
    Dictionary give (about 17,600). Leftovers of pronunciation markup ("R CRIMINATION LL") are dropped."""
    index = path.with_name(path.name.removesuffix(".dict.dz") + ".index")
    paragraphs = [p for document in dictd_documents(path, index) for p in document.split("\n")]
    return [s for s in _sentences_from_paragraphs(paragraphs, min_words, max_words) if _speakable(s)]


def _speakable(sentence: str) -> bool:
    """Every word has a vowel and no word is a lone letter other than A or I."""
    words = sentence.split()
    return all(re.search(r"[AEIOUY]", w) and (len(w) > 1 or w in ("A", "I")) for w in words)


def builtin_sentences(min_words: int = 3, max_words: int = 10) -> list[str]:
    lines = BUILTIN_SENTENCES.read_text(encoding="utf-8").splitlines()
    sentences = (clean_sentence(line, min_words, max_words) for line in lines if not line.startswith("#"))
    return [sentence for sentence in sentences if sentence]


def load_sentences(min_words: int = 3, max_words: int = 10) -> tuple[list[str], str]:
    """(sentences, source name) from the first source giving at least MIN_SENTENCES_PER_SOURCE."""
    if DEVIL_DICT.exists():
        sentences = devil_dictionary_sentences(min_words, max_words)
        if len(sentences) >= MIN_SENTENCES_PER_SOURCE:
            return sentences, "devil"
    if FORTUNES_DIR.is_dir():
        sentences = fortune_sentences(min_words, max_words)
        if len(sentences) >= MIN_SENTENCES_PER_SOURCE:
            return sentences, "fortunes"
    return builtin_sentences(min_words, max_words), "builtin"


def text_source_name() -> str:
    """Which source `load_sentences` would use, without reading it all (for cache keys)."""
    if DEVIL_DICT.exists():
        return "devil"
    return "fortunes" if FORTUNES_DIR.is_dir() else "builtin"
