"""Study 1: BOS decorrelation on text (SmolLM2-135M, LoRA): does it remove the step-0 intermediate sinks?

Arms (same seed, data and steps): CE alone (`baseline`) and CE + decorrelation at a few weights, each with
a linear warm-up of the weight over the first tenth of the steps (`objective.decorr.warmup_steps`).
Data: `data=pd_text` (~4M words of local public-domain text, held-out split by document); the probe batch
and the validation perplexity come from the held-out split.

Goal (issue 8): attention to the step-0 intermediate sinks (layers 1-8) and their massive activations fall
by at least half against the baseline arm at the same step, with validation perplexity within 5%.

    python studies/decorr_text.py                       # GPU: 4 arms x 1000 steps, B=32, T=256, bf16
    python studies/decorr_text.py --steps 2000 --weights 100,1000 --out outputs/studies/decorr_text
    python studies/decorr_text.py --smoke               # CPU, tiny random model, seconds (tests)
    python studies/decorr_text.py --report-only         # redraw the report from finished arms

Arms run through studies/arms.py (one train.py per GPU, resumable: rerun the command after a stop).
Writes `<out>/report.md` with the table and plots.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from diagnostics.report import band_layers, layer_mean  # noqa: E402
from studies.arms import Arm, run_arms  # noqa: E402
from studies.report import (  # noqa: E402
    ArmOutputs,
    commands_section,
    fmt,
    grouped_bar_plot,
    line_plot,
    load_arm,
    markdown_table,
    percent_change,
    ratio,
    times,
    write_report,
)
from studies.text_lm import (  # noqa: E402
    add_common_options,
    common_overrides,
    finish_common_options,
    prepare_corpus,
)

BASELINE = "baseline"
EARLY_BAND = "early_middle"
GOAL_FALL = 0.5  # tracked attention and activation at most half the baseline arm's
GOAL_PPL_PERCENT = 5.0


def arm_name(weight: float) -> str:
    return f"decorr_w{weight:g}"


def build_arms(args: argparse.Namespace) -> list[Arm]:
    """The baseline and one decorrelation arm per weight; only the objective differs between them."""
    steps = args.steps
    common = common_overrides(args)
    arms = [Arm(BASELINE, ["experiment=lm_sft", *common, "task_name=decorr_text_baseline"])]
    for weight in args.weights:
        arms.append(
            Arm(
                arm_name(weight),
                [
                    "experiment=lm_decorr",
                    *common,
                    f"task_name=decorr_text_{arm_name(weight)}",
                    f"objective.decorr.weight={weight:g}",
                    f"objective.decorr.warmup_steps={max(1, steps // 10)}",
                    "objective.decorr.tokens=non_pad",  # plain-text LM: every token is input and target
                ],
            )
        )
    return arms


def tracked_numbers(arm: ArmOutputs, band: str) -> dict[str, float]:
    """The final measurement's intermediate-sink numbers in one layer band (nan when absent)."""
    nan = float("nan")
    if arm.sinks is None:
        return {"tracked_attention": nan, "tracked_activation": nan, "count": nan, "bos_cosine": nan}
    layers = band_layers(arm.sinks, arm.sinks.get("layer_bands")).get(band)
    return {
        "tracked_attention": layer_mean(arm.sinks, "tracked_sink_attention", layers),
        "tracked_activation": layer_mean(arm.sinks, "tracked_sink_max_activation", layers),
        "count": layer_mean(arm.sinks, "intermediate_sink_count", layers),
        "bos_cosine": layer_mean(arm.sinks, "bos_cosine", layers),
        "first_token_attention": layer_mean(arm.sinks, "first_token_attention", layers),
        "intermediate_activation": layer_mean(arm.sinks, "intermediate_sink_max_activation", layers),
    }


def step0_numbers(arm: ArmOutputs, band: str) -> dict[str, float]:
    first = arm.sinks_at(0)
    if first is None:
        return {}
    layers = band_layers(first, first.get("layer_bands")).get(band)
    return {
        "tracked_attention": layer_mean(first, "tracked_sink_attention", layers),
        "tracked_activation": layer_mean(first, "tracked_sink_max_activation", layers),
        "num_sinks": len(first.get("intermediate_sinks", [])),
    }


