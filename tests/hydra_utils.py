"""Compose `conf/train.yaml` in-process (as `python train.py ...` would) for tests."""

from __future__ import annotations

import csv
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from harness.run_dir import register_resolvers

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def compose_train(
    overrides: list[str], run_dir: Path | None = None, config_name: str = "train"
) -> DictConfig:
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.paths.run_dir = str(run_dir)
            cfg.paths.output_dir = str(run_dir.parent)
            cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a real run: the hydra node lives in HydraConfig, not in the job config
    return cfg


def tiny_sft_overrides(*extra: str) -> list[str]:
    """lm_sft on the tiny model and the committed fixture data, CSV logging every step."""
    return [
        "experiment=lm_sft",
        "debug=smoke",
        f"data.train_file={FIXTURES / 'tiny_sft.jsonl'}",
        f"data.val_file={FIXTURES / 'tiny_sft_val.jsonl'}",
        "data.prepare=null",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "peft.dropout=0.0",
        *extra,
    ]


def logged(run_dir: Path, key: str) -> list[float]:
    """Every value of `key` (e.g. "train/loss") in the run's CSV log, in order."""
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return [float(r[key]) for r in rows if r.get(key)]
