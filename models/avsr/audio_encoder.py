"""Whisper's encoder as the AVSR audio front end: raw 16 kHz audio in, one 20 ms feature per frame out.

Two ways to run it (`true_length`):
- False: Whisper's pretraining setting. Every clip is padded to the 30 s window (3000 mel frames, 1500
  outputs) and `transformers.WhisperEncoder` runs unchanged; outputs past each clip are then dropped.
- True: only the clip's own frames are encoded (conv1/conv2, the first positions of `embed_positions`, the
  layers with a padding-aware attention mask, the final LayerNorm). Much faster on short clips, and the
  padded-silence frames (which carry Whisper's massive activations) never exist; the price is a small
  train/test mismatch with pretraining, where every clip saw 30 s of context. See docs/avsr.md.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from models.avsr.whisper_frontend import WhisperLogMel
from models.causal_lm import resolve_dtype
from models.whisper_ct2 import convert_ct2_whisper, wheel_files


class WhisperAudioEncoder(nn.Module):
    """forward(audio [B,S] float 16 kHz zero-padded, lengths [B] samples) -> (features [B,N,D], lengths [B]).

    N = ceil(max frames / 2) with frames = samples // 160 (one feature per 20 ms); D = d_model
    (`output_dim`). Features past a clip's length are zero.
    """

    def __init__(self, encoder: WhisperEncoder, true_length: bool = False, frozen: bool = True):
        super().__init__()
        self.encoder = encoder
        self.true_length, self.frozen = true_length, frozen
        config = encoder.config
        self.output_dim = config.d_model
        self.window_frames = config.max_source_positions * 2  # mel frames of the 30 s window (3000)
        self.frontend = WhisperLogMel(
            n_mels=config.num_mel_bins,
            pad_to_samples=None if true_length else self.window_frames * 160,
        )
        if frozen:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # no dropout in a frozen encoder
        return self

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mel, frames = self.frontend(audio, lengths)
        out_lengths = torch.div(frames + 1, 2, rounding_mode="floor")  # conv2 has stride 2
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            mel = mel.to(self.encoder.conv1.weight.dtype)
            if self.true_length:
                features = encode_true_length(self.encoder, mel, frames)
            else:
                features = self.encoder(input_features=mel).last_hidden_state
        features = features[:, : int(out_lengths.max().item())]
        keep = torch.arange(features.shape[1], device=features.device)[None, :] < out_lengths[:, None]
        return features * keep[..., None].to(features.dtype), out_lengths


def encode_true_length(encoder: WhisperEncoder, mel: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """Run a `WhisperEncoder` on unpadded clips: mel [B,n_mels,T], frames [B] -> [B,ceil(T/2),D].

    Each row equals the same clip encoded alone: mel and conv1 outputs past the clip are zeroed (what the
    convolutions' zero padding sees for a lone clip), and attention ignores positions past the clip.
    """
    steps = torch.arange(mel.shape[-1], device=mel.device)
    mel = mel * (steps[None] < frames[:, None])[:, None]
    hidden = nn.functional.gelu(encoder.conv1(mel))
    hidden = hidden * (steps[None] < frames[:, None])[:, None]
    hidden = nn.functional.gelu(encoder.conv2(hidden)).permute(0, 2, 1)  # [B, N, D]
    num = hidden.shape[1]
    if num > encoder.embed_positions.num_embeddings:
        raise ValueError(
            f"{num} encoder frames exceed Whisper's {encoder.embed_positions.num_embeddings} positions "
            "(30 s); split longer clips"
        )
    hidden = hidden + encoder.embed_positions.weight[:num]
    hidden = nn.functional.dropout(hidden, p=encoder.dropout, training=encoder.training)
    valid = (
        torch.arange(num, device=mel.device)[None] < torch.div(frames + 1, 2, rounding_mode="floor")[:, None]
    )
    additive = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device)
    additive = additive.masked_fill(~valid, torch.finfo(hidden.dtype).min)[:, None, None, :]  # [B,1,1,N]
    for layer in encoder.layers:
        hidden = layer(hidden, additive)
    return encoder.layer_norm(hidden)


def load_whisper_encoder(
    source: str,
    true_length: bool = False,
    frozen: bool = True,
    dtype: str = "fp32",
    attn_implementation: str = "sdpa",
) -> WhisperAudioEncoder:
    """Whisper encoder from a hub id (`openai/whisper-medium`) or a local HF folder; the decoder is dropped."""
    model = WhisperModel.from_pretrained(
        source, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
    )
    return WhisperAudioEncoder(model.get_encoder(), true_length=true_length, frozen=frozen)


def ensure_converted_whisper(
    name: str = "tiny.en", cache_dir: str | Path = "artifacts/models/whisper-tiny.en"
) -> Path:
    """Convert an offline wheel's CTranslate2 Whisper into an HF folder once; later calls reuse it.

    Conversion goes to a temporary sibling folder renamed into place, so concurrent ranks or an interrupted
    run never leave a half-written folder behind.
    """
    cache_dir = Path(cache_dir).expanduser()
    if (cache_dir / "config.json").exists() and (cache_dir / "model.safetensors").exists():
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-", dir=cache_dir.parent))
    try:
        convert_ct2_whisper(wheel_files(name), staging)
        try:
            staging.rename(cache_dir)
        except OSError:
            if not (cache_dir / "model.safetensors").exists():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache_dir


def load_offline_whisper_encoder(
    name: str = "tiny.en", cache_dir: str | Path = "artifacts/models/whisper-tiny.en", **kwargs
) -> WhisperAudioEncoder:
    """The embedded default: a real Whisper from the offline wheels, converted on first use (idempotent)."""
    return load_whisper_encoder(str(ensure_converted_whisper(name, cache_dir)), **kwargs)
