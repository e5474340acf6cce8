"""LeaF stage 1, response level: confounders in the instruction and the response prefix, per reasoning step.

The response is split at step markers (a regex, e.g. a newline or `Step \\d+:`); for every step k >= 1 the
context is the instruction plus steps 0..k-1 and the target is step k. As at the instruction level
(docs/objectives.md, LeaF): CE on the target tokens back-propagated to the input embeddings in the teacher and in the
student, g_i = ||dL/de_i|| for the context tokens (the user's text and the prefix; no template or special
tokens), d = confounder_scores(g_T, g_S), confounders d <= min(quantile, cap), whitespace never pruned, and one
counterfactual row per contiguous span (a span never runs from the instruction into the prefix).

A counterfactual row is the original row with the span cut out of its prompt or response prefix and the
response ending after step k: {..., "prompt", "response": prefix + step k, "counterfactual": true,
"source_index", "pruned_text", "step": k, "pruned_from": "prompt" | "response"}.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch

from losses.leaf import IGNORE_INDEX, confounder_scores, confounder_spans

DEFAULT_STEP_MARKER = r"\n+"  # a step ends after each run of newlines


def split_steps(response: str, marker: str = DEFAULT_STEP_MARKER) -> list[str]:
    """Cut `response` after every match of `marker` (zero-width markers such as `(?=Step \\d+:)` cut before
    the step). The steps concatenate back to the response; empty pieces are dropped."""
    cuts = sorted({m.end() for m in re.finditer(marker, response)} - {0, len(response)})
    bounds = [0, *cuts, len(response)]
    return [response[a:b] for a, b in zip(bounds, bounds[1:]) if response[a:b]]


@dataclass
class PrefixScoringInput:
    """One (row, step) tokenised: ids/labels [T] (labels = step k's tokens), the scored context positions,
    their character spans in the prompt or in the response, which text each belongs to, and whitespace flags."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: list[int]
    char_spans: list[tuple[int, int]]
    in_prompt: list[bool]
    whitespace: torch.Tensor


def tokenize_prefix_for_scoring(
    tokenizer, prompt: str, steps: list[str], k: int, system: str | None = None, max_length: int = 1024
) -> PrefixScoringInput | None:
    """Context = prompt + steps[:k], target = steps[k]; None when nothing is left to score or predict."""
    from leaf_prepare import render  # the same chat rendering as the instruction level

    prefix, target = "".join(steps[:k]), steps[k]
    before, full, start = render(tokenizer, prompt, prefix + target, system)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"][:max_length], encoded["offset_mapping"][:max_length]
    special = set(tokenizer.all_special_ids)
    response_start = len(before)
    prefix_end, target_end = response_start + len(prefix), response_start + len(prefix) + len(target)
    positions, spans, in_prompt = [], [], []
    labels = []
    for i, ((a, b), token) in enumerate(zip(offsets, ids)):
        labels.append(token if prefix_end <= a < target_end and b > a else IGNORE_INDEX)
        if b <= a or token in special:
            continue
        if start <= a and b <= start + len(prompt):
            positions.append(i), spans.append((a - start, b - start)), in_prompt.append(True)
        elif response_start <= a and b <= prefix_end:
            (
                positions.append(i),
                spans.append((a - response_start, b - response_start)),
                in_prompt.append(False),
            )
    if not positions or all(label == IGNORE_INDEX for label in labels):
        return None
    texts = [prompt if p else prefix for p in in_prompt]
    whitespace = torch.tensor([not text[a:b].strip() for text, (a, b) in zip(texts, spans)])
    return PrefixScoringInput(
        torch.tensor(ids), torch.tensor(labels), positions, spans, in_prompt, whitespace
    )


def split_at_region_change(spans: list[tuple[int, int]], in_prompt: list[bool]) -> list[tuple[int, int]]:
    """Cut index spans [first, last) where the scored tokens pass from the prompt to the response prefix."""
    out = []
    for first, last in spans:
        start = first
        for i in range(first + 1, last):
            if in_prompt[i] != in_prompt[i - 1]:
                out.append((start, i))
                start = i
        out.append((start, last))
    return out


def step_counterfactuals(
    row: dict,
    index: int,
    steps: list[str],
    k: int,
    item: PrefixScoringInput,
    g_teacher: torch.Tensor,
    g_student: torch.Tensor,
    quantile: float,
    cap: float,
    prompt_field: str = "prompt",
    response_field: str = "response",
) -> list[dict]:
    """One row per confounder span of the (instruction + prefix) context of step k.

    g_teacher, g_student: the gradient norms at the context positions (`leaf_prepare.score_items`).
    """
    scores = confounder_scores(g_teacher, g_student)
    spans = confounder_spans(scores, quantile, cap, protected=item.whitespace)
    prompt, prefix, target = row[prompt_field], "".join(steps[:k]), steps[k]
    rows = []
    for first, last in split_at_region_change(spans, item.in_prompt):
        cut_start, cut_end = item.char_spans[first][0], item.char_spans[last - 1][1]
        if item.in_prompt[first]:
            new_prompt, new_prefix, pruned = (
                prompt[:cut_start] + prompt[cut_end:],
                prefix,
                prompt[cut_start:cut_end],
            )
        else:
            new_prompt, new_prefix, pruned = (
                prompt,
                prefix[:cut_start] + prefix[cut_end:],
                prefix[cut_start:cut_end],
            )
        rows.append(
            {
                **row,
                prompt_field: new_prompt,
                response_field: new_prefix + target,
                "counterfactual": True,
                "source_index": index,
                "pruned_text": pruned,
                "step": k,
                "pruned_from": "prompt" if item.in_prompt[first] else "response",
            }
        )
    return rows


def prepare_response_level(
    rows: list[dict],
    teacher,
    student,
    tokenizer,
    quantile: float = 0.10,
    cap: float = 0.5,
    max_length: int = 1024,
    prompt_field: str = "prompt",
    response_field: str = "response",
    step_marker: str = DEFAULT_STEP_MARKER,
    progress: bool = True,
    batch_size: int = 8,
) -> tuple[list[dict], Counter]:
    """Original rows (`"counterfactual": false`), each followed by its per-step counterfactual rows; plus counts.

    batch_size: (row, step) contexts scored per forward/backward, across rows; 1 = one at a time.
    """
    from leaf_prepare import prepare_each

    def row_items(index: int, row: dict, prompt: str, response: str, counts: Counter):
        steps = split_steps(response, step_marker)
        if len(steps) < 2:
            counts["skipped: fewer than 2 steps"] += 1
            return None
        items = []
        for k in range(1, len(steps)):
            item = tokenize_prefix_for_scoring(tokenizer, prompt, steps, k, row.get("system"), max_length)
            if item is None:
                counts["steps skipped: nothing to score"] += 1
                continue
            counts["steps scored"] += 1
            items.append(((steps, k), item))
        return items

    def item_counterfactuals(index: int, row: dict, key, item: PrefixScoringInput, g_teacher, g_student):
        steps, k = key
        return step_counterfactuals(
            row, index, steps, k, item, g_teacher, g_student, quantile, cap, prompt_field, response_field
        )

    return prepare_each(
        rows,
        row_items,
        item_counterfactuals,
        teacher,
        student,
        prompt_field=prompt_field,
        response_field=response_field,
        batch_size=batch_size,
        desc="leaf (response level)",
        unit="step",
        progress=progress,
    )
