"""An output vocabulary smaller than the input one: tokens added for the input only are never predicted.

MEAP's `[MASK]` with `objective.meap.mask_in_output=false` (docs/objectives.md): its embedding row trains,
but the softmax of the loss and of generation covers the original rows only. `restrict_output_vocabulary`
unties a causal LM's head from its embedding, before peft wraps the model:

- the new head's `weight` is `embedding.weight[:num_rows]`, read at every call: a view, never a copy, so
  the fast path's bf16 cast (models/fast.py: cast_frozen), a device move or trainable-token rows merged into
  the embedding are seen, and the head has no parameter of its own;
- `config.tie_word_embeddings=False`: peft then puts trainable tokens on the embedding only (for a tied
  model it wraps the head too, and the head would carry the trainable `[MASK]` row);
- `loss_function` takes the vocabulary from the logits' width (transformers passes `config.vocab_size`,
  the embedding's row count, to a reshape).

So the head is a frozen, bias-free linear map: the fast path's fused losses (Liger, models/fused_linear_ce.py)
take it as they take a plain frozen head, with no row-sparse correction. Since `[MASK]` and the padding rows
are never targets, the loss and its gradients are those of the restricted model, exactly.

Why untie rather than keep peft's tied head and slice its output in each loss (Liger, chunked, plain HF):
one module swap here covers every forward (training, validation, generate), where slicing would need a copy
of each loss's forward.

Saving: checkpoints and adapters hold trainable weights only and load into a model the recipe rebuilt the
same way. A full model (`export_merged`, or no LoRA) is saved inside `tied_for_saving`: a standard tied head
over all rows, which `from_pretrained` rebuilds, with the extra rows in `generation_config.suppress_tokens`
so that `generate()` from the saved model still never emits them (its raw logits do have those columns).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss


class EmbeddingPrefixHead(torch.nn.Module):
    """hidden [..., D] -> logits [..., num_rows] = hidden @ embedding.weight[:num_rows]^T (no bias)."""

    bias = None

    def __init__(self, embedding: torch.nn.Embedding, num_rows: int):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule: the weight stays the embedding's
        self.num_rows = int(num_rows)

    @property
    def weight(self) -> torch.Tensor:
        """[num_rows, D] view of the embedding's current weight."""
        return self.embedding.weight[: self.num_rows]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)

    def extra_repr(self) -> str:
        return f"first {self.num_rows} rows of the input embedding"


def causal_lm_loss_over_logit_columns(logits: torch.Tensor, labels: torch.Tensor, vocab_size=None, **kwargs):
    """transformers' ForCausalLMLoss with the vocabulary taken from logits [B,T,V_out]; `vocab_size`
    (config.vocab_size, the input rows) is ignored."""
    return ForCausalLMLoss(logits, labels, logits.shape[-1], **kwargs)


def restrict_output_vocabulary(model: torch.nn.Module, num_rows: int) -> None:
    """Make a bare HF causal LM (before peft) predict only its first `num_rows` tokens (module docstring)."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, torch.nn.Embedding) or not 0 < num_rows <= embedding.weight.shape[0]:
        raise ValueError(f"cannot restrict the output to {num_rows} rows of {embedding}")
    model.set_output_embeddings(EmbeddingPrefixHead(embedding, num_rows))
    model.config.tie_word_embeddings = False
    model.loss_function = causal_lm_loss_over_logit_columns


@contextlib.contextmanager
def tied_for_saving(model: torch.nn.Module):
    """Within: a standard tied head over every embedding row, the rows beyond the output vocabulary in
    `generation_config.suppress_tokens` (module docstring); restored on exit. A no-op for any other head."""
    head = model.get_output_embeddings()
    if not isinstance(head, EmbeddingPrefixHead):
        yield model
        return
    weight = head.embedding.weight
    tied = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    tied.weight = weight
    generation = model.generation_config
    suppressed = generation.suppress_tokens
    model.set_output_embeddings(tied)
    model.config.tie_word_embeddings = True
    generation.suppress_tokens = list(range(head.num_rows, weight.shape[0]))
    try:
        yield model
    finally:
        model.set_output_embeddings(head)
        model.config.tie_word_embeddings = False
        generation.suppress_tokens = suppressed
