"""Training-free attention edits, as baselines beside the objectives: ACT and ZeroTuning (docs/training_free.md).

- ACT ("Unveiling and Harnessing Hidden Attention Sinks", Yu et al., ICML 2024): in calibrated heads, a key
  k other than the first token is a sink when the mean attention it receives from the queries that see it
  exceeds `threshold` (0.1); every row scales its attention to the sinks by `scale` (0.4) and gives the
  removed mass to the row's other visible keys in proportion to their attention, so rows still sum to 1.
- ZeroTuning (Han et al., 2025): in chosen heads, the attention to the first token is multiplied by a
  factor and the row renormalised: p'_0 = f p_0 / (f p_0 + 1 - p_0), p'_j = p_j / (f p_0 + 1 - p_0).

"First token" is each sample's first visible key (the first real token under left padding).

How it runs: `edit.applied(model)` registers, through transformers' `AttentionInterface`, a wrapper around the
model's own kernel (`unsink_edit|sdpa`) and marks the chosen layers. A marked layer computes its
probabilities explicitly (fp32 softmax), edits the chosen heads and multiplies by the values; every other
layer, and every layer once the context exits, calls the original kernel unchanged (identical logits).
While a `QueryKeyCapture` is active too (sink diagnostics), rows recomputed from the captured q/k get the
same edit, with the sinks detected in the forward pass, so the measured attention is the edited one.

Shapes: probs [B,H,Q,K] float32; visible [B or 1, 1, Q, K] bool (True = the query may attend the key).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from models.attention_capture import (
    CAPTURE_PREFIX,
    PROBABILITY_EDIT_ATTR,
    attention_modules,
    capture_implementation_name,
)

EDIT_PREFIX = "unsink_edit|"


# ---- the edits as pure functions ------------------------------------------------------------------
def first_visible_key(visible: torch.Tensor) -> torch.Tensor:
    """visible [B,1,Q,K] -> [B] index of the first key any query of the sample sees."""
    seen = visible.any(dim=2).any(dim=1)  # [B,K]
    return seen.float().argmax(dim=-1)


def act_sink_keys(probs: torch.Tensor, visible: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """[B,H,K] bool: keys (not the first token) whose mean attention over the queries that see them > threshold."""
    counts = visible.float().sum(dim=2)  # [B,1,K]
    received = probs.sum(dim=2) / counts.clamp_min(1.0)  # [B,H,K]
    sinks = (received > threshold) & (counts > 0)
    first = first_visible_key(visible)  # [B]
    keys = torch.arange(probs.shape[-1], device=probs.device)
    return sinks & (keys[None, :] != first[:, None])[:, None, :]


def act_redistribute(
    probs: torch.Tensor, sinks: torch.Tensor, heads: torch.Tensor, scale: float = 0.4
) -> torch.Tensor:
    """Scale attention to the sink keys by `scale` in the chosen heads and give the removed mass to the other
    keys of each row, in proportion to their attention (rows without other attended keys are left alone).

    probs [B,H,Q,K]; sinks [B,H,K] bool; heads [H] bool. Returns a new tensor.
    """
    sink = (sinks & heads[None, :, None])[:, :, None, :]  # [B,H,1,K]
    on_sinks = (probs * sink).sum(-1, keepdim=True)  # [B,H,Q,1]
    others = probs * ~sink
    others_total = others.sum(-1, keepdim=True)
    removed = (1.0 - scale) * on_sinks
    can_move = others_total > 0
    scaled = torch.where(sink, probs * scale, probs)
    moved = scaled + removed * others / others_total.clamp_min(torch.finfo(probs.dtype).tiny)
    return torch.where(can_move, moved, probs)


def zerotuning_rescale(probs: torch.Tensor, visible: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Multiply the attention to each sample's first token by factors[h] and renormalise the rows.

    probs [B,H,Q,K]; visible [B,1,Q,K]; factors [H] (1 = head unchanged). Returns a new tensor.
    """
    first = first_visible_key(visible)  # [B]
    keys = torch.arange(probs.shape[-1], device=probs.device)
    is_first = (keys[None, :] == first[:, None])[:, None, None, :]  # [B,1,1,K]
    weights = torch.where(is_first, factors.to(probs)[None, :, None, None], torch.ones_like(probs[:1, :, :1]))
    scaled = probs * weights
    total = scaled.sum(-1, keepdim=True)
    return torch.where(total > 0, scaled / total.clamp_min(torch.finfo(probs.dtype).tiny), probs)


