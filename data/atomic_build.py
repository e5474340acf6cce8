"""Build a folder atomically: into a temporary sibling, then renamed into place.

Readers never see half a folder, a stale folder (marker of other parameters) is replaced, and a
concurrent builder of the same parameters that finishes first is tolerated.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def read_marker(folder: Path, marker: str) -> dict | None:
    """The JSON marker `folder / marker`, or None when it is missing or unreadable."""
    try:
        return json.loads((folder / marker).read_text())
    except (OSError, ValueError):
        return None


def build_atomically(
    out: Path, marker: str, build_into: Callable[[Path], dict], marker_matches: Callable[[Path], bool]
) -> dict:
    """Run `build_into(staging)` (returns the marker's contents), write it as `marker`, move into `out`.

    `marker_matches(folder)`: whether `folder` already holds a build of the same parameters; an `out`
    that does not match is removed first, and a failed rename is fine when `out` then matches.
    """
    staging = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        summary = build_into(staging)
        (staging / marker).write_text(json.dumps(summary, indent=2) + "\n")
        if out.exists() and not marker_matches(out):
            shutil.rmtree(out)
        try:
            staging.rename(out)
        except OSError:  # another process finished the same build first
            if not marker_matches(out):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary
