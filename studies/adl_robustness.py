"""Study 5: the Attention Diversification Loss (ADL) on text: fewer sinks, same quality, more robust?

Arms (same seed, data and steps): CE alone (`baseline`) and CE + ADL at a few weights (SmolLM2-135M, LoRA,
`data=pd_text`). Per arm, from the final sink measurement on the first held-out batch: attention entropy
and sink rate (Gu et al., key 0, eps 0.3) per layer; quality: validation perplexity; robustness:
perplexity on held-out test blocks (never trained on) with random noise tokens inserted at 10% and 25%
of the positions (the noise tokens are context only: perplexity counts the original tokens).

Goal (issue 8): sink rate down with quality flat.

    python studies/adl_robustness.py                    # GPU: 1000 steps per arm, B=32, T=256, bf16
    python studies/adl_robustness.py --weights 0.3,1 --steps 2000
    python studies/adl_robustness.py --smoke            # CPU, tiny random model, seconds (tests)

Arms run through studies/arms.py (resumable); writes `<out>/report.md` (table and plots) and
`<out>/noise_robustness.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from diagnostics.report import band_layers, layer_mean  # noqa: E402
from models.segments import IGNORE_INDEX  # noqa: E402
from studies.arms import Arm, arm_results, run_arms  # noqa: E402
from studies.report import (  # noqa: E402
    commands_section,
    fmt,
    grouped_bar_plot,
    line_plot,
    load_arm,
    markdown_table,
    percent_change,
    write_report,
)
from studies.text_lm import (  # noqa: E402
    add_common_options,
    common_overrides,
    corpus_dir,
    finish_common_options,
    prepare_corpus,
)

BASELINE = "baseline"
NOISE_RATES = (0.0, 0.1, 0.25)
GOAL_PPL_PERCENT = 5.0


def arm_name(weight: float) -> str:
    return f"adl_w{weight:g}"


def build_arms(args: argparse.Namespace) -> list[Arm]:
    common = common_overrides(args)
    arms = [Arm(BASELINE, ["experiment=lm_sft", *common, "task_name=adl_robustness_baseline"])]
    for weight in args.weights:
        arms.append(
            Arm(
                arm_name(weight),
                [
                    "experiment=lm_adl",
                    *common,
                    f"task_name=adl_robustness_{arm_name(weight)}",
                    f"objective.adl.weight={weight:g}",
                    f"objective.adl.warmup_steps={max(1, args.steps // 10)}",
                ],
            )
        )
    return arms


# ------------------------------------------------------------------------------------ noise robustness
def token_blocks(text: str, tokenizer, length: int, count: int) -> list[list[int]]:
    """The first `count` blocks of `length` tokens of a held-out text (BOS first when the tokenizer has one)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = length - len(bos)
    return [bos + ids[i : i + step] for i in range(0, len(ids) - step + 1, step)][:count]


def insert_noise(
    block: list[int], rate: float, vocab: list[int], generator: torch.Generator
) -> tuple[list[int], list[bool]]:
    """Insert round(rate * len) random tokens from `vocab` at random positions >= 1.

    Returns (token ids, is_original flags): position 0 stays first; perplexity counts original tokens only.
    """
    count = round(rate * len(block))
    ids, original = list(block), [True] * len(block)
    for _ in range(count):
        where = int(torch.randint(1, len(ids) + 1, (1,), generator=generator))
        token = vocab[int(torch.randint(len(vocab), (1,), generator=generator))]
        ids.insert(where, token)
        original.insert(where, False)
    return ids, original


