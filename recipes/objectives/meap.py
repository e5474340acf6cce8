"""MEAP as a recipe objective (docs/objectives.md): it changes the data; cross-entropy does the learning.

`setup` adds a `[MASK]` special token and resizes the embeddings; the recipe keeps that row trainable
under LoRA (peft `trainable_token_indices`, saved with the adapter). `mask_in_output` says whether the
output vocabulary grows with it:
- true (default): the models are tied, so peft's trainable tokens wrap the LM head too; the `[MASK]` row
  and the padding rows of `grow_embeddings` are in the softmax (a frozen head with a trainable row: the fast
  path's `auto` loss then takes the chunked CE, not Liger's);
- false: `[MASK]` is an input-only token. The output vocabulary is the original rows only
  (models/output_vocabulary.py: the head is the frozen embedding's first V_orig rows, untied from peft's
  wrapper), so the model can never predict `[MASK]`; as `[MASK]` is never a target, the loss and gradients
  are exact for that model. The head is then plain and frozen, so the fast path's `auto` loss may pick
  Liger's fused linear cross-entropy (a 1B-wide Llama on CUDA).
`transform_batch` masks the batch:
- pretrain: a fraction of every row's target positions (except position 0) becomes `[MASK]`; labels stay;
- sft: rows whose answer has more than `min_answer_tokens` tokens get a masked copy appended to the batch
  (answer positions only; the copy is trained only on the masked positions).
Fresh positions every step, reproducible from the generator the recipe seeds with (seed, step).
`loss` returns the fraction of real input tokens that are `[MASK]` (no gradient) for logging; the
default weight 0 keeps it out of the total.
"""

from __future__ import annotations

import torch

from losses.meap import MODES, meap_mask
from models.output_vocabulary import restrict_output_vocabulary
from models.segments import IGNORE_INDEX
from recipes.objectives.base import Objective, ObjectiveContext

DEFAULT_RATIO = {"pretrain": 0.15, "sft": 0.1}


def append_rows(batch: dict, rows: torch.Tensor, replacements: dict[str, torch.Tensor]) -> dict:
    """Append copies of `rows` of every [B,...] tensor of `batch`, with `replacements` ([R,...]) swapped in."""
    size = batch["input_ids"].shape[0]
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
            extra = replacements[key] if key in replacements else value[rows]
            out[key] = torch.cat([value, extra.to(value.dtype)], dim=0)
    return out


def grow_embeddings(model: torch.nn.Module, min_rows: int, multiple: int = 64) -> None:
    """Make room for new token ids, padding the row count to a multiple of 64.

    An unaligned vocabulary (128256 + 1) slows the LM-head GEMMs: 0.77x tokens/s on an H200 for the
    Llama-3.2-1B shape, against 1.00x once padded (benchmarks/RESULTS.md).
    """
    if model.get_input_embeddings().weight.shape[0] < min_rows:
        model.resize_token_embeddings(min_rows, pad_to_multiple_of=multiple, mean_resizing=False)


class MeapObjective(Objective):
    """Args:
    mode: "pretrain" or "sft".
    ratio: fraction of eligible positions masked (default 0.15 pretrain, 0.1 sft).
    min_answer_tokens: sft only; rows whose answer has more tokens than this get a masked copy (ref: 50).
    mask_token: the special token added to the tokenizer (an existing mask token is reused).
    mask_in_output: false = `[MASK]` is input-only: logits cover the V_orig rows the embedding had before
        `setup` grew it (module docstring); it must then be a new token beyond them.
    weight: 0 by default: the logged "loss" is the masked fraction, a statistic, not something to minimise.
    """

    name = "meap"
    rewrites_token_ids = True

    def __init__(
        self,
        mode: str = "pretrain",
        ratio: float | None = None,
        min_answer_tokens: int = 50,
        mask_token: str = "[MASK]",
        mask_in_output: bool = True,
        weight: float = 0.0,
        warmup_steps: int = 0,
        start_step: int = 0,
    ):
        super().__init__(weight, warmup_steps, start_step)
        if mode not in MODES:
            raise ValueError(f"meap.mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.ratio = float(DEFAULT_RATIO[mode] if ratio is None else ratio)
        self.min_answer_tokens = int(min_answer_tokens)
        self.mask_token = mask_token
        self.mask_in_output = bool(mask_in_output)
        self.mask_token_id: int | None = None

    def setup(self, model: torch.nn.Module, tokenizer) -> list[int]:
        original_rows = model.get_input_embeddings().weight.shape[0]
        if tokenizer.mask_token is None:
            tokenizer.add_special_tokens({"mask_token": self.mask_token})
        self.mask_token_id = int(tokenizer.mask_token_id)
        grow_embeddings(model, self.mask_token_id + 1)
        if not self.mask_in_output:
            if self.mask_token_id < original_rows:
                raise ValueError(
                    f"meap.mask_in_output=false needs {self.mask_token!r} outside the model's {original_rows} "
                    f"original rows (its id is {self.mask_token_id}): it would stay in the output vocabulary"
                )
            restrict_output_vocabulary(model, original_rows)
        return [self.mask_token_id]

    def transform_batch(self, batch: dict, generator: torch.Generator | None) -> dict:
        if self.mask_token_id is None:
            raise RuntimeError("MeapObjective.setup(model, tokenizer) must run before transform_batch")
        input_ids, labels = batch["input_ids"], batch["labels"]
        if self.mode == "pretrain":
            masked_ids, _ = meap_mask(
                input_ids, labels, self.mask_token_id, self.ratio, "pretrain", generator
            )
            return {**batch, "input_ids": masked_ids}
        rows = ((labels != IGNORE_INDEX).sum(1) > self.min_answer_tokens).nonzero().flatten()
        if rows.numel() == 0:
            return batch
        masked_ids, masked_labels = meap_mask(
            input_ids[rows], labels[rows], self.mask_token_id, self.ratio, "sft", generator
        )
        return append_rows(batch, rows, {"input_ids": masked_ids, "labels": masked_labels})

    def loss(self, ctx: ObjectiveContext) -> torch.Tensor:
        real = ctx.batch["attention_mask"].bool()
        masked = (ctx.batch["input_ids"] == self.mask_token_id) & real
        fraction = masked.sum().float() / real.sum().clamp_min(1).float()
        return fraction
