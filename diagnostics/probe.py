"""Measure attention sinks and massive activations of a causal LM on one batch, with fused attention kept.

One no-grad forward with `QueryKeyCapture` (post-RoPE q/k of every measured layer) and
`output_hidden_states`; attention to the few keys of interest is then recomputed from q/k in query chunks
(`attention_to_keys`, O(T) memory per head and key), so the model never switches to eager attention.
"""

from __future__ import annotations

import inspect

import torch

from diagnostics import sink_metrics as sm
from diagnostics.report import LayerSinks, SinkReport
from models.attention_capture import QueryKeyCapture, sampled_attention_probs
from models.segments import NAMES as SEGMENT_NAMES
from models.segments import PAD


def valid_token_mask(llm_inputs: dict, segments: torch.Tensor | None) -> torch.Tensor:
    """[B,T] bool of real tokens: the attention mask, else `segments != PAD`, else all True."""
    if llm_inputs.get("attention_mask") is not None:
        valid = llm_inputs["attention_mask"].bool()
    elif segments is not None:
        valid = segments != PAD
    else:
        reference = llm_inputs["input_ids"] if "input_ids" in llm_inputs else llm_inputs["inputs_embeds"]
        valid = torch.ones(reference.shape[:2], dtype=torch.bool, device=reference.device)
    if not bool(valid[:, 0].all()):
        raise ValueError("sink probes need right padding: position 0 must be a real token in every sample")
    return valid


def _accepts(llm: torch.nn.Module, argument: str) -> bool:
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return argument in inspect.signature(base.forward).parameters


def _forward_with_capture(llm, llm_inputs: dict, layers) -> tuple[tuple[torch.Tensor, ...], dict]:
    """Run the model once; return (hidden_states, {layer: CapturedQueryKey})."""
    inputs = {k: v for k, v in llm_inputs.items() if k != "labels"}
    if _accepts(llm, "logits_to_keep"):
        inputs["logits_to_keep"] = 1  # the probe needs no logits; skip the [B,T,V] projection
    was_training = llm.training
    llm.eval()
    try:
        with QueryKeyCapture(llm, layers) as captured:
            outputs = llm(**inputs, output_hidden_states=True, use_cache=False)
    finally:
        llm.train(was_training)
    return outputs.hidden_states, dict(captured)


def _segment_metrics(cosine, attention_to_first, valid, segments) -> dict[str, dict[str, float]]:
    """Per segment kind: BOS cosine and first-token attention of its tokens (t >= 1), and its token count."""
    result = {}
    for segment_id in torch.unique(segments[valid]).tolist():
        name = SEGMENT_NAMES.get(int(segment_id), str(segment_id))
        tokens = valid & (segments == segment_id)
        queries = sm.query_positions_mask(tokens, 1)
        if not queries.any():
            continue
        result[name] = {
            "bos_cosine": sm.mean_bos_cosine(cosine, tokens),
            "first_token_attention": float(
                sm.mean_attention_from_queries(attention_to_first, queries).mean()
            ),
            "tokens": int(queries.sum()),
        }
    return result


