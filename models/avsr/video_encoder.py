"""Lip-reading video encoders: the interface every visual front end implements, and the ResNet-18 one.

Any module with `output_dim` and `forward(video [B,F,1,H,W], lengths [B]) -> (features [B,F',D], lengths [B])`
plugs in through `conf/video_encoder/*.yaml` `_target_` (e.g. an AV-HuBERT wrapper around its published
checkpoints). Shapes: F frames at 25 fps, H = W = 88 mouth crops, grayscale, normalised, zero-padded.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from models.avsr.resnet import ResNet18Trunk, make_activation


class VideoEncoder(nn.Module):
    """Base class: subclasses set `output_dim` and implement `forward` with the signature above."""

    output_dim: int

    def forward(self, video: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def load_checkpoint(
        self, path: str | Path, key: str | None = None, strip_prefix: str = "", strict: bool = True
    ) -> None:
        """Load a state_dict saved with `torch.save` (optionally under `checkpoint[key]`, names prefixed)."""
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"video encoder checkpoint {path} does not exist (`video_encoder.checkpoint`)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        if key is not None:
            if key not in state:
                raise KeyError(f"{path} has no key {key!r}; top-level keys: {sorted(state)[:10]}")
            state = state[key]
        if strip_prefix:
            state = {k.removeprefix(strip_prefix): v for k, v in state.items() if k.startswith(strip_prefix)}
            if not state:
                raise ValueError(f"no tensor in {path} starts with {strip_prefix!r}")
        missing, unexpected = self.load_state_dict(state, strict=False)
        if strict and (missing or unexpected):
            raise ValueError(
                f"checkpoint {path} does not match {type(self).__name__}: "
                f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
            )


def sinusoidal_positions(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """[length, dim] fixed sinusoidal position encodings (no maximum length)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freqs = torch.exp(torch.arange(0, dim, 2, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * freqs)
    table[:, 1::2] = torch.cos(position * freqs[: dim // 2])
    return table


class ResNet18VideoEncoder(VideoEncoder):
    """3D-conv front end + per-frame ResNet-18 (Ma et al.; auto_avsr), then an optional temporal transformer.

    Front end: Conv3d(1, C, (5,7,7), stride (1,2,2), pad (2,3,3)) -> BatchNorm3d -> activation ->
    MaxPool3d((1,3,3), stride (1,2,2), pad (0,1,1)); trunk: ResNet-18 (C, 2C, 4C, 8C channels) on every
    frame, global average pooling -> 8C features per frame (512 with the default C = 64). Frame rate and
    count are kept: F' = F, output lengths = input lengths.

    Args:
        base_channels: C (64 for the published models; tests use 8).
        activation: prelu (Ma et al. 2021) | relu | swish (auto_avsr's released checkpoints).
        temporal_layers: transformer layers over frames (0 = none), width 8C, `temporal_heads` heads.
        frozen: no gradients and eval-mode BatchNorm.
        checkpoint / checkpoint_key / checkpoint_prefix: optional weights (see `load_checkpoint`).
    """

    def __init__(
        self,
        base_channels: int = 64,
        activation: str = "prelu",
        temporal_layers: int = 0,
        temporal_heads: int = 8,
        dropout: float = 0.1,
        frozen: bool = False,
        checkpoint: str | None = None,
        checkpoint_key: str | None = None,
        checkpoint_prefix: str = "",
    ):
        super().__init__()
        c = base_channels
        self.frontend3D = nn.Sequential(  # auto_avsr's name, so its checkpoints load
            nn.Conv3d(1, c, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False),
            nn.BatchNorm3d(c),
            make_activation(activation, c),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        )
        self.trunk = ResNet18Trunk(c, activation)
        self.output_dim = self.trunk.output_dim
        self.temporal = None
        if temporal_layers > 0:
            layer = nn.TransformerEncoderLayer(
                self.output_dim,
                temporal_heads,
                4 * self.output_dim,
                dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.temporal = nn.TransformerEncoder(layer, temporal_layers, enable_nested_tensor=False)
        if checkpoint:
            self.load_checkpoint(checkpoint, checkpoint_key, checkpoint_prefix)
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    def forward(self, video: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B,F,1,H,W], lengths [B] frames -> (features [B,F,8C] zero past each clip, lengths [B])."""
        b, f = video.shape[:2]
        valid = torch.arange(f, device=video.device)[None] < lengths[:, None]  # [B,F]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            x = video * valid[:, :, None, None, None].to(video.dtype)
            x = self.frontend3D(x.transpose(1, 2))  # [B,C,F,H',W']
            x = x.transpose(1, 2).flatten(0, 1)  # [B*F,C,H',W']
            x = self.trunk(x).view(b, f, -1)
            if self.temporal is not None:
                x = x + sinusoidal_positions(f, x.shape[-1], x.device).to(x.dtype)
                x = self.temporal(x, src_key_padding_mask=~valid)
        return x * valid[..., None].to(x.dtype), lengths
