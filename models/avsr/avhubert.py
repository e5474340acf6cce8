"""AV-HuBERT (Shi et al. 2022) in plain PyTorch: the encoder of `avhubert/hubert.py` without fairseq.

    video [B,1,F,88,88] -> 3D conv + ResNet-18 (512 per frame) -> Linear -> D     (feature_extractor_video)
    audio [B,F,104] stacked log filterbanks                     -> Linear -> D     (feature_extractor_audio)
    concat [audio ; video] (a missing modality is zeros) -> LayerNorm(2D) -> Linear(2D, D) (post_extract_proj)
    -> x + GELU(weight-normed grouped Conv1d(x)) (conv positional embedding) -> N transformer layers
    (layer norm first, as every released model) -> final LayerNorm -> [B,F,D] at 25 fps

Module and parameter names are AV-HuBERT's own (`feature_extractor_video.resnet.trunk.layer1.0.conv1.weight`,
`encoder.layers.3.self_attn.q_proj.weight`, `encoder.pos_conv.0.weight_g`), so a fairseq state_dict loads
after stripping its prefix (`models/avsr/avhubert_checkpoint.py`). Sizes: Base 12 layers x 768 (12 heads,
FFN 3072), Large 24 x 1024 (16 heads, FFN 4096); `AVHubertConfig.tiny()` is for tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.avsr.resnet import ResNet18Trunk, make_activation

MODALITIES = ("audio", "video", "audiovisual")


@dataclass
class AVHubertConfig:
    """The architecture fields of fairseq's `AVHubertConfig` (same names; training-only fields omitted)."""

    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    layer_norm_first: bool = True
    conv_pos: int = 128
    conv_pos_groups: int = 16
    audio_feat_dim: int = 104
    modality_fuse: str = "concat"
    resnet_relu_type: str = "prelu"
    resnet_channels: int = 64  # not a fairseq field: 64 in every real model, smaller in tests
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    dropout_input: float = 0.0

    @classmethod
    def base(cls) -> AVHubertConfig:
        return cls()

    @classmethod
    def large(cls) -> AVHubertConfig:
        return cls(
            encoder_layers=24, encoder_embed_dim=1024, encoder_ffn_embed_dim=4096, encoder_attention_heads=16
        )

    @classmethod
    def tiny(cls) -> AVHubertConfig:
        """2 layers x 32, ResNet with 4 channels: seconds on CPU."""
        return cls(
            encoder_layers=2,
            encoder_embed_dim=32,
            encoder_ffn_embed_dim=64,
            encoder_attention_heads=2,
            conv_pos=8,
            conv_pos_groups=4,
            resnet_channels=4,
        )

    @classmethod
    def preset(cls, size: str) -> AVHubertConfig:
        presets = {"base": cls.base, "large": cls.large, "tiny": cls.tiny}
        if size not in presets:
            raise ValueError(f"unknown AV-HuBERT size {size!r}; choose one of {sorted(presets)}")
        return presets[size]()

    def as_dict(self) -> dict:
        return asdict(self)


class ResEncoder(nn.Module):
    """[B,1,F,H,W] -> [B,F,8C]: AV-HuBERT's `ResEncoder` (frontend3D + per-frame ResNet-18 trunk)."""

    def __init__(self, channels: int = 64, relu_type: str = "prelu"):
        super().__init__()
        self.frontend3D = nn.Sequential(
            nn.Conv3d(1, channels, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False),
            nn.BatchNorm3d(channels),
            make_activation(relu_type, channels),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        )
        self.trunk = ResNet18Trunk(channels, relu_type)
        self.backend_out = self.trunk.output_dim

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b = video.shape[0]
        x = self.frontend3D(video)  # [B,C,F,H',W']
        f = x.shape[2]
        x = self.trunk(x.transpose(1, 2).flatten(0, 1))  # [B*F, 8C]
        return x.view(b, f, -1)


class ModalityBranch(nn.Module):
    """fairseq's `SubModel` without its (unused, 0-layer) transformer: optional ResNet, then Linear to D."""

    def __init__(self, input_dim: int, embed_dim: int, resnet: ResEncoder | None = None):
        super().__init__()
        self.resnet = resnet
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """video [B,1,F,H,W] or audio features [B,F,104] -> [B,F,D]."""
        return self.proj(self.resnet(x) if self.resnet is not None else x)


