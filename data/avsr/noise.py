"""Acoustic noise for AVSR robustness tables and augmentation: white noise, babble, mixing at an exact SNR.

- `mix_at_snr(clean [S], noise [S], snr_db)`: scales the noise so that 10*log10(P_clean / P_noise) is
  exactly `snr_db` (P = mean square over the clip), then adds it.
- `white_noise(n, generator)`: unit-variance Gaussian samples.
- `babble_noise(sources, n, talkers, generator)`: the sum of `talkers` excerpts of other utterances, each
  scaled to unit power before summing (so no talker dominates), tiled when shorter than `n`.
- `NoiseCondition(kind, snr_db)`: one column of the robustness table ("clean", "babble 0 dB", "white 5 dB").
- `clip_noise(...)`: the noise of one clip under one condition, drawn from a generator seeded by
  (seed, clip id, kind), so a clip gets the same noise whatever rank or batch decodes it, and only its
  level changes across SNRs.
- `BabbleNoise(sources, talkers)`: a picklable callable `n -> [n]` (torch's global RNG), for training
  augmentation through `data.avsr.transforms.AudioTransform(noise=...)`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from data.avsr.manifest import ManifestRow, resolve_clip_paths
from data.avsr.media_io import MediaError, read_audio

NOISE_KINDS = ("babble", "white")


def power(x: torch.Tensor) -> torch.Tensor:
    """Mean square of x [S] (float64 scalar)."""
    return x.double().pow(2).mean()


def mix_at_snr(clean: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """clean [S] + noise [S] scaled so that 10*log10(power(clean) / power(scaled noise)) == snr_db.

    A silent clip (or silent noise) is returned unchanged: no SNR is defined.
    """
    if clean.shape != noise.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and noise {tuple(noise.shape)} differ in shape")
    p_clean, p_noise = power(clean), power(noise)
    if p_clean == 0 or p_noise == 0:
        return clean.clone()
    scale = torch.sqrt(p_clean / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (clean.double() + scale * noise.double()).to(clean.dtype)


def white_noise(num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[num_samples] float32 standard normal samples."""
    return torch.randn(num_samples, generator=generator)


def _excerpt(source: torch.Tensor, num_samples: int, generator: torch.Generator | None) -> torch.Tensor:
    """A random excerpt of `num_samples` from source [N], tiled when N is shorter."""
    repeats = -(-num_samples // source.numel()) + 1
    tiled = source.repeat(repeats)
    start = int(torch.randint(0, tiled.numel() - num_samples + 1, (), generator=generator))
    return tiled[start : start + num_samples]


def babble_noise(
    sources: Sequence[torch.Tensor],
    num_samples: int,
    talkers: int = 6,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[num_samples] sum of `talkers` unit-power excerpts of distinct sources (all of them if fewer)."""
    usable = [s for s in sources if s.numel() > 0 and power(s) > 0]
    if not usable:
        raise ValueError("babble noise needs at least one non-silent source utterance")
    chosen = torch.randperm(len(usable), generator=generator)[: min(talkers, len(usable))].tolist()
    babble = torch.zeros(num_samples, dtype=torch.float64)
    for index in chosen:
        part = _excerpt(usable[index].double(), num_samples, generator)
        babble += part / torch.sqrt(power(part)).clamp_min(1e-12)
    return babble.float()


@dataclass(frozen=True)
class NoiseCondition:
    """kind: None (clean) | "babble" | "white"; snr_db: the SNR of the mix (ignored when clean)."""

    kind: str | None = None
    snr_db: float | None = None

    @property
    def name(self) -> str:
        if self.kind is None:
            return "clean"
        return f"{self.kind} {self.snr_db:g} dB"


def noise_conditions(
    kinds: Sequence[str], snr_db: Sequence[float], clean: bool = True
) -> list[NoiseCondition]:
    """clean first (when asked), then every kind at every SNR, in the given order."""
    unknown = [kind for kind in kinds if kind not in NOISE_KINDS]
    if unknown:
        raise ValueError(f"noise.kinds: unknown {unknown}; choose from {list(NOISE_KINDS)}")
    conditions = [NoiseCondition()] if clean else []
    conditions += [NoiseCondition(kind, float(snr)) for kind in kinds for snr in snr_db]
    if not conditions:
        raise ValueError("no evaluation condition: set noise.clean=true or give noise.kinds and noise.snr_db")
    return conditions


def clip_seed(seed: int, clip_id: str, kind: str) -> int:
    """A 63-bit seed from (seed, clip id, kind), stable across processes (not Python's salted hash)."""
    digest = hashlib.sha256(f"{seed}|{clip_id}|{kind}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def clip_noise(
    condition: NoiseCondition,
    clip_id: str,
    num_samples: int,
    seed: int = 0,
    babble_sources: Sequence[tuple[str, torch.Tensor]] = (),
    talkers: int = 6,
) -> torch.Tensor:
    """The noise [num_samples] of one clip under `condition`; babble never uses the clip's own audio."""
    generator = torch.Generator().manual_seed(clip_seed(seed, clip_id, condition.kind or "clean"))
    if condition.kind == "white":
        return white_noise(num_samples, generator)
    if condition.kind == "babble":
        others = [audio for source_id, audio in babble_sources if source_id != clip_id]
        return babble_noise(others, num_samples, talkers, generator)
    raise ValueError(f"no noise for condition {condition.name!r}")


def load_babble_sources(
    root: Path, rows: Sequence[ManifestRow], count: int, seed: int = 0
) -> list[tuple[str, torch.Tensor]]:
    """(clip id, waveform [S]) of up to `count` readable clips of `rows`, picked reproducibly by `seed`."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    sources = []
    for index in order:
        if len(sources) >= count:
            break
        row = rows[index]
        path = resolve_clip_paths(Path(root), row).audio
        try:
            audio = read_audio(path) if path.is_file() else None
        except MediaError:
            audio = None
        if audio is not None and audio.numel() > 0 and power(audio) > 0:
            sources.append((row.rel_path, audio))
    return sources


class BabbleNoise:
    """Training augmentation: `BabbleNoise(sources, talkers)(n)` -> [n] babble from torch's global RNG."""

    def __init__(self, sources: Sequence[torch.Tensor], talkers: int = 6):
        if not sources:
            raise ValueError("BabbleNoise needs at least one source utterance")
        self.sources, self.talkers = list(sources), talkers

    def __call__(self, num_samples: int) -> torch.Tensor:
        return babble_noise(self.sources, num_samples, self.talkers)