# ---- per-layer edits ------------------------------------------------------------------------------
class LayerEdit:
    """The edit of one layer: `__call__` in the forward pass, `reapply` on rows recomputed from captured q/k."""

    def __call__(self, probs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reapply(self, probs: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return self(probs, visible)


class ACTLayer(LayerEdit):
    def __init__(self, heads: torch.Tensor, threshold: float, scale: float):
        self.heads, self.threshold, self.scale = heads, threshold, scale
        self.sinks: torch.Tensor | None = None  # [B,H,K] of the last forward pass

    def __call__(self, probs, visible):
        self.sinks = act_sink_keys(probs, visible, self.threshold)
        return act_redistribute(probs, self.sinks, self.heads.to(probs.device), self.scale)

    def reapply(self, probs, visible):
        if self.sinks is None or self.sinks.shape[-1] != probs.shape[-1]:
            raise RuntimeError("ACT: recomputed rows need the sinks of a forward pass over the same keys")
        return act_redistribute(probs, self.sinks, self.heads.to(probs.device), self.scale)


class ZeroTuningLayer(LayerEdit):
    def __init__(self, factors: torch.Tensor):
        self.factors = factors

    def __call__(self, probs, visible):
        return zerotuning_rescale(probs, visible, self.factors.to(probs.device))


# ---- the attention function -----------------------------------------------------------------------
def visibility(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, k_len: int, device
) -> torch.Tensor:
    """[B or 1,1,Q,K] bool from what a kernel receives: None (causal, queries are the last Q positions),
    a 4-D bool or additive float mask, or a 2-D [B,K] padding mask (flash attention)."""
    queries = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    causal = (torch.arange(k_len, device=device)[None, :] <= queries)[None, None]  # [1,1,Q,K]
    if attention_mask is None:
        return causal
    if attention_mask.dim() == 2:
        return causal & attention_mask.bool()[:, None, None, -k_len:]
    mask = attention_mask[:, :, :, -k_len:]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask


def _make_editing_attention(base_name: str):
    base_fn = ALL_ATTENTION_FUNCTIONS[base_name]

    def editing_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        edit = getattr(module, PROBABILITY_EDIT_ATTR, None)
        if edit is None:
            return base_fn(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling  # [B,H,Q,K]
        visible = visibility(attention_mask, query.shape[0], query.shape[2], key.shape[2], query.device)
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        probs = edit(probs, visible)
        output = torch.matmul(probs.to(value.dtype), value)  # [B,H,Q,hd]
        return output.transpose(1, 2).contiguous(), None

    return editing_attention


def edit_implementation_name(base_name: str) -> str:
    """Register (once) and return the name of the editing wrapper around an attention kernel."""
    if base_name.startswith(EDIT_PREFIX):
        return base_name
    name = EDIT_PREFIX + base_name
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_editing_attention(base_name))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    return name


@contextlib.contextmanager
def edit_kernel(model: torch.nn.Module) -> Iterator[None]:
    """Run the model through the editing wrapper of its kernel (kept under a query/key capture), restoring the
    original name at exit. Nested uses switch once (switching costs about a second: calibration loops)."""
    original = model.config._attn_implementation or "sdpa"
    if EDIT_PREFIX in original:
        yield
        return
    captured = original.startswith(CAPTURE_PREFIX)
    base = original[len(CAPTURE_PREFIX) :] if captured else original
    wanted = edit_implementation_name(base)
    model.set_attn_implementation(capture_implementation_name(wanted) if captured else wanted)
    try:
        yield
    finally:
        model.set_attn_implementation(original)


# ---- configurable edits ---------------------------------------------------------------------------
def read_heads(heads: Mapping | None, heads_file: str | None) -> dict | None:
    """{layer: [head, ...]} or {layer: {head: value}} from the config, or from a calibration JSON file."""
    if heads_file:
        path = Path(heads_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"attention_edit.heads_file: {path} does not exist (calibrate_attention_edit.py writes it)"
            )
        heads = json.loads(path.read_text())["heads"]
    if heads is None:
        return None
    return {int(layer): value for layer, value in dict(heads).items()}


class AttentionEdit:
    """Base: which layers/heads are edited. heads: {layer: [heads]} ({layer: {head: factor}} for ZeroTuning);
    None = every head of every layer. `applied(model)` is the context in which the model runs edited."""

    name = "edit"

    def __init__(self, heads: Mapping | None = None, heads_file: str | None = None):
        self.heads = read_heads(heads, heads_file)

    def layer_edit(self, layer: int, num_heads: int) -> LayerEdit | None:
        raise NotImplementedError

    def _head_mask(self, layer: int, num_heads: int) -> torch.Tensor | None:
        if self.heads is None:
            return torch.ones(num_heads, dtype=torch.bool)
        chosen = self.heads.get(layer)
        if not chosen:
            return None
        mask = torch.zeros(num_heads, dtype=torch.bool)
        mask[list(map(int, chosen))] = True
        return mask

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[dict[int, LayerEdit]]:
        modules = attention_modules(model)
        if not modules:
            raise ValueError("no attention modules with `layer_idx` found: unsupported architecture")
        if self.heads is not None:
            unknown = sorted(set(self.heads) - set(modules))
            if unknown:
                raise ValueError(f"attention_edit.heads: layers {unknown} do not exist (0..{max(modules)})")
        num_heads = model.config.num_attention_heads
        edits = {}
        with edit_kernel(model):
            for layer, module in modules.items():
                edit = self.layer_edit(layer, num_heads)
                if edit is not None:
                    setattr(module, PROBABILITY_EDIT_ATTR, edit)
                    edits[layer] = edit
            try:
                yield edits
            finally:
                for module in modules.values():
                    if hasattr(module, PROBABILITY_EDIT_ATTR):
                        delattr(module, PROBABILITY_EDIT_ATTR)


class ACT(AttentionEdit):
    """ACT: threshold 0.1 on the mean received attention, scale 0.4 (the paper's values)."""

    name = "act"

    def __init__(self, heads=None, heads_file=None, threshold: float = 0.1, scale: float = 0.4):
        super().__init__(heads, heads_file)
        self.threshold, self.scale = threshold, scale

    def layer_edit(self, layer, num_heads):
        mask = self._head_mask(layer, num_heads)
        return None if mask is None else ACTLayer(mask, self.threshold, self.scale)


class ZeroTuning(AttentionEdit):
    """ZeroTuning: heads {layer: [heads]} share `factor`; {layer: {head: factor}} gives each its own."""

    name = "zerotuning"

    def __init__(self, heads=None, heads_file=None, factor: float = 0.5):
        super().__init__(heads, heads_file)
        self.factor = factor

    def layer_edit(self, layer, num_heads):
        if self.heads is None:
            return ZeroTuningLayer(torch.full((num_heads,), float(self.factor)))
        chosen = self.heads.get(layer)
        if not chosen:
            return None
        factors = torch.ones(num_heads)
        items = chosen.items() if isinstance(chosen, Mapping) else ((h, self.factor) for h in chosen)
        for head, factor in items:
            factors[int(head)] = float(factor)
        return ZeroTuningLayer(factors)


def single_head(edit: AttentionEdit, layer: int, head: int, value: float | None = None) -> AttentionEdit:
    """A copy of `edit` restricted to one head (calibration); `value` = ZeroTuning's factor for it."""
    clone = object.__new__(type(edit))
    clone.__dict__.update(edit.__dict__)
    clone.heads = {layer: {head: value} if value is not None else [head]}
    return clone


def heads_json(method: str, heads: Mapping[int, Sequence | Mapping], **extra) -> dict:
    """The calibration file: {"method", "heads": {layer: ...}, ...extra}."""
    return {"method": method, "heads": {str(k): v for k, v in sorted(heads.items())}, **extra}
