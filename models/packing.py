"""What the LLM is given for a padded batch or a packed one (data/text/packing.py)."""

from __future__ import annotations

from collections.abc import Mapping


def is_packed(batch: Mapping) -> bool:
    return "position_ids" in batch


def llm_inputs(batch: Mapping) -> dict:
    """Padded: input_ids / attention_mask / labels. Packed: input_ids / position_ids / labels and NO
    attention mask, so transformers derives the per-document causal mask from the restarting positions
    (it does so only without a KV cache: use_cache=False). Training never wants a KV cache: without
    use_cache=False transformers builds one every forward, and its per-layer state makes every compiled
    decoder layer of the fast path a separate graph."""
    if is_packed(batch):
        return {**{k: batch[k] for k in ("input_ids", "position_ids", "labels")}, "use_cache": False}
    return {**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}, "use_cache": False}


def check_packing(batch: Mapping, objective_names) -> None:
    """Objectives read row structure (BOS at position 0, MEAP row copies, ADL rows, a teacher fed the
    attention mask): refuse packed batches for them."""
    names = sorted(objective_names)
    if is_packed(batch) and names:
        raise ValueError(
            f"objectives {names} need one document per row (BOS at position 0, row copies, row samples); "
            "packed batches hold several: set data.packing=false"
        )
