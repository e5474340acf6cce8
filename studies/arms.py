"""Run the arms of a study as `train.py` processes: one per GPU at a time, resumable, logs kept.

An arm is a named list of Hydra overrides. Each runs in `<study_dir>/<arm>/` (its Hydra run folder), so a
rerun of the study skips arms whose `results.json` exists and resumes unfinished ones from their
checkpoints (`ckpt_path=auto`). With N visible GPUs, N arms run at once (CUDA_VISIBLE_DEVICES pins each; UNSINK_ARMS_PER_GPU=k runs k per
GPU, for launch-bound small models);
on a CPU machine they run one after another. A failed arm is reported with its log's tail; the others
still run, and `run_arms` raises at the end naming every failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Arm:
    """name: folder name and table label; overrides: Hydra overrides passed to train.py."""

    name: str
    overrides: list[str] = field(default_factory=list)


def batch_overrides(batch_size: int, micro_batch: int | None = None) -> list[str]:
    """Hydra overrides for `batch_size` rows per optimizer step, fed `micro_batch` rows per forward.

    micro_batch None or equal to batch_size: `["data.batch_size=B"]` (one forward per step). Otherwise
    `data.batch_size=m` and `trainer.accumulate_grad_batches=B/m`: the same rows per optimizer step (the
    training sampler's order does not depend on the batch size; `max_steps` counts optimizer steps) in
    less activation memory. Token-sum objectives (LeaF/KD distillation) still divide by the tokens of the
    whole step (recipes/objectives/window.py); mean-CE arms average the micro-batches' token means.
    Raises ValueError when m does not divide B.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if micro_batch is None or micro_batch == batch_size:
        return [f"data.batch_size={batch_size}"]
    if micro_batch < 1 or batch_size % micro_batch:
        divisors = [d for d in range(1, batch_size + 1) if batch_size % d == 0]
        raise ValueError(
            f"micro-batch {micro_batch} does not divide the batch size {batch_size} (rows per optimizer "
            f"step): choose one of {divisors}"
        )
    return [f"data.batch_size={micro_batch}", f"trainer.accumulate_grad_batches={batch_size // micro_batch}"]


def visible_gpus() -> list[str]:
    """GPU indices this process may use ([] on CPU machines)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def arm_dir(study_dir: Path, arm: Arm) -> Path:
    return Path(study_dir) / arm.name


def arm_results(study_dir: Path, arm: Arm) -> dict | None:
    """The arm's `results.json` (written by train.py at the end of a run), or None if unfinished."""
    path = arm_dir(study_dir, arm) / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_arms(
    arms: list[Arm],
    study_dir: str | Path,
    gpus: list[str] | None = None,
    entry: str = "train.py",
    python: str = sys.executable,
) -> dict[str, Path]:
    """Run every unfinished arm; return {arm name: run folder}. Raises RuntimeError if any arm failed."""
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"arm names must be unique: {names}")
    slots = gpus if gpus is not None else visible_gpus()
    per_gpu = max(1, int(os.environ.get("UNSINK_ARMS_PER_GPU", "1")))  # small models are launch-bound
    slots = [g for _ in range(per_gpu) for g in slots] or [None]  # CPU: one at a time
    pending = [a for a in arms if arm_results(study_dir, a) is None]
    for arm in arms:
        if arm not in pending:
            print(f"[study] {arm.name}: finished earlier, skipped", flush=True)
    running: dict[int, tuple[Arm, subprocess.Popen, float]] = {}  # by slot index (a GPU may hold several)
    failed: list[str] = []
    while pending or running:
        for index, slot in enumerate(slots):
            if index not in running and pending:
                arm = pending.pop(0)
                running[index] = (arm, _launch(arm, study_dir, slot, entry, python), time.time())
        time.sleep(1.0)
        for index, (arm, proc, start) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[index]
            took = time.time() - start
            if proc.returncode == 0 and arm_results(study_dir, arm) is not None:
                print(f"[study] {arm.name}: done in {took:.0f} s", flush=True)
            else:
                failed.append(arm.name)
                log = arm_dir(study_dir, arm) / "train.log"
                tail = log.read_text(errors="replace").splitlines()[-30:] if log.exists() else []
                print(f"[study] {arm.name}: FAILED (exit {proc.returncode}) after {took:.0f} s", flush=True)
                print("\n".join(f"    {line}" for line in tail), flush=True)
    if failed:
        raise RuntimeError(f"arms failed: {failed} (logs: {study_dir}/<arm>/train.log)")
    return {a.name: arm_dir(study_dir, a) for a in arms}


def _launch(arm: Arm, study_dir: Path, slot: str | None, entry: str, python: str) -> subprocess.Popen:
    run_dir = arm_dir(study_dir, arm)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    cmd = [python, str(REPO_ROOT / entry), *arm.overrides, f"hydra.run.dir={run_dir}", "ckpt_path=auto"]
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    print(f"[study] {arm.name}: start on {'GPU ' + slot if slot is not None else 'CPU'}", flush=True)
    log = open(run_dir / "train.log", "a")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
