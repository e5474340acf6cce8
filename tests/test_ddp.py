"""DDP with 2 CPU processes (gloo) trains, and its synced metrics agree with a single process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.hydra_utils import REPO, compose_train, logged, tiny_sft_overrides
from train import train


def test_two_process_ddp_matches_single_process_on_synced_metrics(tmp_path):
    common = [
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=null",
        "scheduler=none",
    ]
    ddp_dir = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "train.py",
        *tiny_sft_overrides(*common, "trainer=ddp_cpu", "trainer.devices=2"),  # debug=smoke pins 1 device
        f"hydra.run.dir={ddp_dir}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "unsink run summary" in done.stdout
    assert "Starting with 2 processes" in done.stdout + done.stderr

    single_dir = tmp_path / "single"
    train(compose_train(tiny_sft_overrides(*common), single_dir))

    ddp_val, single_val = logged(ddp_dir, "val/loss"), logged(single_dir, "val/loss")
    # before training both see identical weights: the token-weighted, all-reduced val/loss must match
    assert ddp_val[0] == pytest.approx(single_val[0], abs=1e-5)
    assert len(logged(ddp_dir, "train/loss")) == 2
    assert (ddp_dir / "adapter" / "adapter_config.json").exists()
    strays = [p for p in ddp_dir.parent.iterdir() if p.name not in {"ddp", "single"}]
    assert not strays, f"DDP created stray run folders: {strays}"
