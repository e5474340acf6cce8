"""evaluate.py: a tiny trained AVSR run decoded under clean and noisy audio, audio-visual and audio-only,
on one process and on two gloo processes (identical results), with bad clips skipped and counted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from data.avsr.manifest import ManifestRow, write_manifest
from data.avsr.media_io import SAMPLES_PER_VIDEO_FRAME, write_audio, write_video
from evaluate import evaluate
from tests.hydra_utils import REPO, compose_train
from train import train

TEXTS = ["HELLO THERE", "GOOD MORNING", "SEE YOU SOON", "THANK YOU", "WELL DONE", "NOT AT ALL"]


def _write_corpus(root):
    rng = np.random.default_rng(0)
    rows = []
    for i, text in enumerate(TEXTS):
        frames = 6 + i
        stem = root / f"clips/{i:02d}"
        write_video(stem.with_suffix(".mp4"), rng.integers(0, 255, (frames, 96, 96, 3), dtype=np.uint8))
        write_audio(stem.with_suffix(".wav"), 0.3 * rng.standard_normal(frames * SAMPLES_PER_VIDEO_FRAME))
        rows.append(ManifestRow("lrs3", f"clips/{i:02d}.mp4", frames, text))
    for split in ("train", "val"):
        write_manifest(root / f"labels/{split}.csv", rows)
    write_manifest(root / "labels/test.csv", rows + [ManifestRow("lrs3", "clips/missing.mp4", 5, "GONE")])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 1-step debug=smoke AVSR run (tiny Llama, tiny Whisper, tiny video encoder) on a 6-clip corpus."""
    base = tmp_path_factory.mktemp("eval")
    _write_corpus(base / "corpus")
    run_dir = base / "run"
    overrides = [
        "experiment=avsr_decorr",
        "debug=smoke",
        f"data.root={base / 'corpus'}",
        "data.prepare=null",
        "data.max_frames=40",
        "data.max_duration_s=1.6",
        "trainer.max_steps=1",
        "trainer.limit_val_batches=1",
        "validate_before_training=false",
        "logger=csv",
        "model.generation.max_new_tokens=4",
    ]
    cfg = compose_train(overrides, run_dir)
    train(cfg)
    # what Hydra writes into a run folder: the composed job config
    (run_dir / ".hydra").mkdir(exist_ok=True)
    from omegaconf import OmegaConf

    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run_dir


def compose_evaluate(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose(config_name="evaluate", overrides=overrides)


COMMON = ["noise.snr_db=[0]", "noise.kinds=[babble,white]", "noise.babble_talkers=2", "data.num_workers=0"]


def test_results_hypotheses_and_table(trained_run, tmp_path):
    out = tmp_path / "single"
    results = evaluate(compose_evaluate([f"run={trained_run}", f"output_dir={out}", *COMMON]))
    written = json.loads((out / "results.json").read_text())
    assert written == results
    assert [(r["input"], r["condition"]) for r in results] == [
        (streams, condition)
        for streams in ("audiovisual", "audio")
        for condition in ("clean", "babble 0 dB", "white 0 dB")
    ]
    for entry in results:
        assert set(entry) >= {"condition", "wer", "substitutions", "insertions", "deletions"}
        assert entry["utterances"] == len(TEXTS) and entry["skipped"] == 1  # the missing clip
        assert entry["reference_words"] == sum(len(t.split()) for t in TEXTS)
        errors = entry["substitutions"] + entry["insertions"] + entry["deletions"]
        assert entry["wer"] == pytest.approx(errors / entry["reference_words"])
    lines = [json.loads(line) for line in (out / "hypotheses.jsonl").read_text().splitlines()]
    assert len(lines) == len(TEXTS) * len(results)
    assert {line["reference"] for line in lines} == set(TEXTS)
    assert {"id", "reference", "hypothesis", "condition"} <= set(lines[0])
    markdown = (out / "results.md").read_text()
    assert "## Robustness (WER %)" in markdown and "| babble 0 dB |" in markdown


def test_clear_errors(trained_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="config key `run`"):
        evaluate(compose_evaluate([f"run={tmp_path / 'nowhere'}", f"output_dir={tmp_path}"]))
    partial = tmp_path / "partial"
    shutil.copytree(trained_run / ".hydra", partial / ".hydra")
    with pytest.raises(FileNotFoundError, match="exported no modules"):
        evaluate(compose_evaluate([f"run={partial}", f"output_dir={tmp_path}", "data.num_workers=0"]))
    with pytest.raises(ValueError, match="inputs"):
        evaluate(compose_evaluate([f"run={trained_run}", f"output_dir={tmp_path}", "inputs=[lips]"]))


def test_two_gloo_processes_match_one_process(trained_run, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    overrides = [f"run={trained_run}", "noise.snr_db=[5]", "noise.kinds=[babble]", "data.num_workers=0"]
    evaluate(compose_evaluate([*overrides, f"output_dir={single}"]))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",  # a free port of its own: a fixed one collides with any other run on the machine
        "evaluate.py",
        *overrides,
        f"output_dir={ddp}",
        "device=cpu",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((ddp / "results.json").read_text()) == json.loads((single / "results.json").read_text())
    assert (ddp / "hypotheses.jsonl").read_text() == (single / "hypotheses.jsonl").read_text()


def test_attention_edit_is_an_evaluation_option(trained_run, tmp_path, monkeypatch):
    from models import attention_edit

    calls = []
    original = attention_edit.ZeroTuningLayer.__call__
    monkeypatch.setattr(
        attention_edit.ZeroTuningLayer, "__call__", lambda self, *a: calls.append(1) or original(self, *a)
    )
    overrides = [f"run={trained_run}", "noise.kinds=[]", "inputs=[audiovisual]", "data.num_workers=0"]
    results = evaluate(
        compose_evaluate(
            [
                *overrides,
                f"output_dir={tmp_path}",
                "attention_edit=zerotuning",
                "attention_edit.heads={0: [1]}",
            ]
        )
    )
    assert [r["condition"] for r in results] == ["clean"]
    assert "attention edit zerotuning" in (tmp_path / "results.md").read_text()
    assert calls  # layer 0 computed its edited probabilities while decoding