@torch.no_grad()
def measure_sinks(
    llm: torch.nn.Module,
    llm_inputs: dict,
    segments: torch.Tensor | None = None,
    *,
    layers: list[int] | None = None,
    sink_key_position: int = 0,
    sink_eps: float = 0.3,
    intermediate_cosine_threshold: float = 0.8,
    intermediate_attention_threshold: float = 0.2,
    max_intermediate_candidates: int = 32,
    num_top_features: int = 3,
    num_bos_features: int = 1,
    chunk_size: int = 256,
    tokenizer=None,
    tracked_sinks: list[dict] | None = None,
) -> SinkReport:
    """Sink metrics of every (or the chosen) decoder layer of `llm` on one right-padded batch.

    Args:
        llm: HF causal LM or PEFT model with fused (sdpa/flash) attention; left in its train/eval mode.
        llm_inputs: kwargs of its forward: input_ids [B,T] or inputs_embeds [B,T,D], attention_mask [B,T].
        segments: [B,T] long segment ids (models.segments) for per-segment numbers, or None.
        layers: decoder layers to measure (0-based; layer i = hidden_states[i + 1]); None = all.
        sink_key_position, sink_eps: key k and threshold of the sink rate.
        intermediate_*: thresholds for tokens t > 0 that act as sinks (cosine to BOS, received attention).
        num_bos_features: how many of BOS's largest features count as its massive features.
        tokenizer: optional, names the tokens of intermediate sinks when input_ids are given.
        tracked_sinks: sinks found earlier on the same batch (`SinkReport.intermediate_sinks` entries:
            sample, position, layers); each layer then also reports `tracked_sink_*` for those in its
            `layers` (count, attention, bos_cosine, max_activation), whether or not they still pass.
            None = track the sinks found now (what the first measurement of a run reports).
    """
    valid = valid_token_mask(llm_inputs, segments)
    hidden_states, captured = _forward_with_capture(llm, llm_inputs, layers)
    fixed_keys = [0] if sink_key_position == 0 else [0, sink_key_position]
    rows, found = [], {}
    for layer in sorted(captured):  # each layer's q/k is released once used
        hidden = hidden_states[layer + 1]
        cosine = sm.bos_cosine(hidden)
        candidates = sm.intermediate_sink_candidates(
            cosine, valid, intermediate_cosine_threshold, max_intermediate_candidates
        )
        tracked = _tracked_pairs(tracked_sinks, layer, valid)
        extra_keys = torch.unique(
            torch.cat(
                [
                    candidates,
                    torch.tensor([p for _, p in tracked], dtype=torch.long, device=candidates.device),
                ]
            )
        )
        keys = torch.cat([torch.tensor(fixed_keys, device=candidates.device), extra_keys])
        attention, entropy = _attention_to_keys_and_entropy(
            captured.pop(layer), keys.to(hidden.device), valid, chunk_size
        )
        entropy_nats, entropy_normalised = sm.attention_entropy(entropy, valid)
        per_head = sm.first_token_attention_per_head(attention[..., 0], valid)
        massive = sm.massive_activation(hidden, valid)
        received = sm.received_attention(attention[..., len(fixed_keys) :], extra_keys, valid)  # [B,P]
        key_cosine = cosine[:, extra_keys.to(cosine.device)]
        flagged = sm.intermediate_sink_mask(
            key_cosine,
            received,
            extra_keys,
            valid,
            intermediate_cosine_threshold,
            intermediate_attention_threshold,
        )
        features = sm.bos_massive_features(hidden, num_bos_features)
        sinks = _sink_numbers(hidden, valid, flagged, received, key_cosine, features, massive.median)
        tracked_mask = flagged if tracked_sinks is None else _pairs_mask(tracked, extra_keys, valid.shape[0])
        tracked_numbers = _sink_numbers(
            hidden, valid, tracked_mask, received, key_cosine, features, massive.median, extra_keys
        )
        by_segment = {}
        if segments is not None:
            by_segment = _segment_metrics(cosine, attention[..., 0], valid, segments)
            _add_segment_sinks(
                by_segment,
                hidden,
                valid,
                segments,
                flagged,
                received,
                key_cosine,
                features,
                massive.median,
                extra_keys,
            )
        rows.append(
            LayerSinks(
                layer=layer,
                first_token_attention=float(per_head.mean()),
                sink_rate=sm.sink_rate_percent(
                    attention[..., len(fixed_keys) - 1], valid, sink_key_position, sink_eps
                ),
                max_activation=massive.value,
                max_activation_position=massive.position,
                max_activation_feature=massive.feature,
                activation_ratio=massive.ratio,
                bos_cosine=sm.mean_bos_cosine(cosine, valid),
                max_activation_sample=massive.sample,
                median_activation=massive.median,
                first_token_attention_per_head=per_head.tolist(),
                top_features=sm.top_feature_magnitudes(hidden, valid, num_top_features),
                by_segment=by_segment,
                **{f"intermediate_sink_{k}": v for k, v in sinks.items()},
                bos_massive_features=features.tolist(),
                attention_entropy=entropy_nats,
                attention_entropy_normalized=entropy_normalised,
                **{f"tracked_sink_{k}": v for k, v in tracked_numbers.items() if k != "activation_ratio"},
            )
        )
        flagged_list = [
            (int(b), int(extra_keys[p]), float(key_cosine[b, p]), float(received[b, p]))
            for b, p in flagged.nonzero().tolist()
        ]
        _collect_intermediate(found, flagged_list, layer, llm_inputs, segments, tokenizer)
    return SinkReport(
        layers=rows,
        num_samples=int(valid.shape[0]),
        num_tokens=int(valid.sum()),
        uniform_first_token_attention=sm.uniform_first_token_attention(valid),
        sink_key_position=sink_key_position,
        sink_eps=sink_eps,
        intermediate_sinks=sorted(found.values(), key=lambda s: (s["sample"], s["position"])),
    )


