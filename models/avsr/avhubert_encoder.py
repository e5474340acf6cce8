"""AV-HuBERT as an AVSR encoder plug-in: video, audio or both in, one 1024-d (Large) feature per 40 ms out.

Slots (`conf/video_encoder/avhubert_*.yaml`, `conf/audio_encoder/avhubert_*.yaml`):
- `modality: video` (video slot): forward(video [B,F,1,88,88], lengths [B] frames) -> ([B,F,D], lengths).
- `modality: audio` (audio slot): forward(audio [B,S] 16 kHz, lengths [B] samples) -> ([B,T,D], lengths),
  T = ceil(logfbank frames / 4) (= F for audio cut to 640 samples per video frame, as the data module does).
- `modality: audiovisual` (video slot, one encoder for both streams, Llama-AVSR's `audiovisual_avhubert`
  with a single projector): forward(video, lengths, audio=, audio_lengths=) -> ([B,F,D], lengths); the
  audio features are cut or zero-padded to the video length as AV-HuBERT does. Run it with
  `model.modality=video data.modality=audiovisual` (the batch must carry audio; AVSRModel passes it to any
  encoder with `reads_audio_too`).
Optional LoRA (peft) on the transformer's attention projections (`lora: {r, alpha, dropout,
target_modules}`); the reference adapts q_proj and v_proj with r = 64, scaling 2 (alpha 128).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from models.avsr.avhubert import MODALITIES, AVHubertConfig, AVHubertModel
from models.avsr.avhubert_checkpoint import (
    config_from_settings,
    encoder_settings,
    encoder_state_dict,
    load_encoder_weights,
    load_fairseq_checkpoint,
)
from models.avsr.avhubert_frontend import StackedLogFilterbank
from models.causal_lm import resolve_dtype

log = logging.getLogger(__name__)


class AVHubertEncoder(nn.Module):
    """Args:
    cfg: the architecture; modality: video | audio | audiovisual (see the module docstring).
    normalize_audio: per-frame layer norm of the stacked filterbanks (the released models' setting).
    frozen: no gradients to the pre-trained weights and eval mode (no dropout, BatchNorm statistics kept);
        LoRA weights, when present, still train.
    output_layer: stop after this many transformer layers (1-based, as fairseq; null = all + final norm).
    lora: kwargs of `apply_encoder_lora` or None.
    """

    def __init__(
        self,
        cfg: AVHubertConfig,
        modality: str = "video",
        normalize_audio: bool = True,
        frozen: bool = True,
        output_layer: int | None = None,
        lora: Mapping | None = None,
    ):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"AV-HuBERT modality must be one of {MODALITIES}, got {modality!r}")
        self.modality, self.frozen, self.output_layer = modality, frozen, output_layer
        branches = ("audio", "video") if modality == "audiovisual" else (modality,)
        self.model = AVHubertModel(cfg, branches)
        self.audio_frontend = StackedLogFilterbank(normalize_audio) if "audio" in branches else None
        self.output_dim = cfg.encoder_embed_dim
        self.reads_audio_too = modality == "audiovisual"
        self.lora = dict(lora) if lora else None
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    def add_lora(self) -> None:
        """Inject the configured LoRA adapters (after the pre-trained weights are loaded)."""
        if self.lora:
            apply_encoder_lora(self.model.encoder, **self.lora)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.model.layer_norm.weight.dtype

    def _audio_features(
        self, audio: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        features, frames = self.audio_frontend(audio, lengths)
        return features.to(self.dtype), frames

    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        audio: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(trains):
            if self.modality == "audio":
                features, lengths = self._audio_features(x, lengths)
                valid = torch.arange(features.shape[1], device=x.device)[None] < lengths[:, None]
                out = self.model(valid, audio=features, num_layers=self.output_layer)
            else:
                b, f = x.shape[:2]
                valid = torch.arange(f, device=x.device)[None] < lengths[:, None]
                video = (x * valid[:, :, None, None, None].to(x.dtype)).to(self.dtype).transpose(1, 2)
                features = None
                if self.modality == "audiovisual":
                    if audio is None or audio_lengths is None:
                        raise ValueError(
                            "video_encoder.modality=audiovisual needs the audio stream in the batch: set "
                            "data.modality=audiovisual (and model.modality=video for one fused encoder)"
                        )
                    features, _ = self._audio_features(audio, audio_lengths)
                    features = nn.functional.pad(features, (0, 0, 0, max(0, f - features.shape[1])))[:, :f]
                    features = features * valid[..., None].to(features.dtype)
                out = self.model(valid, audio=features, video=video, num_layers=self.output_layer)
        return out * valid[..., None].to(out.dtype), lengths


def apply_encoder_lora(
    module: nn.Module,
    r: int = 64,
    alpha: float = 128,
    dropout: float = 0.0,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
) -> nn.Module:
    """peft LoRA on `module`'s attention projections in place; only the adapters train."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
    return inject_adapter_in_model(config, module)


def build_avhubert_encoder(
    size: str | None = "large",
    checkpoint: str | None = None,
    modality: str = "video",
    frozen: bool = True,
    lora: Mapping | None = None,
    output_layer: int | None = None,
    normalize_audio: bool | None = None,
    dtype: str = "fp32",
    seed: int = 0,
) -> AVHubertEncoder:
    """An AV-HuBERT encoder, from a fairseq checkpoint (`checkpoint=<.pt>`) or random (`size` preset).

    With a checkpoint its own configuration decides the architecture; `size` (base | large | tiny | null)
    must then agree with it, so `video_encoder=avhubert_large` cannot silently run a Base file.
    `normalize_audio` null = the checkpoint's `task.normalize` (true without a checkpoint).
    """
    if checkpoint is None:
        if size is None:
            raise ValueError("set `video_encoder.size` (base | large | tiny) or `video_encoder.checkpoint`")
        cfg = AVHubertConfig.preset(size)
        log.warning("AV-HuBERT %s with random weights (no `checkpoint` given)", size)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            encoder = AVHubertEncoder(cfg, modality, normalize_audio is not False, frozen, output_layer, lora)
    else:
        state = load_fairseq_checkpoint(checkpoint)
        settings, task, prefix = encoder_settings(state)
        cfg = config_from_settings(settings, state["model"], prefix)
        check_size(cfg, size, checkpoint)
        if int(task.get("stack_order_audio", 4)) != 4:
            raise ValueError(
                f"{checkpoint}: stack_order_audio {task['stack_order_audio']} (only 4 is supported)"
            )
        if normalize_audio is None:
            normalize_audio = bool(task.get("normalize", True))
        encoder = AVHubertEncoder(cfg, modality, normalize_audio, frozen, output_layer, lora)
        weights, ignored = encoder_state_dict(state["model"], prefix, encoder.model.modalities)
        load_encoder_weights(encoder.model, weights, str(checkpoint))
        log.info(
            "AV-HuBERT %d x %d from %s (%d tensors; %d left out: decoder, pre-training heads, unused branch)",
            cfg.encoder_layers,
            cfg.encoder_embed_dim,
            checkpoint,
            len(weights),
            len(ignored),
        )
    encoder.add_lora()
    return encoder.to(resolve_dtype(dtype))


def check_size(cfg: AVHubertConfig, size: str | None, checkpoint: str | Path) -> None:
    """Fail when the checkpoint's architecture is not the configured preset's."""
    if size is None:
        return
    want = AVHubertConfig.preset(size)
    got = (cfg.encoder_layers, cfg.encoder_embed_dim)
    if got != (want.encoder_layers, want.encoder_embed_dim):
        raise ValueError(
            f"{checkpoint} holds an AV-HuBERT with {got[0]} layers x {got[1]}, but the config says "
            f"size={size} ({want.encoder_layers} x {want.encoder_embed_dim}): pick the matching "
            "video_encoder=avhubert_base|avhubert_large, or video_encoder.size=null to take the checkpoint's"
        )
