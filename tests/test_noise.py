"""Acoustic noise: exact SNR for white and babble noise, reproducible per clip, training augmentation."""

import numpy as np
import pytest
import torch

from data.avsr.datamodule import AVSRDataModule
from data.avsr.manifest import ManifestRow, write_manifest
from data.avsr.media_io import SAMPLES_PER_VIDEO_FRAME, write_audio, write_video
from data.avsr.noise import (
    BabbleNoise,
    NoiseCondition,
    babble_noise,
    clip_noise,
    load_babble_sources,
    mix_at_snr,
    noise_conditions,
)
from data.avsr.transforms import AudioTransform


def measured_snr(clean: torch.Tensor, noisy: torch.Tensor) -> float:
    """10 log10 of the power ratio of the clean signal to what was added."""
    noise = noisy.double() - clean.double()
    return float(10 * torch.log10(clean.double().pow(2).mean() / noise.pow(2).mean()))


def speechlike(seed: int, samples: int = 16_000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16_000
    envelope = 0.5 + 0.5 * torch.sin(2 * torch.pi * 3 * t)
    return 0.3 * envelope * torch.sin(2 * torch.pi * (120 + 40 * seed) * t) + 0.01 * torch.randn(
        samples, generator=generator
    )


@pytest.mark.parametrize("kind", ["white", "babble"])
@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 5.0, 10.0])
def test_mixing_reaches_the_snr_exactly(kind, snr_db):
    clean = speechlike(0)
    sources = [(f"other_{i}", speechlike(i + 1, 9_000)) for i in range(4)]
    noise = clip_noise(NoiseCondition(kind, snr_db), "target", clean.numel(), 7, sources, talkers=3)
    noisy = mix_at_snr(clean, noise, snr_db)
    assert measured_snr(clean, noisy) == pytest.approx(snr_db, abs=1e-4)


def test_clip_noise_is_reproducible_per_clip_and_only_its_level_changes_with_snr():
    sources = [(f"c{i}", speechlike(i, 8_000)) for i in range(5)]
    first = clip_noise(NoiseCondition("babble", 0.0), "c0", 12_000, 3, sources)
    again = clip_noise(NoiseCondition("babble", 10.0), "c0", 12_000, 3, sources)
    other = clip_noise(NoiseCondition("babble", 0.0), "c1", 12_000, 3, sources)
    assert torch.equal(first, again)  # the SNR only rescales it at mixing time
    assert not torch.allclose(first, other)
    white = clip_noise(NoiseCondition("white", 0.0), "c0", 12_000, 3)
    assert torch.equal(white, clip_noise(NoiseCondition("white", 5.0), "c0", 12_000, 3))


def test_babble_never_uses_the_clip_itself_and_sums_unit_power_talkers():
    loud_self = ("me", torch.full((4_000,), 100.0))
    quiet = [("a", torch.ones(4_000)), ("b", -torch.ones(4_000))]
    noise = clip_noise(NoiseCondition("babble", 0.0), "me", 4_000, 0, [loud_self, *quiet], talkers=5)
    # only a (+1) and b (-1), each at unit power: they cancel; the loud clip itself would not
    assert noise.abs().max() == pytest.approx(0.0, abs=1e-6)
    single = babble_noise([torch.full((10,), 3.0)], 25, talkers=1)
    assert torch.allclose(single, torch.ones(25))  # tiled and scaled to unit power


def test_conditions_are_named_like_the_robustness_table():
    names = [c.name for c in noise_conditions(["babble", "white"], [-5, 0])]
    assert names == ["clean", "babble -5 dB", "babble 0 dB", "white -5 dB", "white 0 dB"]
    with pytest.raises(ValueError, match="noise.kinds"):
        noise_conditions(["pink"], [0])


def test_silent_clip_stays_silent():
    silent = torch.zeros(100)
    assert torch.equal(mix_at_snr(silent, torch.randn(100), 0.0), silent)


def test_babble_augmentation_transform_and_datamodule_key(tmp_path):
    torch.manual_seed(0)
    clean = speechlike(0)
    transform = AudioTransform(
        noise_snr_db=[5.0], noise_probability=1.0, noise=BabbleNoise([speechlike(3)], 1)
    )
    assert measured_snr(clean, transform(clean)) == pytest.approx(5.0, abs=1e-3)

    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        stem = tmp_path / f"clips/{i}"
        write_video(stem.with_suffix(".mp4"), rng.integers(0, 255, (5, 96, 96, 3), dtype=np.uint8))
        write_audio(stem.with_suffix(".wav"), 0.3 * rng.standard_normal(5 * SAMPLES_PER_VIDEO_FRAME))
        rows.append(ManifestRow("lrs3", f"clips/{i}.mp4", 5, f"WORD {i}"))
    rows.append(ManifestRow("lrs3", "clips/missing.mp4", 5, "GONE"))
    write_manifest(tmp_path / "labels/train.csv", rows)
    assert [cid for cid, _ in load_babble_sources(tmp_path, rows, 10)] != []
    assert len(load_babble_sources(tmp_path, rows, 10)) == 3  # the missing clip is left out
    options = dict(root=str(tmp_path), max_frames=100, max_duration_s=2.0, num_workers=0)
    off = AVSRDataModule(**options, noise_kind="babble")._transforms("train")[1]
    assert off.noise is None  # noise_probability 0: nothing is loaded
    on = AVSRDataModule(**options, noise_kind="babble", noise_probability=1.0, noise_babble_talkers=2)
    audio_transform = on._transforms("train")[1]
    assert isinstance(audio_transform.noise, BabbleNoise) and len(audio_transform.noise.sources) == 3
    with pytest.raises(ValueError, match="data.noise_kind"):
        AVSRDataModule(**options, noise_kind="pink")
