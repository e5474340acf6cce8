"""Tiny random-weight encoders of the real architectures, for tests and `debug=smoke` runs (seconds on CPU)."""

from __future__ import annotations

import torch
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from models.avsr.audio_encoder import WhisperAudioEncoder
from models.avsr.avhubert_encoder import AVHubertEncoder, build_avhubert_encoder
from models.avsr.video_encoder import ResNet18VideoEncoder


def tiny_whisper_config(
    d_model: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_source_positions: int = 1500,
    num_mel_bins: int = 80,
) -> WhisperConfig:
    """A 2-layer, 32-wide Whisper; `max_source_positions` 1500 keeps the real 30 s window."""
    return WhisperConfig(
        vocab_size=51864,
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=1,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        max_source_positions=max_source_positions,
        max_target_positions=32,
    )


def build_tiny_whisper_encoder(
    true_length: bool = True, frozen: bool = True, seed: int = 0, **config_overrides
) -> WhisperAudioEncoder:
    """Random tiny Whisper encoder wrapped like the real one (same frontend and true-length path)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = WhisperEncoder(tiny_whisper_config(**config_overrides))
    return WhisperAudioEncoder(encoder.eval(), true_length=true_length, frozen=frozen)


def build_tiny_audio_encoder(
    true_length: bool = True, frozen: bool = True, seed: int = 0, family: str = "whisper"
) -> WhisperAudioEncoder | AVHubertEncoder:
    """The tiny Whisper encoder, or for `family` avhubert the tiny AV-HuBERT on audio (`smoke_encoders.audio`)."""
    if family == "avhubert":
        return build_avhubert_encoder(size="tiny", modality="audio", frozen=frozen, seed=seed)
    if family != "whisper":
        raise ValueError(f"unknown tiny audio encoder family {family!r} (`smoke_encoders.audio`)")
    return build_tiny_whisper_encoder(true_length=true_length, frozen=frozen, seed=seed)


def build_tiny_video_encoder(
    base_channels: int = 4,
    temporal_layers: int = 0,
    frozen: bool = False,
    seed: int = 0,
    family: str = "resnet18",
    lora: dict | None = None,
) -> ResNet18VideoEncoder | AVHubertEncoder:
    """ResNet-18 lip encoder with C=4 channels (output 32-d per frame), or, for `family` avhubert
    (avhubert_audiovisual: fed by both streams), the 2-layer 32-wide AV-HuBERT (`debug=smoke` of experiments
    that set `smoke_encoders.video`; `lora` as the real one's, so smoke runs train the encoder's LoRA too)."""
    if family in ("avhubert", "avhubert_audiovisual"):
        modality = "audiovisual" if family == "avhubert_audiovisual" else "video"
        return build_avhubert_encoder(size="tiny", modality=modality, frozen=frozen, lora=lora, seed=seed)
    if family != "resnet18":
        raise ValueError(f"unknown tiny video encoder family {family!r} (`smoke_encoders.video`)")
    if lora:
        raise ValueError("the ResNet-18 video encoder has no LoRA option (`video_encoder.lora` must be null)")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ResNet18VideoEncoder(
            base_channels=base_channels, temporal_layers=temporal_layers, temporal_heads=2, frozen=frozen
        )