def report(out: Path, arm_names: list[str], band: str = EARLY_BAND) -> Path:
    """Table (one row per arm, relative to the baseline arm at the same step) and plots -> <out>/report.md."""
    arms = [load_arm(out / name, name) for name in arm_names]
    base = next(a for a in arms if a.name == BASELINE)
    base_numbers = tracked_numbers(base, band)
    start = step0_numbers(base, band)
    headers = [
        "arm",
        "step",
        f"attn to step-0 sinks ({band})",
        "vs baseline",
        "their max abs h",
        "vs baseline",
        "sinks/seq now",
        "BOS cosine",
        "first-token attn",
        "val ppl",
        "vs baseline",
        "goal met",
    ]
    rows, verdicts = [], {}
    for arm in arms:
        numbers = tracked_numbers(arm, band)
        attention_ratio = ratio(numbers["tracked_attention"], base_numbers["tracked_attention"])
        activation_ratio = ratio(numbers["tracked_activation"], base_numbers["tracked_activation"])
        ppl_change = percent_change(arm.after("val/perplexity"), base.after("val/perplexity"))
        met = (
            "-"
            if arm is base
            else _yes(
                attention_ratio <= GOAL_FALL
                and activation_ratio <= GOAL_FALL
                and abs(ppl_change) <= GOAL_PPL_PERCENT
            )
        )
        verdicts[arm.name] = met
        rows.append(
            [
                arm.name if arm.finished else f"{arm.name} (unfinished)",
                str(arm.results.get("step", "n/a")),
                fmt(numbers["tracked_attention"]),
                times(attention_ratio),
                fmt(numbers["tracked_activation"], 1),
                times(activation_ratio),
                fmt(numbers["count"], 2),
                fmt(numbers["bos_cosine"]),
                fmt(numbers["first_token_attention"]),
                fmt(arm.after("val/perplexity"), 2),
                fmt(ppl_change, 1, "%"),
                met,
            ]
        )
    intro = [
        f"Arms: {', '.join(a.name for a in arms)}; same seed, data (`data=pd_text`, held-out split by document) "
        "and steps. Sink numbers come from the probe batch (the first held-out batch), in the "
        f"{band} layer band, at the last step; 'vs baseline' divides by the baseline arm at the same step.",
        f"At step 0 the probe batch held {start.get('num_sinks', 'n/a')} intermediate sinks; attention to them "
        f"{fmt(start.get('tracked_attention', math.nan))}, their max abs h on BOS's features "
        f"{fmt(start.get('tracked_activation', math.nan), 1)} (mean over the band's layers).",
        f"Goal: attention to the step-0 sinks and their max abs h at most {GOAL_FALL:g}x the baseline arm's, "
        f"validation perplexity within {GOAL_PPL_PERCENT:g}% of the baseline arm's.",
    ]
    plots = {
        "attention to the step-0 sinks": line_plot(
            {a.name: a.curve(f"sinks/intermediate/tracked_attention/{band}") for a in arms},
            out / "tracked_attention.png",
            f"attention to the step-0 intermediate sinks ({band})",
            "step",
            "attention (summed per sequence)",
        ),
        "their max abs h": line_plot(
            {a.name: a.curve(f"sinks/intermediate/tracked_max_activation/{band}") for a in arms},
            out / "tracked_max_activation.png",
            f"max abs h of the step-0 sinks on BOS's features ({band})",
            "step",
            "max abs h",
        ),
        "validation perplexity": line_plot(
            {a.name: a.curve("val/perplexity") for a in arms},
            out / "val_perplexity.png",
            "validation perplexity (held-out text)",
            "step",
            "perplexity",
        ),
        "final, relative to baseline": grouped_bar_plot(
            {
                a.name: {
                    "attn to step-0 sinks": ratio(
                        tracked_numbers(a, band)["tracked_attention"], base_numbers["tracked_attention"]
                    ),
                    "their max abs h": ratio(
                        tracked_numbers(a, band)["tracked_activation"], base_numbers["tracked_activation"]
                    ),
                    "val ppl": ratio(a.after("val/perplexity"), base.after("val/perplexity")),
                }
                for a in arms
            },
            out / "relative_to_baseline.png",
            "last step, relative to the baseline arm",
            "ratio",
        ),
    }
    path = write_report(
        out / "report.md",
        "Study 1: decorrelation on text (SmolLM2-135M, LoRA)",
        ["\n\n".join(intro), markdown_table(headers, rows), commands_section(arms)],
        plots,
    )
    print(path.read_text(), flush=True)
    return path


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(parser)
    parser.add_argument("--weights", default="10,100,1000", help="decorrelation weights, comma-separated")
    args = finish_common_options(parser.parse_args(argv), "decorr_text")
    args.weights = [float(w) for w in args.weights.split(",") if w.strip()]
    if args.smoke:
        args.weights = args.weights[:1]
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    arms = build_arms(args)
    out = Path(args.out)
    if not args.report_only:
        prepare_corpus(args)
        run_arms(arms, out)
    return report(out, [arm.name for arm in arms])


if __name__ == "__main__":
    main()
