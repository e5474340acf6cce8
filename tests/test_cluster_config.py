"""Run folders keyed for Slurm, the sbatch file, and the submitit launcher config."""

from __future__ import annotations

import re

from harness import run_dir
from tests.hydra_utils import REPO, compose_train


def test_run_key_follows_slurm_job_id(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert run_dir.run_key() == "slurm-4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_dir.run_key() == "slurm-77_3"


def test_run_key_is_a_stable_microsecond_timestamp_without_slurm(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(run_dir, "_TIMESTAMP", None)
    first = run_dir.run_key()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}", first)
    assert run_dir.run_key() == first


def test_sbatch_keeps_slurm_and_trainer_in_agreement():
    text = (REPO / "slurm" / "train.sbatch").read_text()
    tasks = re.search(r"--ntasks-per-node=(\d+)", text).group(1)
    gpus = re.search(r"--gpus-per-node=(\d+)", text).group(1)
    assert tasks == gpus
    assert "--signal=SIGUSR1@90" in text and "--requeue" in text
    assert 'trainer.devices="$DEVICES"' in text and 'trainer.num_nodes="$NODES"' in text
    assert "srun " in text


def test_submitit_launcher_matches_trainer_devices():
    from hydra.core.hydra_config import HydraConfig

    compose_train(["experiment=lm_sft", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=8"])
    launcher = HydraConfig.get().launcher
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert "submitit" in launcher._target_.lower()


def test_wandb_logger_is_offline_without_credentials(monkeypatch, tmp_path):
    from harness.wandb_logger import has_wandb_credentials

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert not has_wandb_credentials()
    cfg = compose_train(["experiment=lm_sft", "logger=many"], tmp_path / "run")
    assert cfg.logger.wandb.mode == "auto" and cfg.logger.wandb.run_id
