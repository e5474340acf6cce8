"""Synthetic corpus builder: LRS3 layout, frame counts, audio-driven video, determinism, idempotence."""

import filecmp
import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from data.avsr import speech_synth
from data.avsr.manifest import ManifestRow, read_manifest, resolve_clip_paths
from data.avsr.media_io import SAMPLES_PER_VIDEO_FRAME, VIDEO_FPS, read_audio, read_video
from data.avsr.mouth_video import mouth_features
from data.avsr.speech_synth import FormantSynthesizer, synthesizer_name
from data.avsr.synthetic_corpus import (
    MARKER,
    CorpusParams,
    _jobs,
    _report_train_sentences,
    build_synthetic_corpus,
    ensure_synthetic_corpus,
    librivox_utterances,
)
from data.avsr.text_sources import (
    builtin_sentences,
    clean_sentence,
    default_text_root,
    load_sentences,
    text_source_name,
)
from tests.hydra_utils import compose_train

TINY = dict(num_train=3, num_val=1, num_test=1, seed=5)
CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "synthetic_avsr"
    build_synthetic_corpus(out, progress=False, **TINY)
    return out


def _rows(root, split):
    return read_manifest(root / "labels" / f"{split}.csv").rows


def test_corpus_has_lrs3_layout_and_frame_counts_match_duration(corpus):
    librivox = len(librivox_utterances())
    assert [len(_rows(corpus, split)) for split in ("train", "val", "test")] == [3, 1, 1 + librivox]
    marker = json.loads((corpus / MARKER).read_text())
    assert marker["params"]["num_train"] == 3 and marker["librivox_test_clips"] == librivox
    for split in ("train", "val", "test"):
        for row in _rows(corpus, split):
            paths = resolve_clip_paths(corpus, row)
            assert paths.video == corpus / row.rel_path and paths.audio.is_file()
            audio, video = read_audio(paths.audio), read_video(paths.video)
            assert video.shape[1:] == (3, 96, 96)
            assert video.shape[0] == row.input_length == audio.numel() // SAMPLES_PER_VIDEO_FRAME
            assert audio.numel() == row.input_length * SAMPLES_PER_VIDEO_FRAME
            assert row.text == row.text.upper() and clean_sentence(row.text, 1, 100) == row.text
            if row.dataset == "synthetic":
                assert 1.0 <= row.input_length / VIDEO_FPS <= 4.0 + 0.5


def test_video_follows_the_audio_envelope(corpus):
    """The dark mouth opening grows with loudness: per-frame darkness correlates with audio RMS."""
    darkness, loudness = [], []
    for row in _rows(corpus, "train") + _rows(corpus, "test"):
        paths = resolve_clip_paths(corpus, row)
        gray = read_video(paths.video).float().mean(dim=1)[:, 30:80, 16:80]
        darkness.append((gray < 80).float().mean(dim=(1, 2)).numpy())
        loudness.append(mouth_features(read_audio(paths.audio).numpy())[0])
    correlation = np.corrcoef(np.concatenate(darkness), np.concatenate(loudness))[0, 1]
    assert correlation > 0.7


def test_build_is_deterministic_and_parallel_safe(tmp_path):
    params = dict(num_train=2, num_val=1, num_test=1, seed=9, include_librivox=False)
    build_synthetic_corpus(tmp_path / "one", workers=1, progress=False, **params)
    build_synthetic_corpus(tmp_path / "two", workers=2, progress=False, **params)
    for split in ("train", "val", "test"):
        assert filecmp.cmp(
            tmp_path / "one/labels" / f"{split}.csv", tmp_path / "two/labels" / f"{split}.csv", False
        )
        for row in _rows(tmp_path / "one", split):
            one, two = resolve_clip_paths(tmp_path / "one", row), resolve_clip_paths(tmp_path / "two", row)
            assert filecmp.cmp(one.audio, two.audio, shallow=False)
            assert torch.equal(read_video(one.video), read_video(two.video))


def test_ensure_is_idempotent_and_rebuilds_when_parameters_change(tmp_path):
    params = dict(num_train=1, num_val=1, num_test=1, include_librivox=False, progress=False)
    out = ensure_synthetic_corpus(tmp_path / "c", **params)
    sentinel = out / "sentinel"
    sentinel.write_text("kept while the parameters are unchanged")
    ensure_synthetic_corpus(out, **params)
    assert sentinel.exists()
    ensure_synthetic_corpus(out, **{**params, "num_train": 2})
    assert not sentinel.exists() and len(_rows(out, "train")) == 2
    assert not list(tmp_path.glob(".c.building-*"))  # the staging folder is gone


def test_synthetic_config_builds_on_first_use_and_loads_batches(tmp_path):
    cfg = compose_train(["data=synthetic_avsr", f"paths.artifacts_dir={tmp_path}", "seed=0"])
    assert cfg.data.crop_size == 88 and cfg.data.strict is False  # inherited from conf/data/lrs3.yaml
    cfg.data.prepare.update(
        num_train=2, num_val=2, num_test=1, include_librivox=False, progress=False, workers=1
    )
    cfg.data.num_workers = 0
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    assert (tmp_path / "data/synthetic_avsr" / MARKER).is_file()
    datamodule.setup("validate")
    (batch,) = list(datamodule.val_dataloader())
    assert batch["video"].shape[0] == 2 and batch["video"].shape[2:] == (1, 88, 88)
    assert batch["audio"].shape == (2, int(batch["audio_lengths"].max()))
    assert torch.equal(batch["audio_lengths"], batch["video_lengths"] * SAMPLES_PER_VIDEO_FRAME)
    assert sum(batch["skipped"].values()) == 0


