"""Every experiment composes, and runs end to end with `debug=smoke` (tiny random models, few steps)."""

from __future__ import annotations

import pytest

from tests.hydra_utils import REPO, compose_train
from train import train

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
# Cluster-scale variants name hub models and LRS3 paths: they must compose here; their smoke run on a small
# LRS3-layout folder is in tests/test_lrs3_layout.py.
CLUSTER_ONLY = {name for name in EXPERIMENTS if name.endswith("_lrs3")}
# Study experiments build a corpus of thousands of clips on first use: their smoke run builds a tiny one
# (built-in sentences and voices) in the test's own folder.
STUDY_SCALE = {name for name in EXPERIMENTS if name.startswith("asr_study")}


def tiny_corpus_overrides(name: str, folder) -> list[str]:
    if name not in STUDY_SCALE:
        return []
    sizes = "data.prepare.num_train=4 data.prepare.num_val=1 data.prepare.num_test=1".split()
    return [
        f"data.root={folder}",
        *sizes,
        "data.prepare.sources=[builtin]",
        "data.prepare.voices=[builtin:low]",
    ]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    cfg = compose_train([f"experiment={name}"])
    assert cfg.model._target_
    assert cfg.tags, f"experiment {name} sets no tags"


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n not in CLUSTER_ONLY])
def test_experiment_runs_with_debug_smoke(name, tmp_path):
    cfg = compose_train(
        [f"experiment={name}", "debug=smoke", "trainer.max_steps=2", "trainer.limit_val_batches=1"]
        + tiny_corpus_overrides(name, tmp_path / "corpus"),
        tmp_path / name,
    )
    after = train(cfg)
    assert after, f"{name}: no validation metrics"
    assert all(v == v for v in after.values()), f"{name}: NaN metric in {after}"
