"""Whisper's log-mel spectrogram, computed in the model on the training device (no CPU preprocessing).

Same recipe as `transformers.WhisperFeatureExtractor` (and OpenAI's `log_mel_spectrogram`): 16 kHz, Hann
window, n_fft 400, hop 160, power spectrum, Slaney mel filters 0-8 kHz, log10 clamped at 1e-10, floor at
(per-clip max - 8), then (x + 4) / 4. One mel frame per 10 ms: a clip of S samples has S // 160 frames.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.audio_utils import mel_filter_bank


class WhisperLogMel(nn.Module):
    """audio [B,S] float32 in [-1,1] zero-padded, lengths [B] samples -> (mel [B,n_mels,T], frames [B]).

    Args:
        n_mels: 80 (Whisper up to large-v2) or 128 (large-v3).
        pad_to_samples: None = true length (T = max(S_b // hop)); 480000 = Whisper's 30 s window, where every
            clip is zero-padded to the window as in pretraining (T = 3000) and the max-8 floor spans the window.
    A padded row gives the same frames as the clip alone: the batch is padded by n_fft//2 extra zeros so no
    valid frame reaches the reflect padding of `torch.stft`, and the floor uses each clip's own frames.
    """

    def __init__(
        self,
        n_mels: int = 80,
        sample_rate: int = 16000,
        n_fft: int = 400,
        hop_length: int = 160,
        pad_to_samples: int | None = None,
    ):
        super().__init__()
        self.n_fft, self.hop_length, self.pad_to_samples = n_fft, hop_length, pad_to_samples
        filters = mel_filter_bank(
            num_frequency_bins=1 + n_fft // 2,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=sample_rate / 2,
            sampling_rate=sample_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        self.register_buffer(
            "mel_filters", torch.from_numpy(filters).float().T.contiguous(), persistent=False
        )
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Mel frames of each clip (before any window padding)."""
        return torch.div(lengths, self.hop_length, rounding_mode="floor")

    @torch.no_grad()
    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        samples = audio.shape[1] if self.pad_to_samples is None else self.pad_to_samples
        if audio.shape[1] > samples:
            raise ValueError(
                f"clips of {audio.shape[1]} samples exceed the {samples}-sample Whisper window; "
                "use the true-length encoder or shorter clips"
            )
        positions = torch.arange(audio.shape[1], device=audio.device)
        audio = audio.float() * (positions[None] < lengths[:, None])  # ignore anything past each clip
        frames = samples // self.hop_length
        audio = nn.functional.pad(audio, (0, samples - audio.shape[1] + self.n_fft // 2))
        stft = torch.stft(audio, self.n_fft, self.hop_length, window=self.window, return_complex=True)
        power = stft[..., :frames].abs() ** 2
        log_spec = torch.clamp(self.mel_filters @ power, min=1e-10).log10()  # [B, n_mels, frames]
        valid = (
            self.frame_lengths(lengths) if self.pad_to_samples is None else torch.full_like(lengths, frames)
        )
        in_clip = torch.arange(frames, device=audio.device)[None, None] < valid[:, None, None]
        clip_max = log_spec.masked_fill(~in_clip, float("-inf")).amax(dim=(1, 2), keepdim=True)
        log_spec = torch.maximum(log_spec, clip_max - 8.0)
        return (log_spec + 4.0) / 4.0, self.frame_lengths(lengths)