def test_lrs3_config_requires_a_root():
    cfg = OmegaConf.create({"seed": 0, "data": OmegaConf.load(CONF / "lrs3.yaml")})
    assert OmegaConf.is_missing(cfg.data, "root")
    assert cfg.data._target_ == "data.avsr.datamodule.AVSRDataModule"


def test_sentences_are_short_plain_uppercase_with_builtin_fallback(tmp_path):
    assert clean_sentence("Hello, world -- it's   fine.") == "HELLO WORLD IT'S FINE"
    assert clean_sentence("Born in 1842 in Ohio.") is None  # digits
    assert clean_sentence("Too short.") is None
    sentences, _ = load_sentences()
    assert len(sentences) >= 50
    assert all(3 <= len(s.split()) <= 10 and clean_sentence(s) == s for s in sentences)
    fallback, source = load_sentences(text_root=tmp_path)  # no Debian text under this root
    assert source == "builtin" == text_source_name(tmp_path)
    assert fallback == builtin_sentences() and len(fallback) >= 50


def test_debian_sources_are_pooled_and_found_under_an_unpacked_root(monkeypatch, tmp_path):
    """Devil's Dictionary and fortunes pool (the Devil's Dictionary alone gives about 650 sentences of
    3-10 words: a GPU demo of thousands of clips memorised its few); an unpacked .deb root serves too."""
    fortunes = tmp_path / "usr/share/games/fortunes"
    fortunes.mkdir(parents=True)
    quotes = [f"The {w} cat sat on the mat today." for w in ("red", "blue", "old", "tall", "small")]
    (fortunes / "cats").write_text("\n%\n".join(quotes * 1) + "\n")
    adjectives = "big small old young tall short red blue green brown grey".split()
    nouns = "dog cat horse bird fox owl cow hen goat pig duck".split()  # 121 sentences: over the minimum
    more = [f"The {adjective} {noun} ran home." for adjective in adjectives for noun in nouns]
    (fortunes / "more").write_text("\n%\n".join(more) + "\n")
    sentences, source = load_sentences(text_root=tmp_path)
    assert source == "fortunes" == text_source_name(tmp_path)
    assert "THE RED CAT SAT ON THE MAT TODAY" in sentences and len(sentences) == len(set(sentences))
    devil = tmp_path / "usr/share/dictd/devil.dict.dz"
    devil.parent.mkdir(parents=True)
    with gzip.open(devil, "wt") as stream:
        stream.write("ABSTAINER, n.  A weak person who yields to temptation.\n")
    pooled, source = load_sentences(text_root=tmp_path)
    assert source == "devil+fortunes" == text_source_name(tmp_path)
    assert pooled[0] == "A WEAK PERSON WHO YIELDS TO TEMPTATION"
    assert set(sentences) < set(pooled)
    monkeypatch.setenv("UNSINK_DEB_ROOT", str(tmp_path))
    assert default_text_root() == tmp_path and load_sentences()[1] == "devil+fortunes"


def test_a_corpus_of_repeated_builtin_sentences_warns(caplog):
    rows = [ManifestRow("synthetic", f"synthetic/train/slt/{i:05d}.mp4", 50, f"SENTENCE {i % 3} IS HERE")
            for i in range(9)]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="data.avsr.synthetic_corpus"):
        assert _report_train_sentences(rows, "builtin") == 3
    assert "memorises" in caplog.text and "9 training clips repeat 3 built-in sentences" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="data.avsr.synthetic_corpus"):
        assert _report_train_sentences(rows[:3], "devil+fortunes") == 3
    assert "memorises" not in caplog.text and "3 distinct sentences" in caplog.text


def test_builtin_synthesizer_is_deterministic_and_sentence_dependent(monkeypatch):
    monkeypatch.setattr(speech_synth.shutil, "which", lambda name: None)
    assert synthesizer_name("auto") == "builtin"
    synth = FormantSynthesizer()
    first = synth.synthesize("THE RIVER RUNS PAST THE OLD MILL", "mid")
    assert first.dtype == np.float32 and 1.0 < len(first) / 16_000 < 5.0
    assert np.array_equal(first, synth.synthesize("THE RIVER RUNS PAST THE OLD MILL", "mid"))
    other = synth.synthesize("SHE SEES SIX SILLY SHEEP", "mid")
    openness_a, spread_a = mouth_features(first)
    openness_b, spread_b = mouth_features(other)
    assert abs(spread_a[openness_a > 0.3].mean() - spread_b[openness_b > 0.3].mean()) > 0.05
    low, high = (synth.synthesize("A MAN", voice) for voice in ("low", "high"))
    assert not np.array_equal(low, high)


def test_training_clips_never_cycle_into_held_out_sentences(tmp_path):
    """Three times more training candidates than the pool holds: train cycles over its own part only (the
    first version wrapped around into the test and val sentences)."""
    sentences = [f"SENTENCE NUMBER {word} IS HERE" for word in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"] * 2
    sentences = [f"{s} {'X' * (i + 1)}" for i, s in enumerate(sentences)]  # 52 distinct
    params = CorpusParams(num_train=60, num_val=2, num_test=2, seed=3)
    jobs = _jobs(tmp_path, params, sentences, "builtin")
    held = {s for job in jobs if job.split != "train" for s in job.candidates}
    trained = {s for job in jobs if job.split == "train" for s in job.candidates}
    assert len(held) == 12 and not held & trained and len(trained) == len(sentences) - 12
    assert [job.split for job in jobs].count("train") == 60
