"""Modality projectors: compress encoder frames in time, then map them to the LLM's embedding width.

Compression by `rate` r (1..32), length-aware: a clip of L frames gives ceil(L / r) tokens, and frames past
the clip never enter a token (so a padded row equals the same clip alone).
- `stack`: concatenate r consecutive frames ([r*D] per token; the last group is zero-filled).
- `avg_pool`: mean of the valid frames of each group of r.
Then a 2-layer MLP (Linear-GELU-Linear, or ReLU as Llama-AVSR) to the LLM width, with an optional LayerNorm
before it (on the compressed features, this repo's default) or after it (on the LLM-width tokens, as the
Llama-AVSR reference's `--layernorm-projector`).
"""

from __future__ import annotations

import torch
from torch import nn

COMPRESSIONS = ("stack", "avg_pool")
LAYER_NORM_POSITIONS = ("before", "after")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def compressed_lengths(lengths: torch.Tensor, rate: int) -> torch.Tensor:
    """ceil(lengths / rate)."""
    return torch.div(lengths + rate - 1, rate, rounding_mode="floor")


def compress(features: torch.Tensor, lengths: torch.Tensor, rate: int, mode: str) -> torch.Tensor:
    """features [B,T,D], lengths [B] -> [B, ceil(T/r), r*D (stack) or D (avg_pool)]."""
    b, t, d = features.shape
    groups = -(-t // rate)
    valid = (torch.arange(groups * rate, device=features.device)[None] < lengths[:, None]).to(features.dtype)
    padded = nn.functional.pad(features, (0, 0, 0, groups * rate - t)) * valid[..., None]
    if mode == "stack":
        return padded.reshape(b, groups, rate * d)
    if mode == "avg_pool":
        counts = valid.view(b, groups, rate).sum(-1, keepdim=True).clamp(min=1)
        return padded.view(b, groups, rate, d).sum(2) / counts
    raise ValueError(f"unknown compression {mode!r}; choose one of {COMPRESSIONS}")


class ModalityProjector(nn.Module):
    """(features [B,T,D_in], lengths [B]) -> (tokens [B,ceil(T/r),D_llm] zero past each clip, lengths [B]).

    Args:
        input_dim: encoder feature width (e.g. 384 for Whisper tiny, 512 for the ResNet-18 video encoder).
        output_dim: the LLM's hidden size.
        rate: frames per token (1..32).
        compression: `stack` or `avg_pool`.
        hidden_dim: MLP width (default output_dim).
        layer_norm: add a LayerNorm; `layer_norm_position` before (compressed features) or after the MLP.
        activation: gelu | relu (the reference).
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        rate: int = 1,
        compression: str = "stack",
        hidden_dim: int | None = None,
        layer_norm: bool = False,
        layer_norm_position: str = "before",
        activation: str = "gelu",
    ):
        super().__init__()
        if not 1 <= rate <= 32:
            raise ValueError(f"compression rate must be in 1..32, got {rate}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; choose one of {COMPRESSIONS}")
        if layer_norm_position not in LAYER_NORM_POSITIONS:
            raise ValueError(
                f"layer_norm_position must be one of {LAYER_NORM_POSITIONS}, got {layer_norm_position!r}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"projector activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.rate, self.compression, self.output_dim = rate, compression, output_dim
        width = input_dim * rate if compression == "stack" else input_dim
        before = layer_norm and layer_norm_position == "before"
        after = layer_norm and layer_norm_position == "after"
        self.norm = nn.LayerNorm(width) if before else nn.Identity()
        hidden_dim = hidden_dim or output_dim
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden_dim), ACTIVATIONS[activation](), nn.Linear(hidden_dim, output_dim)
        )
        self.norm_after = nn.LayerNorm(output_dim) if after else nn.Identity()

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_lengths = compressed_lengths(lengths, self.rate)
        tokens = self.norm_after(
            self.mlp(self.norm(compress(features, lengths, self.rate, self.compression)))
        )
        keep = torch.arange(tokens.shape[1], device=tokens.device)[None] < out_lengths[:, None]
        return tokens * keep[..., None].to(tokens.dtype), out_lengths
