"""AV-HuBERT's audio front end on the training device: 26 log filterbanks every 10 ms, 4 frames stacked.

AV-HuBERT (`avhubert/hubert_dataset.py`) computes `python_speech_features.logfbank` on the int16 wav, stacks
4 consecutive frames (104 features at 25 Hz, zero-filling the last group) and, with `task.normalize` (true
for every released model), layer-normalises each stacked frame over its 104 features. This module does the
same in torch, batched and length-aware. logfbank's own recipe (not torchaudio's mel filters, which are
continuous triangles; logfbank's are built on integer FFT bins):
pre-emphasis 0.97; 25 ms frames every 10 ms, rectangular window, the last frame zero-filled; power spectrum
|rfft_512|^2 / 512; 26 triangular mel filters (HTK mel, 0..8 kHz) on FFT bins floor(513 * f / 16000);
exact zeros floored at float64 eps; natural log.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms
FRAME_STEP = 160  # 10 ms
NFFT = 512
NUM_FILTERS = 26
PREEMPHASIS = 0.97
STACK = 4  # 4 x 10 ms = one 40 ms video frame
INT16_SCALE = 32768.0  # AV-HuBERT reads int16 wavs; our audio is float in [-1, 1]
EPS = float(torch.finfo(torch.float64).eps)


def hz_to_mel(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: float) -> float:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def logfbank_filters(
    num_filters: int = NUM_FILTERS, nfft: int = NFFT, sample_rate: int = SAMPLE_RATE
) -> torch.Tensor:
    """[num_filters, nfft // 2 + 1] triangular filters on integer FFT bins (python_speech_features)."""
    low, high = hz_to_mel(0.0), hz_to_mel(sample_rate / 2)
    mels = [low + (high - low) * i / (num_filters + 1) for i in range(num_filters + 2)]
    bins = [math.floor((nfft + 1) * mel_to_hz(m) / sample_rate) for m in mels]
    filters = torch.zeros(num_filters, nfft // 2 + 1, dtype=torch.float64)
    for j in range(num_filters):
        left, centre, right = bins[j], bins[j + 1], bins[j + 2]
        for i in range(left, centre):
            filters[j, i] = (i - left) / (centre - left)
        for i in range(centre, right):
            filters[j, i] = (right - i) / (right - centre)
    return filters


def logfbank_frames(samples: torch.Tensor) -> torch.Tensor:
    """Frames logfbank makes of a clip of `samples` samples: 1 if <= 400, else 1 + ceil((S - 400) / 160)."""
    extra = torch.clamp(samples - FRAME_LENGTH, min=0)
    return 1 + torch.div(extra + FRAME_STEP - 1, FRAME_STEP, rounding_mode="floor")


def stacked_frames(samples: torch.Tensor) -> torch.Tensor:
    """Stacked (25 Hz) frames of clips of `samples` samples: ceil(logfbank frames / 4)."""
    return torch.div(logfbank_frames(samples) + STACK - 1, STACK, rounding_mode="floor")


class StackedLogFilterbank(nn.Module):
    """audio [B,S] float in [-1,1] at 16 kHz, lengths [B] samples -> (features [B,T,104], lengths [B]).

    T = ceil(logfbank frames / 4) of the longest clip; each row equals its clip processed alone (pre-emphasis,
    framing and stacking stop at the clip's end); features past a clip's length are zero.
    Args:
        normalize: per-frame layer norm over the 104 features (AV-HuBERT's `task.normalize`, true for the
            released checkpoints).
    """

    def __init__(self, normalize: bool = True):
        super().__init__()
        self.normalize = normalize
        self.output_dim = NUM_FILTERS * STACK
        self.register_buffer("filters", logfbank_filters().to(torch.float32), persistent=False)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = audio.shape
        x = audio.to(torch.float32) * INT16_SCALE
        valid = torch.arange(s, device=x.device)[None] < lengths[:, None]
        x = x * valid
        x = torch.cat([x[:, :1], x[:, 1:] - PREEMPHASIS * x[:, :-1]], dim=1) * valid
        frames = logfbank_frames(lengths)  # [B]
        most = int(frames.max().item()) if b else 0
        padded = (most - 1) * FRAME_STEP + FRAME_LENGTH
        x = nn.functional.pad(x, (0, max(0, padded - s)))[:, :padded]
        windows = x.unfold(1, FRAME_LENGTH, FRAME_STEP)  # [B, most, 400]
        power = torch.fft.rfft(windows, n=NFFT).abs().pow(2) / NFFT
        energies = power @ self.filters.float().T  # [B, most, 26]
        logs = torch.log(torch.where(energies == 0, torch.full_like(energies, EPS), energies))
        keep = torch.arange(most, device=x.device)[None] < frames[:, None]
        logs = logs * keep[..., None]
        groups = -(-most // STACK)
        logs = nn.functional.pad(logs, (0, 0, 0, groups * STACK - most))
        stacked = logs.reshape(b, groups, STACK * NUM_FILTERS)
        if self.normalize:
            stacked = nn.functional.layer_norm(stacked, (stacked.shape[-1],))
        out_lengths = stacked_frames(lengths)
        keep = torch.arange(groups, device=x.device)[None] < out_lengths[:, None]
        return stacked * keep[..., None], out_lengths
