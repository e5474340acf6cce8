"""Choose the heads of a training-free attention edit (ACT, ZeroTuning) on calibration text.

Two criteria:
- `loss` (the papers' way): both papers keep the heads where the edit helps on held-in data (ACT: per-head
  accuracy on a calibration set; ZeroTuning: heads that respond well to scaling the first token up or down).
  Without task labels we use the language-modelling loss: each head of the searched layers is edited alone
  (ZeroTuning: with each candidate factor) and the heads whose edit lowers the mean next-token loss most are
  kept. Costs (layers x heads x factors) forward passes.
- `attention` (one forward pass): ACT keeps the heads whose hidden sinks (keys t > 0 receiving mean attention
  above the threshold) draw the most attention; ZeroTuning keeps the heads with the highest first-token
  attention, all with the configured factor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diagnostics.sink_metrics import first_token_attention_per_head
from models.attention_capture import QueryKeyCapture, attention_modules, sampled_attention_probs
from models.attention_edit import (
    ACT,
    AttentionEdit,
    ZeroTuning,
    act_sink_keys,
    edit_kernel,
    heads_json,
    single_head,
)
from models.segments import IGNORE_INDEX


@torch.no_grad()
def mean_token_nll(model: torch.nn.Module, batch: dict) -> float:
    """Mean next-token cross-entropy (nats) over the real tokens of a right-padded batch."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    return float(model(**batch, labels=labels).loss)


@torch.no_grad()
def calibrate_heads(
    model: torch.nn.Module,
    batch: dict,
    edit: AttentionEdit,
    layers: Sequence[int] | None = None,
    factors: Sequence[float] = (0.5, 2.0),
    max_heads: int = 16,
    min_gain: float = 1e-4,
    progress=None,
) -> dict:
    """The calibration file's dict: {"method", "heads": {layer: [heads] | {head: factor}}, "baseline_nll",
    "gains": [[layer, head, factor or null, gain], ...] sorted, best first}."""
    model.eval()
    all_layers = sorted(attention_modules(model))
    layers = all_layers if layers is None else list(layers)
    num_heads = model.config.num_attention_heads
    baseline = mean_token_nll(model, batch)
    values = [float(f) for f in factors] if isinstance(edit, ZeroTuning) else [None]
    gains = []
    with edit_kernel(model):  # one kernel switch for the whole search
        _search(model, batch, edit, layers, num_heads, values, baseline, gains, progress)
    gains.sort(key=lambda g: -g[3])
    kept = [g for g in gains if g[3] > min_gain][:max_heads]
    heads: dict[int, list | dict] = {}
    for layer, head, value, _ in sorted(kept):
        if value is None:
            heads.setdefault(layer, []).append(head)
        else:
            heads.setdefault(layer, {})[head] = value
    return heads_json(
        edit.name, heads, criterion="loss", baseline_nll=baseline, gains=[list(g) for g in gains]
    )


def _search(model, batch, edit, layers, num_heads, values, baseline, gains, progress) -> None:
    """Append (layer, head, best value, gain) for every searched head."""
    for layer in layers:
        for head in range(num_heads):
            best = None
            for value in values:
                with single_head(edit, layer, head, value).applied(model):
                    gain = baseline - mean_token_nll(model, batch)
                if best is None or gain > best[3]:
                    best = (layer, head, value, gain)
            gains.append(best)
            if progress is not None:
                progress(layer, head, best[3])


@torch.no_grad()
def attention_head_scores(
    model: torch.nn.Module, batch: dict, edit: AttentionEdit, layers: Sequence[int] | None = None
) -> list[tuple[int, int, float]]:
    """(layer, head, score) from one forward pass: ACT = mean attention mass on the head's hidden sinks per
    query; ZeroTuning = the head's first-token attention. Batch right-padded."""
    model.eval()
    valid = batch["attention_mask"].bool()
    with QueryKeyCapture(model, layers) as captured:
        model(**batch, use_cache=False)
    scores = []
    for layer in sorted(captured):
        positions = torch.arange(valid.shape[1], device=valid.device)
        probs = sampled_attention_probs(captured.pop(layer), positions, batch["attention_mask"])  # [B,H,T,T]
        if isinstance(edit, ACT):
            causal = torch.tril(
                torch.ones(len(positions), len(positions), dtype=torch.bool, device=valid.device)
            )
            visible = (causal[None] & valid[:, None, :])[:, None]  # [B,1,T,T]
            sinks = act_sink_keys(probs, visible, edit.threshold)  # [B,H,K]
            on_sinks = (probs * sinks[:, :, None, :]).sum(-1)  # [B,H,T]
            rows = valid[:, None, :].float()
            per_head = (on_sinks * rows).sum((0, 2)) / rows.sum((0, 2)).clamp_min(1.0)
        else:
            per_head = first_token_attention_per_head(probs[..., 0], valid)
        scores += [(layer, head, float(value)) for head, value in enumerate(per_head.tolist())]
    return scores


def calibrate_by_attention(
    model: torch.nn.Module,
    batch: dict,
    edit: AttentionEdit,
    layers: Sequence[int] | None = None,
    max_heads: int = 16,
    min_score: float = 0.0,
) -> dict:
    """The calibration file's dict from `attention_head_scores`: the top `max_heads` heads above min_score."""
    scores = sorted(attention_head_scores(model, batch, edit, layers), key=lambda s: -s[2])
    kept = [s for s in scores if s[2] > min_score][:max_heads]
    heads: dict[int, list | dict] = {}
    for layer, head, _ in sorted(kept):
        if isinstance(edit, ZeroTuning):
            heads.setdefault(layer, {})[head] = float(edit.factor)
        else:
            heads.setdefault(layer, []).append(head)
    return heads_json(edit.name, heads, criterion="attention", scores=[list(s) for s in scores])
