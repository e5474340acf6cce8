"""Pack a batch's examples into as few rows as fit: no padding between documents.

Every document keeps its own positions (position ids restart at 0), and the model is given
`position_ids` instead of an attention mask: transformers (masking_utils.find_packed_sequence_indices)
then builds a block-diagonal causal mask, so no token attends across documents (SDPA or flex attention;
no flash-attn package). The first token of every document gets label -100: it would be predicted from the
previous document's last token; unpacked, position 0 is never a target either.

Row length: documents are packed into rows of `row_length` tokens (default `max_length`). Without a
variable-length attention kernel every packed row pays attention over its whole length, so for short
documents a row of a few documents (e.g. 512 tokens for SFT rows of about 100) costs far less attention than
one of 2048; a document longer than `row_length` (up to `max_length`) gets a row of its own.

Output: input_ids / labels / position_ids / attention_mask [R,L] (R rows <= batch size, L = the longest
packed row, rounded up to `pad_to_multiple_of`); attention_mask marks real tokens
(for token counts; models/packing.py keeps it away from the model); document_ids [R,L] (0.. per row,
-1 on padding).
"""

from __future__ import annotations

import torch

from data.text.sft import IGNORE_INDEX


def first_fit_decreasing(lengths: list[int], capacity: int, limit: int | None = None) -> list[list[int]]:
    """Indices grouped into bins of total length <= capacity (longest first, each into the first bin it fits).
    An item longer than `capacity` but at most `limit` (default: capacity) fills a bin of its own."""
    limit = capacity if limit is None else limit
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[index] > limit:
            raise ValueError(f"example of {lengths[index]} tokens exceeds data.max_length={limit}")
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


def check_pack_length(pack_length: int | None, max_length: int) -> int:
    """The packed row length (`max_length` when None); outside 1..max_length is an error."""
    row_length = max_length if pack_length is None else pack_length
    if not 1 <= row_length <= max_length:
        raise ValueError(f"data.pack_length must be in 1..data.max_length={max_length}, got {pack_length}")
    return row_length


class PackingCollator:
    def __init__(
        self, pad_token_id: int, max_length: int, pad_to_multiple_of: int = 1, row_length: int | None = None
    ):
        self.pad_token_id, self.max_length = pad_token_id, max_length
        self.row_length = check_pack_length(row_length, max_length)
        self.multiple = max(1, pad_to_multiple_of)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(e["input_ids"]) for e in examples]
        bins = first_fit_decreasing(lengths, self.row_length, self.max_length)
        longest = max(sum(lengths[i] for i in b) for b in bins)
        length = -(-longest // self.multiple) * self.multiple
        shape = (len(bins), length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        document_ids = torch.full(shape, -1, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        for row, members in enumerate(bins):
            start = 0
            for doc, index in enumerate(members):
                ids = examples[index]["input_ids"]
                n = len(ids)
                input_ids[row, start : start + n] = torch.tensor(ids)
                labels[row, start : start + n] = torch.tensor(examples[index]["labels"])
                labels[row, start] = IGNORE_INDEX
                attention_mask[row, start : start + n] = 1
                document_ids[row, start : start + n] = doc
                position_ids[row, start : start + n] = torch.arange(n)
                start += n
            position_ids[row, start:] = torch.arange(length - start)  # padding: a segment of its own
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "document_ids": document_ids,
        }
