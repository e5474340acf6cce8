"""Corpus-level word error rate: summed word edit distances over summed reference words.

Every transcript passes through `metrics.text_normalizer.normalize_text` first. `CorpusWER` keeps only
sums (errors, substitutions, insertions, deletions, reference words) as states reduced with "sum", so
the value is exact across DDP ranks; averaging per-utterance or per-rank WERs would not be.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchmetrics import Metric

from metrics.text_normalizer import normalize_text


@dataclass(frozen=True)
class EditCounts:
    """Word-level edit operations of one minimal alignment of a hypothesis against a reference."""

    substitutions: int = 0
    insertions: int = 0
    deletions: int = 0
    reference_words: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.insertions + self.deletions

    def __add__(self, other: "EditCounts") -> "EditCounts":
        return EditCounts(
            self.substitutions + other.substitutions,
            self.insertions + other.insertions,
            self.deletions + other.deletions,
            self.reference_words + other.reference_words,
        )


def align_words(reference: Sequence[str], hypothesis: Sequence[str]) -> EditCounts:
    """Levenshtein alignment of two word sequences, counting each operation by backtrace.

    Among alignments of minimal total cost the backtrace prefers match/substitution, then deletion,
    then insertion, so the total is always the edit distance and the split is deterministic.
    """
    rows, cols = len(reference) + 1, len(hypothesis) + 1
    cost = [[0] * cols for _ in range(rows)]
    for i in range(rows):
        cost[i][0] = i
    for j in range(cols):
        cost[0][j] = j
    for i in range(1, rows):
        for j in range(1, cols):
            mismatch = reference[i - 1] != hypothesis[j - 1]
            cost[i][j] = min(cost[i - 1][j - 1] + mismatch, cost[i - 1][j] + 1, cost[i][j - 1] + 1)
    substitutions = insertions = deletions = 0
    i, j = rows - 1, cols - 1
    while i > 0 or j > 0:
        if i > 0 and j > 0 and cost[i][j] == cost[i - 1][j - 1] + (reference[i - 1] != hypothesis[j - 1]):
            substitutions += reference[i - 1] != hypothesis[j - 1]
            i, j = i - 1, j - 1
        elif i > 0 and cost[i][j] == cost[i - 1][j] + 1:
            deletions, i = deletions + 1, i - 1
        else:
            insertions, j = insertions + 1, j - 1
    return EditCounts(substitutions, insertions, deletions, len(reference))


def transcript_edit_counts(
    reference: str, hypothesis: str, normalizer: Callable[[str], str] = normalize_text
) -> EditCounts:
    """Normalise both transcripts, split on spaces and align them."""
    return align_words(normalizer(reference).split(), normalizer(hypothesis).split())


def _rates(counts: EditCounts) -> dict[str, float]:
    """Rates over reference words; an empty reference corpus divides by 1 so insertions still count."""
    denominator = max(counts.reference_words, 1)
    return {
        "wer": counts.errors / denominator,
        "substitutions": counts.substitutions / denominator,
        "insertions": counts.insertions / denominator,
        "deletions": counts.deletions / denominator,
    }


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus WER and its substitution/insertion/deletion parts (each a fraction of reference words)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    total = sum(map(transcript_edit_counts, references, hypotheses), EditCounts())
    return _rates(total)


class CorpusWER(Metric):
    """DDP-safe corpus WER. `update(hypotheses, references)` with lists of strings of equal length.

    `compute()` returns {"wer", "substitutions", "insertions", "deletions"}, all as fractions of the
    summed reference words over every update on every rank (so the last three add up to "wer").
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, normalizer: Callable[[str], str] = normalize_text, **kwargs):
        super().__init__(**kwargs)
        self.normalizer = normalizer
        for name in ("substitutions", "insertions", "deletions", "reference_words"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, hypotheses: Sequence[str], references: Sequence[str]) -> None:
        if len(references) != len(hypotheses):
            raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
        for reference, hypothesis in zip(references, hypotheses):
            counts = transcript_edit_counts(reference, hypothesis, self.normalizer)
            self.substitutions += counts.substitutions
            self.insertions += counts.insertions
            self.deletions += counts.deletions
            self.reference_words += counts.reference_words

    def compute(self) -> dict[str, torch.Tensor]:
        counts = EditCounts(
            int(self.substitutions), int(self.insertions), int(self.deletions), int(self.reference_words)
        )
        return {name: torch.tensor(value) for name, value in _rates(counts).items()}
