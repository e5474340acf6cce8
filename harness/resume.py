"""Which checkpoint `ckpt_path=auto` resumes from: the newest resumable state of a run folder.

Candidates: Lightning's requeue checkpoints `<run>/hpc_ckpt_<n>.ckpt` (written by harness/requeue.py, or by
Lightning's own SLURM handler) and every `<run>/checkpoints/*.ckpt` (last, best, step-based). The one with
the highest global step wins; ties go to the file written last (an end-of-epoch `last.ckpt` saved after
validation beats a requeue checkpoint of the same step). Files that cannot be read (a kill -9 during the
write) are skipped with a warning. FSDP sharded checkpoints are folders; their step is in `meta.pt`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

HPC_PATTERN = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")


def checkpoint_step(path: Path) -> int:
    """Global step stored in a Lightning checkpoint file (or an FSDP sharded checkpoint folder)."""
    target = path / "meta.pt" if path.is_dir() else path
    state = torch.load(target, map_location="cpu", weights_only=False, mmap=not path.is_dir())
    return int(state["global_step"])


def resumable_checkpoints(run_dir: Path) -> list[Path]:
    hpc = [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if HPC_PATTERN.match(p.name)]
    return hpc + sorted((run_dir / "checkpoints").glob("*.ckpt"))


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest global step in `run_dir` (None when there is none)."""
    best, best_key = None, None
    for path in resumable_checkpoints(Path(run_dir)):
        try:
            key = (checkpoint_step(path), path.stat().st_mtime)
        except Exception as err:  # noqa: BLE001  (truncated or corrupt: fall back to an older one)
            log.warning("skipping unreadable checkpoint %s: %s", path, err)
            continue
        if best_key is None or key > best_key:
            best, best_key = path, key
    if best is not None:
        log.info("ckpt_path=auto: resuming from %s (step %d)", best, best_key[0])
    return best


def next_hpc_path(run_dir: str | Path) -> Path:
    """`<run>/hpc_ckpt_<n+1>.ckpt`, Lightning's naming for requeue checkpoints."""
    numbers = [int(m.group(1)) for p in Path(run_dir).glob("hpc_ckpt_*") if (m := HPC_PATTERN.match(p.name))]
    return Path(run_dir) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"
