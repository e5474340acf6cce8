"""Short plain sentences for the synthetic corpus, in LRS3 style (uppercase letters and apostrophes).

Sources: Bierce's Devil's Dictionary (Debian dict-devil, public domain, gzip) and BSD fortunes (Debian
fortunes), pooled when present (about 650 + 14,000 sentences of 3-10 words); else the built-in list
`builtin_sentences.txt` shipped with the repo (81 sentences: enough for tests and the CPU demo's format, far
too few for a model that must read unseen sentences). The Debian paths are looked up under a text root:
`$UNSINK_DEB_ROOT`, else / where the packages are installed, else /tmp/debroot where studies/gpu_env.sh
unpacks carried .debs.
"""

import gzip
import os
import re
from pathlib import Path

from data.text.public_domain_corpus import dictd_documents

DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")
GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")  # its index beside it: gcide.index
FORTUNES_DIR = Path("/usr/share/games/fortunes")
BUILTIN_SENTENCES = Path(__file__).with_name("builtin_sentences.txt")
MIN_SENTENCES_PER_SOURCE = 100
UNPACKED_DEB_ROOT = Path("/tmp/debroot")  # studies/gpu_env.sh unpacks carried .debs here

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


def default_text_root() -> Path:
    """$UNSINK_DEB_ROOT if set; else / when a Debian text package is installed; else /tmp/debroot when one
    is unpacked there; else /."""
    if "UNSINK_DEB_ROOT" in os.environ:
        return Path(os.environ["UNSINK_DEB_ROOT"])
    installed = DEVIL_DICT.exists() or FORTUNES_DIR.is_dir()
    unpacked = any(under_root(UNPACKED_DEB_ROOT, path).exists() for path in (DEVIL_DICT, FORTUNES_DIR))
    return UNPACKED_DEB_ROOT if unpacked and not installed else Path("/")


def under_root(text_root: str | Path, system_path: Path) -> Path:
    """`system_path` (absolute, e.g. /usr/share/dictd/devil.dict.dz) inside `text_root`."""
    return Path(text_root) / system_path.relative_to("/")


def _present_sources(text_root: Path) -> list[tuple[str, Path]]:
    """(name, path under `text_root`) of the Debian text sources found there, Devil's Dictionary first."""
    found = []
    for name, system_path, present in (
        ("devil", DEVIL_DICT, Path.exists),
        ("fortunes", FORTUNES_DIR, Path.is_dir),
    ):
        path = under_root(text_root, system_path)
        if present(path):
            found.append((name, path))
    return found


def load_sentences(
    min_words: int = 3, max_words: int = 10, text_root: str | Path | None = None
) -> tuple[list[str], str]:
    """(unique sentences, source name): the Devil's Dictionary and fortunes pooled, as far as present under
    `text_root` (default `default_text_root()`), or the built-in list when they give fewer than
    MIN_SENTENCES_PER_SOURCE. The name joins the sources used ("devil+fortunes") or is "builtin"."""
    root = default_text_root() if text_root is None else Path(text_root)
    readers = {"devil": devil_dictionary_sentences, "fortunes": fortune_sentences}
    pooled, names = [], []
    for name, path in _present_sources(root):
        pooled += readers[name](min_words, max_words, path)
        names.append(name)
    pooled = list(dict.fromkeys(pooled))
    if len(pooled) >= MIN_SENTENCES_PER_SOURCE:
        return pooled, "+".join(names)
    return builtin_sentences(min_words, max_words), "builtin"


def text_source_name(text_root: str | Path | None = None) -> str:
    """Which sources `load_sentences` would use, without reading them (for cache keys)."""
    root = default_text_root() if text_root is None else Path(text_root)
    return "+".join(name for name, _ in _present_sources(root)) or "builtin"
