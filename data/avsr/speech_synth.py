"""Text-to-speech for the synthetic corpus: Debian flite, else espeak-ng, else a built-in formant synthesiser.

Every synthesiser returns float32 mono [S] at 16 kHz, peak-normalised to 0.8, and is deterministic for a
given (text, voice).
"""

import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Protocol

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16_000
PEAK = 0.8


class SpeechSynthesizer(Protocol):
    name: str
    voices: tuple[str, ...]

    def synthesize(self, text: str, voice: str) -> np.ndarray: ...


def _finish(waveform: np.ndarray, sample_rate: int) -> np.ndarray:
    waveform = np.asarray(waveform, dtype=np.float32).reshape(len(waveform), -1).mean(axis=1)
    if sample_rate != SAMPLE_RATE:
        waveform = AF.resample(torch.from_numpy(waveform), sample_rate, SAMPLE_RATE).numpy()
    peak = float(np.abs(waveform).max(initial=0.0))
    return (waveform * (PEAK / peak) if peak > 0 else waveform).astype(np.float32)


class _CommandLineSynthesizer:
    """Runs a TTS program that writes a wav file, and reads it back."""

    name = ""
    voices: tuple[str, ...] = ()

    def command(self, text: str, voice: str, wav_path: str) -> list[str]:
        raise NotImplementedError

    def synthesize(self, text: str, voice: str) -> np.ndarray:
        with tempfile.TemporaryDirectory(prefix="tts-") as folder:
            wav_path = str(Path(folder) / "speech.wav")
            subprocess.run(self.command(text, voice, wav_path), check=True, capture_output=True, timeout=60)
            waveform, sample_rate = soundfile.read(wav_path, dtype="float32")
        return _finish(waveform, sample_rate)


class FliteSynthesizer(_CommandLineSynthesizer):
    name = "flite"
    voices = ("slt", "rms", "awb", "kal16")

    def command(self, text: str, voice: str, wav_path: str) -> list[str]:
        return ["flite", "-voice", voice, "-t", text.lower(), "-o", wav_path]


class EspeakSynthesizer(_CommandLineSynthesizer):
    name = "espeak-ng"
    voices = ("en-us", "en-gb", "en-us+f3", "en-gb+m3")

    def command(self, text: str, voice: str, wav_path: str) -> list[str]:
        return ["espeak-ng", "-v", voice, "-s", "150", "-w", wav_path, text.lower()]


# Letter -> (kind, F1, F2, noise centre Hz). Kinds: vowel, sonorant (voiced, weak), fricative (noise),
# voiced_fricative (noise + voicing), stop (closure then burst).
_PHONES = {
    "A": ("vowel", 730, 1090, 0), "E": ("vowel", 530, 1840, 0), "I": ("vowel", 270, 2290, 0),
    "O": ("vowel", 570, 840, 0), "U": ("vowel", 300, 870, 0), "Y": ("vowel", 300, 2200, 0),
    "M": ("sonorant", 250, 1000, 0), "N": ("sonorant", 250, 1700, 0), "L": ("sonorant", 360, 1300, 0),
    "R": ("sonorant", 420, 1300, 0), "W": ("sonorant", 300, 610, 0),
    "S": ("fricative", 0, 0, 5500), "C": ("fricative", 0, 0, 4500), "F": ("fricative", 0, 0, 3500),
    "H": ("fricative", 0, 0, 1500), "X": ("fricative", 0, 0, 4000),
    "Z": ("voiced_fricative", 250, 1700, 5000), "V": ("voiced_fricative", 250, 1200, 3000),
    "J": ("voiced_fricative", 250, 2000, 2500),
    "P": ("stop", 0, 0, 800), "B": ("stop", 0, 0, 600), "T": ("stop", 0, 0, 4000),
    "D": ("stop", 0, 0, 3000), "K": ("stop", 0, 0, 2000), "G": ("stop", 0, 0, 1700), "Q": ("stop", 0, 0, 2000),
}  # fmt: skip
_DURATION_S = {"vowel": 0.11, "sonorant": 0.07, "fricative": 0.09, "voiced_fricative": 0.08, "stop": 0.07}
_VOICING = {"vowel": 1.0, "sonorant": 0.45, "fricative": 0.0, "voiced_fricative": 0.3, "stop": 0.0}
_NOISE = {"vowel": 0.0, "sonorant": 0.0, "fricative": 0.35, "voiced_fricative": 0.2, "stop": 0.5}


