"""Keep a subset of a causal LM's decoder layers: a smaller student with the teacher's tokenizer.

For the offline LeaF demo: teacher = SmolLM2-135M (30 layers), student = the same checkpoint with every
other layer (`layers="::2"`, 15 layers), so both share one tokenizer, as LeaF requires.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def parse_layer_selection(layers: str | int | Sequence[int], num_layers: int) -> list[int]:
    """Layer indices from a list (``[0, 2, 29]`` or ``"0,2,29"``), a slice string (``"::2"``, ``"0:12"``)
    or a stride (``2``)."""
    if isinstance(layers, int):
        chosen = list(range(0, num_layers, layers))
    elif isinstance(layers, str) and ":" not in layers:
        chosen = [int(p) for p in layers.split(",") if p.strip()]
    elif isinstance(layers, str):
        parts = [int(p) if p.strip() else None for p in layers.split(":")]
        if len(parts) > 3:
            raise ValueError(f"bad layer slice {layers!r}; use start:stop:step")
        chosen = list(range(num_layers))[slice(*parts)]
    else:
        chosen = [int(i) for i in layers]
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"layer selection {layers!r} gives {chosen}: need distinct indices in 0..{num_layers - 1}"
        )
    return chosen


def keep_decoder_layers(model: torch.nn.Module, layers: str | int | Sequence[int]) -> torch.nn.Module:
    """Drop every decoder layer not in `layers` (in place) and renumber `layer_idx` 0..n-1.

    Renumbering keeps KV caches and `models.attention_capture` consistent; `config.num_hidden_layers`
    (and `config.layer_types`, when the architecture has it) follow.
    """
    decoder = model.get_decoder()
    chosen = parse_layer_selection(layers, len(decoder.layers))
    decoder.layers = torch.nn.ModuleList(decoder.layers[i] for i in chosen)
    for new_index, layer in enumerate(decoder.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(chosen)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in chosen]
    return model


def build_layer_subset(backbone: Callable, layers: str | int | Sequence[int]):
    """(model, tokenizer) of `backbone()` with only `layers` kept (Hydra: wrap any backbone node)."""
    model, tokenizer = backbone()
    return keep_decoder_layers(model, layers), tokenizer
