"""Pack variable-length pieces (BOS, delimiters, modality tokens, prompt, transcript) into LLM inputs.

Each row is the concatenation of its own pieces with no holes: padded modality tokens are dropped before
packing, so every row reads, e.g., BOS <audio> a_1..a_n </audio> prompt transcript EOS and only then
padding (right padding for training; left padding for batched generation). Padding is masked in
`attention_mask`, has segment PAD, and carries label IGNORE_INDEX (-100), so it never enters attention or a loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models import segments as seg
from models.segments import IGNORE_INDEX


@dataclass
class Piece:
    """A run of consecutive positions of one segment: embeds [n,D]; labels [n] token ids for targets, else None."""

    embeds: torch.Tensor
    segment: int
    labels: torch.Tensor | None = None


@dataclass
class PackedSequence:
    """inputs_embeds [B,T,D], attention_mask [B,T] long, labels [B,T] (-100 = no loss), segments [B,T] long."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    segments: torch.Tensor

    def llm_inputs(self, with_labels: bool = False) -> dict[str, torch.Tensor]:
        inputs = {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask}
        if with_labels:
            inputs["labels"] = self.labels
        return inputs


def pack_rows(rows: list[list[Piece]], padding_side: str = "right") -> PackedSequence:
    """Concatenate each row's pieces and pad rows to the longest (zero embeddings, mask 0, PAD, -100).

    Labels and segments are integer metadata: they are built on the host and moved to the embeddings'
    device in one copy each, so packing a batch costs two copies and one embedding concatenation per row
    instead of a few small device kernels per piece (pass labels as CPU tensors to keep it sync-free).
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    embeds = [torch.cat([p.embeds for p in pieces]) for pieces in rows]
    longest = max(len(e) for e in embeds)
    batch, dim = len(rows), embeds[0].shape[-1]
    out_embeds = embeds[0].new_zeros(batch, longest, dim)
    out_labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    out_segments = torch.full((batch, longest), seg.PAD, dtype=torch.long)
    for row, (pieces, e) in enumerate(zip(rows, embeds)):
        start = 0 if padding_side == "right" else longest - len(e)
        out_embeds[row, start : start + len(e)] = e
        for piece in pieces:
            stop = start + len(piece.embeds)
            out_segments[row, start:stop] = piece.segment
            if piece.labels is not None:
                out_labels[row, start:stop] = piece.labels.cpu()
            start = stop
    device = out_embeds.device
    out_labels, out_segments = out_labels.to(device), out_segments.to(device)
    return PackedSequence(out_embeds, (out_segments != seg.PAD).long(), out_labels, out_segments)
