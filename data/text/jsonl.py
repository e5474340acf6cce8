"""Read JSONL files where a malformed line is skipped and counted (or fails, when strict)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class SkipReport:
    """Lines that were not used, with their 1-based line numbers and the reason."""

    path: str
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def add(self, line_number: int, reason: str) -> None:
        self.skipped.append((line_number, reason))

    def __len__(self) -> int:
        return len(self.skipped)

    def summary(self, limit: int = 5) -> str:
        shown = ", ".join(f"line {n}: {why}" for n, why in self.skipped[:limit])
        more = f" (+{len(self.skipped) - limit} more)" if len(self.skipped) > limit else ""
        return f"{self.path}: skipped {len(self.skipped)} line(s): {shown}{more}"


def read_jsonl(path: str | Path, strict: bool = False, config_key: str = "data.train_file"):
    """Return (rows, SkipReport). A missing file raises naming the path and the config key."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist (config key `{config_key}`)")
    rows, report = [], SkipReport(str(path))
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
            except ValueError as err:
                if strict:
                    raise ValueError(f"{path}:{number}: malformed JSONL line ({err})") from err
                report.add(number, f"malformed JSON ({err.__class__.__name__})")
                continue
            row["_line"] = number
            rows.append(row)
    if len(report):
        log.warning(report.summary())
    return rows, report
