"""Next-token cross-entropy without the [B,T,V] logits: the LM head and the loss run chunk by chunk.

`chunked_lm_loss` equals transformers' `ForCausalLMLoss` (labels shifted left by one, -100 ignored, mean
over target tokens), but keeps at most `chunk_tokens` x V logits alive. At Llama-3.2-1B shape, B=8, T=2048
the stored logits alone are 8.4 GB in bf16 (16.8 GB as the fp32 copy the loss makes). When the head is a
frozen, bias-free Linear (LoRA's usual case), optionally under peft's trainable tokens (MEAP's `[MASK]`
row), the gradient is computed in the forward pass (models/fused_linear_ce.py: one head GEMM per chunk
fewer); any other head (trainable, LoRA-wrapped, with a bias) recomputes each chunk's logits in backward
(activation checkpointing).

`install_chunked_loss(model)` rebinds the `forward` of ONE causal-LM instance (never its class, so a
teacher or a reference model built in the same process is untouched): while training with labels it
returns `loss` and `logits=None`; in eval mode, or without labels, the original forward runs.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from models.fused_linear_ce import fused_linear_cross_entropy
from models.output_vocabulary import EmbeddingPrefixHead
from models.segments import IGNORE_INDEX
from models.trainable_tokens import row_sparse_parts

LINEAR_HEADS = (torch.nn.Linear, EmbeddingPrefixHead)


def _chunk_loss_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """hidden [N,D], labels [N] -> summed CE over labels != -100 (fp32 logits, as transformers)."""
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def frozen_head_parts(lm_head: torch.nn.Module):
    """(weight [V,D], rows [R] or None, delta [R,D] or None) when the fused loss can run this head: a
    frozen, bias-free plain Linear (or the embedding's first rows: models/output_vocabulary.py), or peft's
    trainable tokens over one (row-sparse, one adapter); else None."""
    head = getattr(lm_head, "token_adapter", lm_head)  # peft's TrainableTokensWrapper around the layer
    tokens = hasattr(head, "trainable_tokens_delta")
    linear = getattr(head, "base_layer", None) if tokens else head
    if not isinstance(linear, LINEAR_HEADS) or linear.bias is not None or linear.weight.requires_grad:
        return None
    if type(linear.weight.data) is not torch.Tensor:  # a DTensor shard (FSDP): keep autograd there
        return None
    return row_sparse_parts(head) if tokens else (linear.weight, None, None)


def chunked_lm_loss(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_tokens: int = 4096,
    compile_rows: bool = False,
) -> torch.Tensor:
    """Mean next-token CE.

    Args:
        hidden: [B,T,D] final hidden states (after the last norm).
        lm_head: maps [N,D] -> [N,V].
        labels: [B,T] token ids, -100 = no target; position t is predicted from position t-1.
        compile_rows: on the fused path, run each chunk's softmax compiled (models/fused_linear_ce.py).
    Returns:
        scalar: sum of CE over targets / number of targets (0 when the batch has none; transformers
        returns nan there).
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    parts = frozen_head_parts(lm_head) if torch.is_grad_enabled() else None
    if parts is not None:
        weight, rows, delta = parts
        return fused_linear_cross_entropy(flat, weight, shifted, chunk_tokens, rows, delta, compile_rows)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_tokens):
        h, y = flat[start : start + chunk_tokens], shifted[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, lm_head, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(lm_head, h, y)
    return total / (shifted != IGNORE_INDEX).sum().clamp_min(1)


def _forward_with_chunked_loss(
    self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kw
):
    if labels is None or not self.training:
        return type(self).forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            **kw,
        )
    kw.pop("logits_to_keep", None)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
    loss = chunked_lm_loss(
        outputs.last_hidden_state, self.lm_head, labels, self._unsink_ce_chunk, self._unsink_ce_compile
    )
    return CausalLMOutputWithPast(
        loss=loss, logits=None, hidden_states=outputs.hidden_states, attentions=outputs.attentions
    )


def install_chunked_loss(
    model: torch.nn.Module, chunk_tokens: int = 4096, compile_rows: bool = False
) -> None:
    """Make this causal-LM instance (with `.model` and `.lm_head`) compute its training loss in chunks
    (`compile_rows`: each chunk's softmax compiled, see chunked_lm_loss)."""
    if not (hasattr(model, "model") and hasattr(model, "lm_head")):
        raise TypeError(f"{type(model).__name__} has no .model/.lm_head: cannot chunk its loss")
    model._unsink_ce_chunk = int(chunk_tokens)
    model._unsink_ce_compile = bool(compile_rows)
    model.forward = types.MethodType(_forward_with_chunked_loss, model)
