"""The documented LRS3 commands run end to end on a small LRS3-layout folder with tiny model substitutes.

`python train.py experiment=avsr_decorr data=lrs3 data.root=...` (the demo model on real-layout data) and
every `*_lrs3` cluster experiment are composed exactly as on the command line, with `debug=smoke` swapping in
tiny random encoders and LLM, and trained for a step or two.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from data.avsr.manifest import ManifestRow, write_manifest
from data.avsr.media_io import SAMPLES_PER_VIDEO_FRAME, write_audio, write_video
from tests.hydra_utils import REPO, compose_train
from train import train

LRS3_EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*_lrs3.yaml"))
CLIPS = {
    "trainval/spk1/00001": "HELLO THERE",
    "trainval/spk1/00002": "GOOD MORNING",
    "test/spk2/00001": "YES SIR",
}


@pytest.fixture(scope="module")
def lrs3_root(tmp_path_factory):
    """auto_avsr layout: <root>/lrs3/<rel_path>.mp4 + .wav, manifests under labels/ (no header)."""
    root = tmp_path_factory.mktemp("lrs3_layout")
    rng = np.random.default_rng(0)
    rows = []
    for i, (stem, text) in enumerate(CLIPS.items()):
        frames = 12 + 3 * i
        write_video(root / "lrs3" / f"{stem}.mp4", rng.integers(0, 255, (frames, 96, 96), dtype=np.uint8))
        write_audio(
            root / "lrs3" / f"{stem}.wav", 0.2 * rng.standard_normal(frames * SAMPLES_PER_VIDEO_FRAME)
        )
        rows.append(ManifestRow("lrs3", f"{stem}.mp4", frames, text))
    for name in ("train", "val", "test", "lrs3_train_transcript_lengths_seg24s"):
        write_manifest(root / "labels" / f"{name}.csv", rows)
    return root


def _run(overrides: list[str], run_dir):
    cfg = compose_train([*overrides, "trainer.limit_val_batches=1", "logger=csv"], run_dir)
    return cfg, train(cfg)


def test_demo_experiment_composes_with_the_lrs3_data_group(lrs3_root, tmp_path, caplog):
    """The exact documented command; it used to stop at start-up (max_frames 400 vs the 24 s clip limit)."""
    command = ["experiment=avsr_decorr", "data=lrs3", f"data.root={lrs3_root}"]
    with caplog.at_level(logging.WARNING, logger="data.avsr.datamodule"):
        cfg, after = _run([*command, "debug=smoke", "trainer.max_steps=2"], tmp_path / "run")
    assert cfg.data.max_frames == 400 and cfg.data.max_duration_s == 24.0  # both as composed
    assert "data.max_duration_s=24.0" in caplog.text  # the later budget wins, and says so
    assert "val/loss" in after and after["val/loss"] == after["val/loss"]


# avsr_decorr_lrs3 (both encoders) runs in the default suite; the single-modality variants with `make test-all`
SLOW = {"asr_decorr_lrs3", "vsr_decorr_lrs3"}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in LRS3_EXPERIMENTS]
)
def test_cluster_experiment_builds_and_trains_one_step(lrs3_root, tmp_path, name):
    cfg, after = _run(
        [f"experiment={name}", f"data.root={lrs3_root}", "debug=smoke", "trainer.max_steps=1"],
        tmp_path / name,
    )
    assert cfg.task_name == "debug" and cfg.trainer.devices == 1
    assert (tmp_path / name / "checkpoints" / "last.ckpt").is_file()
    assert after and all(value == value for value in after.values()), after