@torch.no_grad()
def noisy_perplexity(
    model, blocks: list[tuple[list[int], list[bool]]], pad_id: int, batch_size: int = 16
) -> float:
    """exp(mean CE) over the original tokens at positions >= 1 of the (noised) blocks; right padding."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        chunk = blocks[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, original) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
            keep = torch.tensor(original) & (torch.arange(len(ids)) >= 1)
            labels[row, : len(ids)] = torch.where(keep, torch.tensor(ids), torch.tensor(IGNORE_INDEX))
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        targets = labels[:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += float(losses)
        count += int((targets != IGNORE_INDEX).sum())
    return math.exp(min(30.0, total / max(count, 1)))


def evaluate_noise(run_dir: Path, test_file: Path, args: argparse.Namespace) -> dict[str, float]:
    """Perplexity of one trained arm on the held-out test blocks at each noise rate (same noise for every arm)."""
    from analyze import load_run

    model, tokenizer, _ = load_run(str(run_dir))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    blocks = token_blocks(test_file.read_text(encoding="utf-8"), tokenizer, args.seq_len, args.noise_blocks)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = {}
    for rate in NOISE_RATES:
        generator = torch.Generator().manual_seed(args.seed)
        noised = [insert_noise(block, rate, vocab, generator) for block in blocks]
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            result[f"{rate:g}"] = noisy_perplexity(model, noised, pad_id)
    result["blocks"] = len(blocks)
    return result


# ---------------------------------------------------------------------------------------------- report
def report(out: Path, arm_names: list[str], noise: dict[str, dict]) -> Path:
    arms = [load_arm(out / name, name) for name in arm_names]
    base = next(a for a in arms if a.name == BASELINE)
    headers = [
        "arm",
        "step",
        "sink rate % (all layers)",
        "sink rate % (late)",
        "attn entropy / log(keys)",
        "first-token attn",
        "val ppl",
        "vs baseline",
        *[f"test ppl, {100 * rate:g}% noise" for rate in NOISE_RATES],
        "noise 25% vs clean",
        "goal met",
    ]
    rows, per_layer = [], {}
    base_rate = layer_mean(base.sinks, "sink_rate") if base.sinks else float("nan")
    for arm in arms:
        sinks = arm.sinks or {"layers": []}
        late = band_layers(sinks, sinks.get("layer_bands")).get("late") if sinks["layers"] else None
        rate = layer_mean(sinks, "sink_rate") if sinks["layers"] else float("nan")
        ppl_change = percent_change(arm.after("val/perplexity"), base.after("val/perplexity"))
        arm_noise = noise.get(arm.name, {})
        noisy = [arm_noise.get(f"{rate_:g}", float("nan")) for rate_ in NOISE_RATES]
        met = (
            "-"
            if arm is base
            else ("yes" if rate < base_rate and abs(ppl_change) <= GOAL_PPL_PERCENT else "no")
        )
        rows.append(
            [
                arm.name if arm.finished else f"{arm.name} (unfinished)",
                str(arm.results.get("step", "n/a")),
                fmt(rate, 1),
                fmt(layer_mean(sinks, "sink_rate", late) if late else float("nan"), 1),
                fmt(layer_mean(sinks, "attention_entropy_normalized") if sinks["layers"] else float("nan")),
                fmt(layer_mean(sinks, "first_token_attention") if sinks["layers"] else float("nan")),
                fmt(arm.after("val/perplexity"), 2),
                fmt(ppl_change, 1, "%"),
                *[fmt(value, 2) for value in noisy],
                fmt(percent_change(noisy[-1], noisy[0]), 1, "%"),
                met,
            ]
        )
        per_layer[arm.name] = sinks["layers"]

    def layer_curves(metric: str) -> dict:
        return {
            name: ([r["layer"] for r in rows_], [r.get(metric, math.nan) for r in rows_])
            for name, rows_ in per_layer.items()
        }

    plots = {
        "sink rate per layer": line_plot(
            layer_curves("sink_rate"),
            out / "sink_rate_per_layer.png",
            "sink rate per layer (last step)",
            "layer",
            "%",
        ),
        "attention entropy per layer": line_plot(
            layer_curves("attention_entropy_normalized"),
            out / "attention_entropy_per_layer.png",
            "attention entropy / log(visible keys), last step",
            "layer",
            "normalised entropy",
        ),
        "sink rate over training": line_plot(
            {a.name: a.curve("sinks/sink_rate/mean") for a in arms},
            out / "sink_rate_over_training.png",
            "sink rate, mean over layers",
            "step",
            "%",
        ),
        "test perplexity under noise": grouped_bar_plot(
            {
                f"{100 * rate:g}% noise": {
                    a.name: noise.get(a.name, {}).get(f"{rate:g}", math.nan) for a in arms
                }
                for rate in NOISE_RATES
            },
            out / "noise_perplexity.png",
            "held-out test perplexity with inserted noise tokens",
            "perplexity",
        ),
    }
    blocks = next((n.get("blocks") for n in noise.values()), "n/a")
    intro = (
        f"Arms: {', '.join(a.name for a in arms)}; same seed, data (`data=pd_text`) and steps. Sink rate and "
        "entropy: the last sink measurement on the first held-out batch (sink rate: % of (sample, head) pairs "
        "whose mean attention to position 0 exceeds 0.3; entropy: mean over heads and queries of the attention "
        f"entropy divided by log of the visible keys, 1 = uniform). Noise: {blocks} held-out test blocks with "
        "random tokens inserted at 10% / 25% of the positions; perplexity over the original tokens only. "
        f"Goal: sink rate below the baseline arm's with validation perplexity within {GOAL_PPL_PERCENT:g}%."
    )
    path = write_report(
        out / "report.md",
        "Study 5: ADL on text (SmolLM2-135M, LoRA): sinks, entropy, noise robustness",
        [intro, markdown_table(headers, rows), commands_section(arms)],
        plots,
    )
    print(path.read_text(), flush=True)
    return path


def link_baseline(out: Path, source: Path) -> None:
    """<out>/baseline -> `source` (a baseline arm trained by another study with the same overrides)."""
    out.mkdir(parents=True, exist_ok=True)
    link = out / BASELINE
    if link.is_symlink() or link.exists():
        if link.resolve() != source.resolve():
            raise FileExistsError(
                f"{link} exists and is not a link to {source}: remove it or drop --baseline-from"
            )
        return
    link.symlink_to(source.resolve(), target_is_directory=True)


def wait_for_finished(run_dir: Path, timeout_s: float, poll_s: float = 10.0) -> None:
    """Block until the arm in `run_dir` has finished (studies/arms.arm_results), or raise after `timeout_s`."""
    import time

    start = last = time.monotonic()
    while arm_results(run_dir.parent, Arm(run_dir.name)) is None:
        now = time.monotonic()
        if now - start > timeout_s:
            raise TimeoutError(f"{run_dir} has no results.json after {timeout_s:.0f} s: did that run fail?")
        if now - last >= 60:
            print(f"[study] waiting for {run_dir} to finish ({now - start:.0f} s)", flush=True)
            last = now
        time.sleep(poll_s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(parser)
    parser.add_argument("--weights", default="1", help="ADL weights, comma-separated (default 1)")
    parser.add_argument(
        "--noise-blocks", type=int, default=None, help="held-out test blocks (default 128; smoke 4)"
    )
    parser.add_argument(
        "--baseline-from",
        default=None,
        help="the baseline arm of another text-LM study with the same options (e.g. <decorr_text>/baseline): "
        "linked instead of trained again; waits until it has finished",
    )
    parser.add_argument("--baseline-wait-s", type=float, default=7200, help="how long to wait for it")
    args = finish_common_options(parser.parse_args(argv), "adl_robustness")
    args.weights = [float(w) for w in args.weights.split(",") if w.strip()]
    args.noise_blocks = args.noise_blocks or (4 if args.smoke else 128)
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    arms = build_arms(args)
    out = Path(args.out)
    if not args.report_only:
        prepare_corpus(args)
        if args.baseline_from:
            link_baseline(out, Path(args.baseline_from))
            run_arms([a for a in arms if a.name != BASELINE], out)
            wait_for_finished(out / BASELINE, args.baseline_wait_s)
        else:
            run_arms(arms, out)
    noise_file = out / "noise_robustness.json"
    noise = json.loads(noise_file.read_text()) if noise_file.exists() else {}
    test_file = corpus_dir(args) / "test.txt"
    for arm in arms:
        if arm.name not in noise and (out / arm.name / "adapter").exists() and test_file.exists():
            noise[arm.name] = evaluate_noise(out / arm.name, test_file, args)
            noise_file.write_text(json.dumps(noise, indent=2) + "\n")  # resumable, arm by arm
    return report(out, [arm.name for arm in arms], noise)


if __name__ == "__main__":
    main()
