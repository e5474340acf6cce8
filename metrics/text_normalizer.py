"""The one text normaliser applied before every word error rate in this repo.

Steps: Unicode NFKC, lowercase, optional numbers-as-words, punctuation removed (an apostrophe inside a
word such as "don't" is kept; hyphens and all other punctuation become spaces), whitespace collapsed.
"""

import re
import unicodedata

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred"))
_NUMBER = re.compile(r"\d+")
_INNER_APOSTROPHE = re.compile(r"(?<=\w)['\u2019](?=\w)")
_WHITESPACE = re.compile(r"\s+")


def number_to_words(number: int) -> str:
    """Spell a non-negative integer in English words: 1984 -> "one thousand nine hundred eighty four"."""
    if number < 20:
        return _ONES[number]
    if number < 100:
        tens, ones = divmod(number, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    for scale, name in _SCALES:
        if number >= scale:
            head, rest = divmod(number, scale)
            words = f"{number_to_words(head)} {name}"
            return words if rest == 0 else f"{words} {number_to_words(rest)}"
    raise AssertionError("unreachable")


def _strip_punctuation(text: str) -> str:
    text = _INNER_APOSTROPHE.sub("\x00", text)  # protect word-internal apostrophes
    kept = [" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text]
    return "".join(kept).replace("\x00", "'")


def normalize_text(text: str, numbers_as_words: bool = False) -> str:
    """Normalise a transcript for scoring: "Hello, World -- it's 2 PM!" -> "hello world it's 2 pm"."""
    text = unicodedata.normalize("NFKC", text).lower()
    if numbers_as_words:
        text = _NUMBER.sub(lambda match: f" {number_to_words(int(match.group()))} ", text)
    text = _strip_punctuation(text)
    return _WHITESPACE.sub(" ", text).strip()
