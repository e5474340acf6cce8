"""The contract between a recipe and the auxiliary objectives it composes.

A recipe (causal LM or AVSR) owns the model and the data; an `Objective` turns what one forward pass
produced into one scalar. Objectives are instantiated from `conf/objective/<name>.yaml` into a dict
`{name: Objective}`; `objective=[decorr,adl]` switches on both. The recipe asks the model only for what
the active objectives need:

- `needs_hidden_states`: run the LLM with `output_hidden_states=True`;
- `needs_logits`: the objective reads `ctx.logits` (the fast path otherwise computes the CE without them);
- `attention_layers(num_layers)`: layers whose post-RoPE queries/keys are captured (fused attention kept,
  see `models/attention_capture.py`); None = no capture;
- `setup(model, tokenizer)`: called once before LoRA is applied (e.g. MEAP adds `[MASK]`); returns token ids
  whose embedding rows must stay trainable under LoRA;
- `transform_batch(batch, generator)`: rewrite a training batch before the forward pass (e.g. MEAP masking);
- `reduction`: "mean" (a per-batch mean, the default) or "sum" (a sum over target tokens that the recipe
  normalises by every target token of the accumulation window on all ranks: recipes/objectives/window.py);
- `loss(ctx)`: the unweighted loss; the recipe logs `train/loss_<name>` (unweighted) and
  `train/loss_<name>_weighted`, and adds `weight_at(step) * loss` to the total.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.attention_capture import CapturedQueryKey


@dataclass
class ObjectiveContext:
    """What one forward pass produced, as seen by objectives.

    batch: the (possibly transformed) batch; always has `attention_mask` [B,T] and `labels` [B,T]
        (-100 = no target; HF shifts internally), `input_ids` [B,T] for text recipes, and for AVSR
        `segments` [B,T] long (see `models/segments.py`).
    logits: [B,T,V] student logits (None on the fast path unless an objective `needs_logits`).
    hidden_states: HF tuple of L+1 tensors [B,T,D] (index 0 = embeddings, L = final normed state) or None.
    attention: layer index -> captured query [B,H,T,hd] / key [B,KV,T,hd].
    model: the (PEFT-wrapped) LLM, e.g. for a teacher-free objective that needs config.
    step: global optimisation step (for schedules).
    sample_key: seeds per-step random draws (ADL's query rows); equals `step` without gradient
        accumulation, and differs between the micro-batches of one step with it (`micro_batch_step`).
    """

    batch: dict
    logits: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attention: dict[int, CapturedQueryKey] = field(default_factory=dict)
    model: torch.nn.Module | None = None
    step: int = 0
    sample_key: int = 0


class Objective:
    """Base class; subclasses override what they need. The weight is 0 before `start_step`, then warms up
    linearly over `warmup_steps` (e.g. a loss switched on once a speech model has started to read its audio)."""

    name: str = "objective"
    needs_hidden_states: bool = False
    needs_logits: bool = False
    reduction: str = "mean"
    rewrites_token_ids: bool = False  # transform_batch edits `input_ids` (text recipes only)

    def __init__(self, weight: float = 1.0, warmup_steps: int = 0, start_step: int = 0):
        if weight < 0:
            raise ValueError(f"{self.name}: weight must be >= 0, got {weight}")
        if start_step < 0 or warmup_steps < 0:
            raise ValueError(f"{self.name}: start_step and warmup_steps must be >= 0")
        self.weight = float(weight)
        self.warmup_steps = int(warmup_steps)
        self.start_step = int(start_step)

    def weight_at(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if self.warmup_steps <= 0:
            return self.weight
        return self.weight * min(1.0, (step - self.start_step + 1) / self.warmup_steps)

    def attention_layers(self, num_layers: int) -> list[int] | None:
        return None

    def setup(self, model: torch.nn.Module, tokenizer) -> list[int]:
        return []

    def transform_batch(self, batch: dict, generator: torch.Generator | None) -> dict:
        return batch

    def loss(self, ctx: ObjectiveContext) -> torch.Tensor:
        raise NotImplementedError