def _attention_to_keys_and_entropy(captured, keys: torch.Tensor, valid: torch.Tensor, chunk_size: int):
    """Like `attention_to_keys`, streamed over query chunks, plus each query row's entropy.

    Returns ([B,H,T,P] attention to `keys`, [B,H,T] entropy -sum p log p in nats; 0 for rows with no key)."""
    q_len = captured.query.shape[2]
    device = captured.query.device
    selected, entropies = [], []
    for start in range(0, q_len, chunk_size):
        positions = torch.arange(start, min(start + chunk_size, q_len), device=device)
        probs = sampled_attention_probs(captured, positions, valid.long(), True)  # [B,H,S,T]
        selected.append(probs.index_select(-1, keys))
        entropies.append(-(probs * probs.clamp_min(1e-30).log()).sum(-1))
    return torch.cat(selected, dim=2), torch.cat(entropies, dim=2)


def _tracked_pairs(tracked_sinks, layer: int, valid: torch.Tensor) -> list[tuple[int, int]]:
    """(sample, position) of the tracked sinks that were sinks in `layer` and exist in this batch."""
    batch, length = valid.shape
    return [
        (int(s["sample"]), int(s["position"]))
        for s in tracked_sinks or []
        if layer in s["layers"]
        and s["sample"] < batch
        and 0 < s["position"] < length
        and bool(valid[s["sample"], s["position"]])
    ]


def _pairs_mask(pairs: list[tuple[int, int]], key_positions: torch.Tensor, batch: int) -> torch.Tensor:
    """[B,P] bool: True at (sample, index of position in key_positions) for each pair."""
    mask = torch.zeros(batch, key_positions.numel(), dtype=torch.bool, device=key_positions.device)
    index = {int(p): i for i, p in enumerate(key_positions.tolist())}
    for sample, position in pairs:
        mask[sample, index[position]] = True
    return mask


def _sink_numbers(hidden, valid, flagged, received, key_cosine, features, median, key_positions=None) -> dict:
    """count/attention/bos_cosine of the flagged sinks, and max |h| on BOS's features with its ratio to the
    median: over every valid position >= 1 (key_positions None) or over the flagged (sample, key) pairs."""
    numbers = sm.sink_summary(flagged, received, key_cosine, valid.shape[0])
    if key_positions is None:
        value = sm.max_activation_on_features(hidden, valid, features)
    else:
        token_mask = torch.zeros_like(valid, dtype=torch.bool)
        rows, cols = flagged.nonzero(as_tuple=True)
        token_mask[rows.to(valid.device), key_positions.to(valid.device)[cols]] = True
        value = sm.max_activation_on_features(hidden, token_mask, features)
    numbers["max_activation"] = value
    numbers["activation_ratio"] = value / max(median, 1e-12)
    return numbers


def _add_segment_sinks(
    by_segment, hidden, valid, segments, flagged, received, key_cosine, features, median, keys
):
    """Per segment kind (audio, video, prompt, transcript): the intermediate-sink numbers of its tokens."""
    key_segments = segments[:, keys.to(segments.device)]  # [B,P]
    for segment_id in torch.unique(segments[valid]).tolist():
        name = SEGMENT_NAMES.get(int(segment_id), str(segment_id))
        if name not in by_segment:
            continue
        numbers = sm.sink_summary(
            flagged & (key_segments == segment_id), received, key_cosine, valid.shape[0]
        )
        value = sm.max_activation_on_features(hidden, valid & (segments == segment_id), features)
        numbers.update(max_activation=value, activation_ratio=value / max(median, 1e-12))
        by_segment[name].update({f"intermediate_sink_{k}": v for k, v in numbers.items()})


def _collect_intermediate(found: dict, flagged, layer: int, llm_inputs: dict, segments, tokenizer) -> None:
    """Merge one layer's flagged tokens into `found`, keyed by (sample, position)."""
    for sample, position, cosine, attention in flagged:
        entry = found.get((sample, position))
        if entry is None:
            token = ""
            if tokenizer is not None and "input_ids" in llm_inputs:
                token = tokenizer.convert_ids_to_tokens(int(llm_inputs["input_ids"][sample, position]))
            segment = SEGMENT_NAMES.get(int(segments[sample, position]), "") if segments is not None else ""
            entry = found[(sample, position)] = {
                "sample": sample,
                "position": position,
                "token": token,
                "segment": segment,
                "layers": [],
                "max_bos_cosine": cosine,
                "max_received_attention": attention,
            }
        entry["layers"].append(layer)
        entry["max_bos_cosine"] = max(entry["max_bos_cosine"], cosine)
        entry["max_received_attention"] = max(entry["max_received_attention"], attention)
