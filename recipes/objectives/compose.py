"""Compose auxiliary objectives around one LLM forward pass (shared by every recipe)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from models.attention_capture import QueryKeyCapture
from recipes.objectives.base import Objective, ObjectiveContext


def num_decoder_layers(llm: torch.nn.Module) -> int:
    return int(llm.config.num_hidden_layers)


class ObjectiveSet:
    """The active objectives of a run, keyed by their config name (`objective=[decorr,adl]`)."""

    def __init__(self, objectives: Mapping[str, Objective] | None = None):
        self.objectives = dict(objectives or {})
        for name, objective in self.objectives.items():
            if not isinstance(objective, Objective):
                raise TypeError(f"objective {name!r} is a {type(objective).__name__}, not an Objective")

    def __bool__(self) -> bool:
        return bool(self.objectives)

    @property
    def sums_over_tokens(self) -> bool:
        """True when an objective returns token sums (LeaF): the recipe then normalises per window.

        Such objectives cannot be mixed with per-batch-mean objectives of non-zero weight: the two need
        different gradient scales.
        """
        summed = [n for n, o in self.objectives.items() if o.reduction == "sum"]
        mixed = [n for n, o in self.objectives.items() if o.reduction != "sum" and o.weight > 0]
        if summed and mixed:
            raise ValueError(f"objectives {summed} sum over tokens and cannot be combined with {mixed}")
        return bool(summed)

    @property
    def needs_hidden_states(self) -> bool:
        return any(o.needs_hidden_states for o in self.objectives.values())

    def attention_layers(self, num_layers: int) -> list[int]:
        layers: set[int] = set()
        for objective in self.objectives.values():
            layers.update(objective.attention_layers(num_layers) or [])
        return sorted(layers)

    def setup(self, model: torch.nn.Module, tokenizer) -> list[int]:
        """Run every objective's setup before LoRA; return the token rows that must stay trainable."""
        token_ids: list[int] = []
        for objective in self.objectives.values():
            token_ids.extend(objective.setup(model, tokenizer))
        return sorted(set(token_ids))

    def transform_batch(self, batch: dict, step: int, seed: int) -> dict:
        """Rewrite a training batch; the generator is seeded by (seed, step), so resumed runs match.

        It lives on the batch's device, so drawing masks never waits for the GPU.
        """
        device = next((v.device for v in batch.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
        for objective in self.objectives.values():
            batch = objective.transform_batch(batch, generator)
        return batch

    def forward(
        self,
        llm: torch.nn.Module,
        llm_inputs: dict,
        batch: dict,
        step: int,
        training: bool = True,
        sample_key: int | None = None,
    ):
        """Run the LLM once, asking only for what the objectives need; return (outputs, context).
        `step` drives weight schedules; `sample_key` (default: step) seeds per-step random draws
        (ADL's rows): `micro_batch_step` gives each micro-batch of an accumulated step its own."""
        layers = self.attention_layers(num_decoder_layers(llm)) if training else []
        capture = QueryKeyCapture(llm, layers) if layers else contextlib.nullcontext({})
        with capture as captured:
            outputs = llm(**llm_inputs, output_hidden_states=training and self.needs_hidden_states)
        ctx = ObjectiveContext(
            batch=batch,
            logits=outputs.logits,
            hidden_states=outputs.hidden_states if training and self.needs_hidden_states else None,
            attention=dict(captured),
            model=llm,
            step=step,
            sample_key=step if sample_key is None else sample_key,
        )
        return outputs, ctx

    def losses(self, ctx: ObjectiveContext) -> dict[str, tuple[torch.Tensor, float]]:
        """name -> (unweighted loss, weight at this step)."""
        return {name: (o.loss(ctx), o.weight_at(ctx.step)) for name, o in self.objectives.items()}


def micro_batch_step(global_step: int, batch_idx: int, accumulate: int) -> int:
    """A key for objective randomness (MEAP masks, ADL rows) that differs between the micro-batches of one
    optimizer step: global_step * A + (batch_idx mod A). A = 1 (no accumulation): global_step, as before;
    resumed runs start at a window boundary, so they draw the same keys."""
    return global_step * accumulate + batch_idx % accumulate if accumulate > 1 else global_step


def accumulate_grad_batches(trainer) -> int:
    """Micro-batches per optimizer step (1 outside a Trainer)."""
    return trainer.accumulate_grad_batches if trainer is not None else 1


def total_loss(ce: torch.Tensor, losses: dict[str, tuple[torch.Tensor, float]], ce_weight: float = 1.0):
    """total = ce_weight * CE + sum_i w_i * L_i; returns (total, {log name: value})."""
    total = ce * ce_weight
    logs = {"loss_ce": ce.detach()}
    for name, (value, weight) in losses.items():
        total = total + weight * value
        logs[f"loss_{name}"] = value.detach()
        logs[f"loss_{name}_weighted"] = (weight * value).detach()
    logs["loss"] = total.detach()
    return total, logs
