"""BOS decorrelation as a recipe objective (docs/objectives.md); the maths is `losses/decorrelation.py`."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from losses.decorrelation import bos_cosines, bos_decorrelation_loss
from models.compiled import compile_by_default, compile_once
from models.segments import IGNORE_INDEX
from recipes.objectives.base import Objective, ObjectiveContext

TOKEN_SETS = ("input_side", "non_pad", "sinks")

log = logging.getLogger(__name__)


def input_side_mask(attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B,T] bool: non-pad positions before the row's first target (labels != -100); whole row if none."""
    is_target = labels != IGNORE_INDEX
    length = labels.shape[1]
    first_target = torch.where(
        is_target.any(1), is_target.int().argmax(1), torch.full_like(labels[:, 0], length)
    )
    before = torch.arange(length, device=labels.device)[None, :] < first_target[:, None]
    return before & attention_mask.bool()


EMPTY_CHECK_EVERY = 100  # batches between reads of the device-side count of empty selections


class BosDecorrelationObjective(Objective):
    """Penalise cos^2 between each selected hidden state and the first position's, mean over layers.

    Args:
        weight: reference default 1e4 (cos^2 of unrelated vectors is ~1/D).
        tokens: which positions are compared with position 0 (padding is always excluded):
            "input_side" (reference): every non-pad position before the row's first target token;
            "non_pad": every non-pad position;
            "sinks": non-pad positions whose cosine to position 0 exceeds `sink_threshold` in any chosen
                layer (detected without gradient on the current forward pass).
        layers: indices into the hidden-state tuple (1..L-1 by default; 0 = embeddings, L = final norm).
        margin: penalise only cos^2 above `margin`.
        compile: compute the loss through `torch.compile` (models/compiled.py); null (default) = on CUDA
            for models at least 1024 wide, where the step is large (the 1B fast path: 0.935x eager, 0.944x
            compiled), off for smaller ones (launch-bound) and on CPU.
    Assumes right padding (position 0 is a real token), as the text collator produces.
    """

    name = "decorr"
    needs_hidden_states = True

    def __init__(
        self,
        weight: float = 1.0e4,
        warmup_steps: int = 0,
        start_step: int = 0,
        tokens: str = "input_side",
        layers: Sequence[int] | None = None,
        margin: float = 0.0,
        sink_threshold: float = 0.5,
        compile: bool | None = None,
    ):
        super().__init__(weight, warmup_steps, start_step)
        if tokens not in TOKEN_SETS:
            raise ValueError(f"decorr.tokens must be one of {TOKEN_SETS}, got {tokens!r}")
        self.tokens = tokens
        self.layers = list(layers) if layers is not None else None
        self.margin = float(margin)
        self.sink_threshold = float(sink_threshold)
        self.compile = compile
        self.empty_batches = 0  # batches that selected no position, counted so far
        self._calls = 0
        self._pending_empty: torch.Tensor | None = None  # device-side count since the last read

    def token_mask(self, ctx: ObjectiveContext) -> torch.Tensor:
        attention_mask = ctx.batch["attention_mask"].bool()
        if self.tokens == "input_side":
            return input_side_mask(attention_mask, ctx.batch["labels"])
        if self.tokens == "non_pad":
            return attention_mask
        with torch.no_grad():
            cos = bos_cosines(ctx.hidden_states, self._layers(ctx))
        return (cos > self.sink_threshold).any(0) & attention_mask

    def _layers(self, ctx: ObjectiveContext) -> list[int]:
        last = len(ctx.hidden_states) - 1
        layers = self.layers if self.layers is not None else list(range(1, last))
        bad = [i for i in layers if not 0 <= i <= last]
        if bad:
            raise ValueError(f"decorr.layers {bad} out of range: hidden states are indexed 0..{last}")
        return layers

    def loss(self, ctx: ObjectiveContext) -> torch.Tensor:
        if ctx.hidden_states is None:
            raise ValueError(
                "decorr needs hidden states: the recipe must run the LLM with output_hidden_states"
            )
        mask = self.token_mask(ctx)
        self._count_empty(ctx, ~mask[:, 1:].any())
        loss_fn = bos_decorrelation_loss
        last = ctx.hidden_states[-1]  # [B,T,D]
        if compile_by_default(self.compile, last.device, last.shape[-1]):
            loss_fn = compile_once(bos_decorrelation_loss, dynamic=True)
        return loss_fn(ctx.hidden_states, mask, self._layers(ctx), self.margin)

    def _count_empty(self, ctx: ObjectiveContext, empty: torch.Tensor) -> None:
        """Count batches that select no position without a host sync in every step: the first batch is read
        at once (a structural empty selection raises before any training), later ones add to a device-side
        count read every EMPTY_CHECK_EVERY batches (reading it waits for the forward pass, which a
        launch-bound fast step cannot afford each step)."""
        self._calls += 1
        if self._calls == 1:
            if bool(empty):
                self._nothing_selected(ctx, 1)
            return
        pending = self._pending_empty
        self._pending_empty = empty.long() if pending is None else pending + empty
        if self._calls % EMPTY_CHECK_EVERY == 0:
            count, self._pending_empty = int(self._pending_empty), None
            if count:
                self._nothing_selected(ctx, count)

    def _nothing_selected(self, ctx: ObjectiveContext, count: int) -> None:
        """`count` batches selected no position t >= 1: their loss was 0. Raise when that is structural
        (input_side on data where every real position is a target, e.g. data=text_lm), warn otherwise."""
        real = ctx.batch["attention_mask"].bool()
        every_position_is_a_target = bool((ctx.batch["labels"] != IGNORE_INDEX)[real].all())
        if self.tokens == "input_side" and every_position_is_a_target:
            raise ValueError(
                "decorr with tokens=input_side selects nothing: every position of the batch is a target "
                "(plain-text LM data such as data=text_lm has no input side), so the loss would stay 0. "
                "Set objective.decorr.tokens=non_pad (or tokens=sinks)."
            )
        self.empty_batches += count
        log.warning(
            "decorr (tokens=%s) selected no position in %d batch(es): the loss was 0 there "
            "(%d such batches so far)",
            self.tokens,
            count,
            self.empty_batches,
        )
