"""Why a clip was left out of a batch, and how the counts travel from DataLoader workers to the logs.

Workers cannot share counters with the main process, so the collate function writes per-batch counts
into `batch["skipped"]`; the datamodule adds them up in the main process (`SkipTally`) and the
LightningModule can log them per batch with `skip_metrics`.
"""

import logging
from typing import NamedTuple

import torch
import torch.distributed as dist

SKIP_REASONS = ("missing", "corrupt", "truncated", "empty", "too_long")

log = logging.getLogger(__name__)


class ClipSkipped(NamedTuple):
    """Returned by the dataset instead of a clip; `reason` is one of SKIP_REASONS."""

    reason: str
    clip_id: str


def zero_counts() -> dict[str, int]:
    return dict.fromkeys(SKIP_REASONS, 0)


def skip_metrics(skipped: dict[str, int], prefix: str = "data/skipped_") -> dict[str, int]:
    """{"missing": 1, ...} -> {"data/skipped_missing": 1, ...} for `LightningModule.log_dict`."""
    return {f"{prefix}{reason}": count for reason, count in skipped.items()}


class SkipTally:
    """Running totals of skipped clips per stage ("train", "val", "test"), kept in the main process."""

    def __init__(self) -> None:
        self.totals: dict[str, dict[str, int]] = {}
        self.run_totals: dict[str, dict[str, int]] = {}  # never reset: for the end-of-run summary

    def add(self, stage: str, skipped: dict[str, int]) -> None:
        for table in (self.totals, self.run_totals):
            totals = table.setdefault(stage, zero_counts())
            for reason, count in skipped.items():
                totals[reason] = totals.get(reason, 0) + int(count)

    def pop(self, stage: str) -> dict[str, int]:
        """Totals since the last pop, summed over DDP ranks when a process group is up (call on every
        rank then), and reset."""
        totals = self.totals.pop(stage, zero_counts())
        if dist.is_available() and dist.is_initialized():
            counts = torch.tensor([totals[reason] for reason in SKIP_REASONS], dtype=torch.long)
            if dist.get_backend() == "nccl":
                counts = counts.cuda()
            dist.all_reduce(counts)
            totals = dict(zip(SKIP_REASONS, counts.tolist()))
        return totals

    def report(self, stage: str) -> dict[str, int]:
        """Pop the stage's totals and log them (warning when anything was skipped)."""
        totals = self.pop(stage)
        skipped = sum(totals.values())
        level = logging.WARNING if skipped else logging.INFO
        log.log(level, "%s epoch: %d clips skipped %s", stage, skipped, totals)
        return totals
