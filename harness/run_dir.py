"""One run folder per run, agreed on by every DDP rank, every srun task and every Slurm requeue."""

from __future__ import annotations

import os
from datetime import datetime

from omegaconf import OmegaConf

from harness.gpu_resolver import gpu_if_available, if_gpu


def run_key() -> str:
    """`slurm-<job id>[_<array task>]` under Slurm, else a microsecond timestamp (cached per process).

    Lightning's DDP launcher re-runs train.py in child processes with `hydra.run.dir` pinned to the
    parent's folder, so the timestamp of a local run is resolved once.
    """
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"_{task}" if task else "")
    global _TIMESTAMP
    if _TIMESTAMP is None:
        _TIMESTAMP = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    return _TIMESTAMP


_TIMESTAMP: str | None = None


def register_resolvers() -> None:
    """`${run_key:}`, `${if_gpu:...}` and `${gpu_if_available:}` (harness/gpu_resolver.py); idempotent."""
    if not OmegaConf.has_resolver("run_key"):
        OmegaConf.register_new_resolver("run_key", run_key, use_cache=True)
    if not OmegaConf.has_resolver("if_gpu"):
        OmegaConf.register_new_resolver("if_gpu", if_gpu)
        OmegaConf.register_new_resolver("gpu_if_available", gpu_if_available)