class SelfAttention(nn.Module):
    """fairseq `MultiheadAttention` (self-attention, biased q/k/v/out projections) on SDPA, batch first."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed dim {embed_dim} is not divisible by {num_heads} heads")
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x [B,T,D], valid [B,T] bool (False = padding, never attended to) -> [B,T,D]."""
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2)

        out = nn.functional.scaled_dot_product_attention(
            heads(self.q_proj(x)),
            heads(self.k_proj(x)),
            heads(self.v_proj(x)),
            attn_mask=valid[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    """wav2vec 2.0's `TransformerSentenceEncoderLayer` (post- or pre-LayerNorm, GELU FFN)."""

    def __init__(self, cfg: AVHubertConfig):
        super().__init__()
        d = cfg.encoder_embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.self_attn = SelfAttention(d, cfg.encoder_attention_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_embed_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation_dropout = nn.Dropout(cfg.activation_dropout)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.activation_dropout(nn.functional.gelu(self.fc1(x)))))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), valid))
            return x + self._ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, valid)))
        return self.final_layer_norm(x + self._ffn(x))


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d whose weight is g * v / ||v|| (norm over all dims but the kernel axis, dim=2).

    The parameters are named `weight_g` [1,1,K] and `weight_v` [D,D/groups,K], as `torch.nn.utils.weight_norm`
    (which fairseq used) stores them, so checkpoints load unchanged.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        if channels % groups:
            raise ValueError(f"conv_pos_groups {groups} must divide the embed dim {channels}")
        self.groups, self.padding = groups, kernel_size // 2
        v = torch.empty(channels, channels // groups, kernel_size)
        nn.init.normal_(v, mean=0.0, std=(4.0 / (kernel_size * channels)) ** 0.5)
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        return nn.functional.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class SamePad(nn.Module):
    """Drop the last step after a conv with an even kernel and padding K // 2 (output length = input length)."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.trim = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : -self.trim] if self.trim else x


def positional_conv(channels: int, kernel_size: int, groups: int) -> nn.Sequential:
    """[B,D,T] -> [B,D,T], fairseq's `pos_conv`: weight-normed grouped conv, SamePad, GELU (`pos_conv.0.*`)."""
    return nn.Sequential(WeightNormConv1d(channels, kernel_size, groups), SamePad(kernel_size), nn.GELU())


class TransformerEncoder(nn.Module):
    """wav2vec 2.0's `TransformerEncoder`: conv positions, layers, final LayerNorm (pre-LN models)."""

    def __init__(self, cfg: AVHubertConfig):
        super().__init__()
        self.layer_norm_first = cfg.layer_norm_first
        self.pos_conv = positional_conv(cfg.encoder_embed_dim, cfg.conv_pos, cfg.conv_pos_groups)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(cfg.encoder_embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """x [B,T,D], valid [B,T] -> [B,T,D]; `num_layers` stops early (no final LayerNorm, as fairseq)."""
        x = x * valid[..., None].to(x.dtype)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        for layer in self.layers[:num_layers]:
            x = layer(x, valid)
        if self.layer_norm_first and num_layers is None:
            x = self.layer_norm(x)
        return x


class AVHubertModel(nn.Module):
    """The AV-HuBERT encoder (fairseq `AVHubertModel.extract_finetune`), names as in its checkpoints.

    Branches are built for `modalities` only ("audio", "video" or both); the fused width is always 2D
    (concat), a missing modality contributing zeros, exactly as AV-HuBERT runs one modality.
    """

    def __init__(self, cfg: AVHubertConfig, modalities: tuple[str, ...] = ("audio", "video")):
        super().__init__()
        if cfg.modality_fuse not in ("concat", "add"):
            raise ValueError(f"modality_fuse must be concat or add, got {cfg.modality_fuse!r}")
        self.cfg, self.modalities = cfg, tuple(modalities)
        d = cfg.encoder_embed_dim
        if "audio" in modalities:
            self.feature_extractor_audio = ModalityBranch(cfg.audio_feat_dim, d)
        if "video" in modalities:
            resnet = ResEncoder(cfg.resnet_channels, cfg.resnet_relu_type)
            self.feature_extractor_video = ModalityBranch(resnet.backend_out, d, resnet)
        fused = 2 * d if cfg.modality_fuse == "concat" else d
        self.layer_norm = nn.LayerNorm(fused)
        self.post_extract_proj = nn.Linear(fused, d) if fused != d else None
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.encoder = TransformerEncoder(cfg)

    def forward(
        self,
        valid: torch.Tensor,
        audio: torch.Tensor | None = None,
        video: torch.Tensor | None = None,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """audio [B,T,104] and/or video [B,1,T,H,W], valid [B,T] bool -> features [B,T,D]."""
        if audio is None and video is None:
            raise ValueError("AV-HuBERT needs audio, video or both")
        audio_features = self.feature_extractor_audio(audio) if audio is not None else None
        video_features = self.feature_extractor_video(video) if video is not None else None
        if audio_features is None:
            audio_features = torch.zeros_like(video_features)
        if video_features is None:
            video_features = torch.zeros_like(audio_features)
        if self.cfg.modality_fuse == "concat":
            features = torch.cat([audio_features, video_features], dim=-1)
        else:
            features = audio_features + video_features
        features = self.layer_norm(features)
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        return self.encoder(self.dropout_input(features), valid, num_layers)