class FormantSynthesizer:
    """Built-in letter-to-sound synthesiser: harmonics of a glottal pitch contour shaped by two formants
    that glide between per-letter targets, plus band-passed noise for fricatives and stop bursts.
    Not natural speech, but deterministic and different for every sentence. Voices set the pitch."""

    name = "builtin"
    voices = ("low", "mid", "high")
    _PITCH_HZ = {"low": 105.0, "mid": 150.0, "high": 210.0}
    _STEP = 80  # control-rate hop in samples (5 ms)

    def _segments(self, text: str, rng: np.random.Generator) -> list[tuple[str, float, float, float, int]]:
        segments = [("silence", 0.0, 0.0, 0.0, int(0.05 * SAMPLE_RATE))]
        for char in text.upper():
            if char in _PHONES:
                kind, f1, f2, centre = _PHONES[char]
                duration = _DURATION_S[kind] * rng.uniform(0.85, 1.15)
                segments.append((kind, f1, f2, centre, int(duration * SAMPLE_RATE)))
            elif char == " ":
                segments.append(("silence", 0.0, 0.0, 0.0, int(rng.uniform(0.04, 0.09) * SAMPLE_RATE)))
        return segments

    def synthesize(self, text: str, voice: str) -> np.ndarray:
        rng = np.random.default_rng(zlib.crc32(f"{voice}|{text}".encode()))
        segments = self._segments(text, rng)
        lengths = np.array([segment[-1] for segment in segments])
        total = int(lengths.sum())
        kind_of = np.repeat([segment[0] for segment in segments], lengths)
        voicing = np.array([_VOICING.get(kind, 0.0) for kind in kind_of], dtype=np.float64)
        noise_gain = np.array([_NOISE.get(kind, 0.0) for kind in kind_of], dtype=np.float64)
        # formant targets, held through silences and unvoiced sounds, then smoothed into glides
        f1 = np.repeat([segment[1] or np.nan for segment in segments], lengths)
        f2 = np.repeat([segment[2] or np.nan for segment in segments], lengths)
        for track, neutral in ((f1, 500.0), (f2, 1500.0)):
            valid = ~np.isnan(track)
            track[:] = (
                np.interp(np.arange(total), np.flatnonzero(valid), track[valid]) if valid.any() else neutral
            )
        kernel = np.hanning(2 * 480 + 1) / np.hanning(2 * 480 + 1).sum()  # 30 ms glides
        f1, f2 = (np.convolve(track, kernel, mode="same") for track in (f1, f2))
        voicing = np.convolve(voicing, np.hanning(161) / np.hanning(161).sum(), mode="same")
        # pitch: declining contour with a gentle per-sentence wobble
        time_s = np.arange(total) / SAMPLE_RATE
        f0 = self._PITCH_HZ[voice] * (1.1 - 0.2 * time_s / max(time_s[-1], 1e-3))
        f0 *= 1 + 0.05 * np.sin(2 * np.pi * rng.uniform(1.5, 3.0) * time_s + rng.uniform(0, 2 * np.pi))
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        control = slice(None, None, self._STEP)
        voiced = np.zeros(total)
        for harmonic in range(1, int(4000 / f0.min()) + 1):
            frequency = harmonic * f0[control]
            gain = 1 / (1 + ((frequency - f1[control]) / 90) ** 2) + 0.6 / (
                1 + ((frequency - f2[control]) / 120) ** 2
            )
            gain = np.interp(np.arange(total), np.arange(0, total, self._STEP), gain / harmonic**0.5)
            voiced += gain * np.sin(harmonic * phase)
        waveform = voicing * voiced / 4 + self._noise(kind_of, segments, lengths, noise_gain, rng)
        return _finish(waveform, SAMPLE_RATE)

    @staticmethod
    def _noise(kind_of, segments, lengths, noise_gain, rng) -> np.ndarray:
        """Band-passed white noise per fricative/stop segment (stops: 25 ms burst after a closure)."""
        noise = np.zeros(len(kind_of))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for (kind, _, _, centre, length), start in zip(segments, starts):
            if not centre:
                continue
            burst = min(length, int(0.025 * SAMPLE_RATE)) if kind == "stop" else length
            offset = start + (length - burst if kind == "stop" else 0)
            spectrum = np.fft.rfft(rng.standard_normal(burst))
            bins = np.fft.rfftfreq(burst, 1 / SAMPLE_RATE)
            spectrum *= np.exp(-0.5 * ((bins - centre) / (0.3 * centre)) ** 2)
            band = np.fft.irfft(spectrum, n=burst) * np.hanning(burst)
            noise[offset : offset + burst] = band / (np.abs(band).max() + 1e-9)
        return noise * noise_gain


SYNTHESIZERS = {"flite": FliteSynthesizer, "espeak-ng": EspeakSynthesizer, "builtin": FormantSynthesizer}


def synthesizer_name(preference: str = "auto") -> str:
    """Resolve "auto" to the best installed synthesiser; check that a named one is usable."""
    if preference == "auto":
        return next((name for name in ("flite", "espeak-ng") if shutil.which(name)), "builtin")
    if preference not in SYNTHESIZERS:
        raise ValueError(f"unknown synthesizer {preference!r}; choose auto or one of {sorted(SYNTHESIZERS)}")
    if preference != "builtin" and not shutil.which(preference):
        raise FileNotFoundError(f"synthesizer {preference!r} is not installed")
    return preference


def make_synthesizer(preference: str = "auto") -> SpeechSynthesizer:
    return SYNTHESIZERS[synthesizer_name(preference)]()
