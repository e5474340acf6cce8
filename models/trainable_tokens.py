"""Row-sparse forward for peft's trainable tokens (e.g. MEAP's `[MASK]` row), same values and gradients.

peft's `TrainableTokensLayer` builds the full merged matrix W = base.index_copy(rows, delta) on every
forward. For a tied LM head that makes autograd compute the full dW = grad_logits^T @ x GEMM ([V,D], about
8.6 TFLOP per step for a 128k vocabulary at 16k tokens) only to keep a handful of rows: MEAP fell to 0.96x
of plain LoRA on an H200 (benchmarks/RESULTS.md). Here the base matrix is used as is (frozen: no dW) and
only the trainable rows are computed from their deltas:

- LM head:   logits = x @ W_base^T, then logits[..., rows] += x @ (delta - W_base[rows])^T  (O(T*R*D))
- embedding: e = W_base[ids], then e[ids in rows] = delta[row of id]           (extra cost O(T * D))

The result equals peft's forward (up to rounding in the LM-head correction), so adapters
save, load and merge through peft unchanged. Falls back to peft's own forward when adapters are disabled,
merged, or several are active.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F


def _single_active(layer) -> str | None:
    active = list(layer.active_adapters)
    if layer.disable_adapters or layer.merged or len(active) != 1:
        return None
    name = active[0]
    return name if name in layer.token_indices else None


def _index_tensors(layer, name: str, num_rows: int, device: torch.device):
    """(trainable row ids [R], lookup [V] of row id -> slot or -1), cached per adapter and device."""
    cache = layer.__dict__.setdefault("_row_sparse_cache", {})
    key = (name, num_rows, str(device))
    if key not in cache:
        rows = torch.as_tensor(layer.token_indices[name], dtype=torch.long, device=device)
        lookup = torch.full((num_rows,), -1, dtype=torch.long, device=device)
        lookup[rows] = torch.arange(rows.numel(), device=device)
        cache[key] = (rows, lookup)
    return cache[key]


def _row_sparse_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _single_active(self)
    base = self.base_layer
    if name is None or not isinstance(base, (torch.nn.Embedding, torch.nn.Linear)):
        return self._peft_forward(x, *args, **kwargs)
    weight = base.weight
    rows, lookup = _index_tensors(self, name, weight.shape[0], weight.device)
    delta = self.trainable_tokens_delta[name].to(weight)
    if isinstance(base, torch.nn.Linear):  # a tied LM head: [..., D] -> [..., V]
        # logits[..., rows] = x @ delta^T, written as an in-place index_add of x @ (delta - W_base[rows])^T:
        # its backward passes grad_logits through untouched (an index_copy would copy all [B,T,V] of it
        # to zero the replaced columns), and linear's backward does not need `out`.
        out = F.linear(x, weight)
        return out.index_add_(-1, rows, F.linear(x, delta - weight.index_select(0, rows)))
    out = F.embedding(
        x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
    )
    slot = lookup[x]  # [...], -1 where the token is not trainable
    replaced = F.embedding(slot.clamp_min(0), delta)  # no `.any()` check: it would sync with the GPU
    out = torch.where((slot >= 0).unsqueeze(-1), replaced, out)
    embed_scale = self._get_embed_scale()
    return out * embed_scale.to(out.dtype) if embed_scale is not None else out


def row_sparse_parts(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(base weight [V,D], trainable row ids [R], their delta [R,D]) of a TrainableTokensLayer with one
    active, unmerged adapter; None otherwise. What the fused loss (models/fused_linear_ce.py) needs."""
    name = _single_active(layer)
    if name is None:
        return None
    weight = layer.base_layer.weight
    rows, _ = _index_tensors(layer, name, weight.shape[0], weight.device)
    return weight, rows, layer.trainable_tokens_delta[name]


def use_row_sparse_trainable_tokens(model: torch.nn.Module) -> int:
    """Patch every peft TrainableTokensLayer of `model`; returns how many were patched (idempotent)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    patched = 0
    for module in model.modules():
        if isinstance(module, TrainableTokensLayer) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = MethodType(_row_sparse_forward, module)
            patched += 1
    return patched
