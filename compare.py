"""Compare training runs: one markdown table and overlay plots, from each run's CSV logs and sinks.json.

    python compare.py outputs/train/run_a outputs/train/run_b --layers 12,20 --out comparison
    python compare.py runs/decorr runs/baseline --baseline baseline     # quality vs the baseline arm

Rows, in order: training and quality numbers; perplexity/WER against the baseline run (the first run, or
--baseline) at the last step both logged, with their seeds; the intermediate sinks by layer band and the
attention to the step-0 sinks (what decorrelation is meant to move); then the position-0 metrics.

Reads every `metrics.csv` under a run folder (Lightning's CSVLogger; several versions are concatenated in
path order) and `<run>/sinks.json` (written at the end of training by the sink callback, or by analyze.py;
when absent, the last logged `sinks/...` values are used). Writes `<out>/comparison.md` and PNG overlays.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from pathlib import Path

from diagnostics.plots import plot_overlay
from diagnostics.report import (
    INTERMEDIATE_METRICS,
    LAYER_METRICS,
    METRIC_LABELS,
    TRACKED_METRICS,
    band_layers,
    format_number,
    layer_mean,
    layer_value,
    load_sinks_json,
)

TRAIN_LOSS_KEYS = ("train/loss", "train/loss_epoch", "train/loss_step", "train_loss")
VAL_LOSS_KEYS = ("val/loss", "val_loss")
QUALITY_KEYS = ("val/wer", "test/wer", "val/perplexity", "test/perplexity", "val/ppl")
LOG_SCALE = {"activation_ratio"}


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """All rows of all metrics.csv files under run_dir, as {column: float}, empty cells dropped."""
    rows = []
    for path in sorted(run_dir.rglob("metrics.csv")):
        with open(path, newline="") as handle:
            for raw in csv.DictReader(handle):
                row = {}
                for key, text in raw.items():
                    try:
                        row[key] = float(text)
                    except (TypeError, ValueError):
                        continue
                rows.append(row)
    return rows


def series(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged metric, in logging order."""
    pairs = [(row.get("step", float(i)), row[key]) for i, row in enumerate(rows) if key in row]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def first_present(rows: list[dict[str, float]], keys: tuple[str, ...]) -> str | None:
    present = {key for row in rows for key in row}
    return next((key for key in keys if key in present), None)


def last_value(rows: list[dict[str, float]], key: str | None) -> float:
    if key is None:
        return float("nan")
    values = series(rows, key)[1]
    return values[-1] if values else float("nan")


class Run:
    """One run folder: its CSV rows and final sinks."""

    def __init__(self, path: Path, label: str):
        if not path.is_dir():
            raise FileNotFoundError(f"run folder {path} does not exist")
        self.path, self.label = path, label
        self.rows = read_metrics(path)
        sinks_file = path / "sinks.json"
        self.sinks = load_sinks_json(sinks_file) if sinks_file.exists() else None
        first_file = path / "sinks" / "step_000000.json"
        self.first_sinks = load_sinks_json(first_file) if first_file.exists() else None
        self.seed = run_seed(path)

    def sink_value(self, metric: str, layer: int | None, layers: list[int] | None = None) -> float:
        """Final value of a sink metric at a layer (None = mean over `layers`, None = all layers)."""
        if self.sinks is not None:
            if layer is None:
                return layer_mean(self.sinks, metric, layers)
            return layer_value(self.sinks, layer, metric)
        suffix = "mean" if layer is None else f"layer_{layer}"
        return last_value(self.rows, f"sinks/{metric}/{suffix}")

    def bands(self) -> dict[str, list[int]]:
        """Layer bands of the final sinks.json ({} without one)."""
        return band_layers(self.sinks, self.sinks.get("layer_bands")) if self.sinks is not None else {}

    def tracked_change_pct(self) -> float:
        """% change of the attention to the step-0 sinks, step 0 -> end (nan without the files)."""
        if self.sinks is None or self.first_sinks is None:
            return last_value(self.rows, "sinks/intermediate/tracked_attention_change_pct")
        before = layer_mean(self.first_sinks, "tracked_sink_attention")
        after = layer_mean(self.sinks, "tracked_sink_attention")
        return 100.0 * (after / before - 1.0) if before and not math.isnan(before) else float("nan")


def run_seed(path: Path) -> int | None:
    """The `seed` of the run's Hydra config (None without one)."""
    config = path / ".hydra" / "config.yaml"
    if not config.exists():
        return None
    match = re.search(r"^seed:\s*(\S+)", config.read_text(), flags=re.M)
    return int(match.group(1)) if match and match.group(1).lstrip("-").isdigit() else None


def value_at_step(rows: list[dict[str, float]], key: str, step: float) -> float:
    """The last value of `key` logged at `step` (nan if none)."""
    values = [row[key] for row in rows if key in row and row.get("step") == step]
    return values[-1] if values else float("nan")


def baseline_rows(runs: list[Run], baseline: Run) -> list[tuple[str, list[float], str]]:
    """(label, values, format) rows: each quality metric against the baseline at the last step both logged."""
    rows = []
    for key in QUALITY_KEYS:
        base_steps = {row["step"] for row in baseline.rows if key in row and "step" in row}
        if not base_steps:
            continue
        steps, changes = [], []
        for run in runs:
            common = base_steps & {row["step"] for row in run.rows if key in row and "step" in row}
            step = max(common) if common else float("nan")
            base = value_at_step(baseline.rows, key, step)
            value = value_at_step(run.rows, key, step)
            steps.append(step)
            changes.append(100.0 * (value / base - 1.0) if base and not math.isnan(base) else float("nan"))
        rows.append((f"{key} vs {baseline.label} at the same step (%)", changes, "{:+.1f}".format))
        rows.append((f"{key}: step compared", steps, lambda v: str(int(v))))
    if rows:
        seeds = [float(run.seed) if run.seed is not None else float("nan") for run in runs]
        rows.append(("seed", seeds, lambda v: str(int(v))))
    return rows


def unique_labels(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [f"{p.parent.name}/{p.name}" for p in paths]


def comparison_table(runs: list[Run], layers: list[int], baseline: Run | None = None) -> list[str]:
    """Markdown: one row per metric, one column per run (baseline: the run quality is compared against)."""
    lines = ["| metric | " + " | ".join(run.label for run in runs) + " |", "|---|" + "---:|" * len(runs)]

    def add(name: str, values: list[float], fmt=format_number) -> None:
        if any(not math.isnan(v) for v in values):
            lines.append(
                f"| {name} | " + " | ".join("n/a" if math.isnan(v) else fmt(v) for v in values) + " |"
            )

    add("last step", [last_value(run.rows, "step") for run in runs], fmt=lambda v: str(int(v)))
    four_decimals = "{:.4f}".format
    add(
        "final train loss",
        [last_value(run.rows, first_present(run.rows, TRAIN_LOSS_KEYS)) for run in runs],
        four_decimals,
    )
    add(
        "final val loss",
        [last_value(run.rows, first_present(run.rows, VAL_LOSS_KEYS)) for run in runs],
        four_decimals,
    )
    for key in QUALITY_KEYS:
        add(f"final {key}", [last_value(run.rows, key) for run in runs], four_decimals)
    for label, values, fmt in baseline_rows(runs, baseline or runs[0]):
        add(label, values, fmt)
    bands = next((run.bands() for run in runs if run.bands()), {"all": None})
    for name, group in bands.items():
        where = f"layers {name}" + (f" ({group[0]}-{group[-1]})" if group else "")
        for metric in (*INTERMEDIATE_METRICS, *TRACKED_METRICS[:2], "bos_cosine"):
            add(f"{METRIC_LABELS[metric]}, {where}", [run.sink_value(metric, None, group) for run in runs])
    add("attention to the step-0 sinks, change since step 0 (%)", [run.tracked_change_pct() for run in runs])
    for metric in LAYER_METRICS:
        add(f"{METRIC_LABELS[metric]}, mean over layers", [run.sink_value(metric, None) for run in runs])
        for layer in layers:
            add(f"{METRIC_LABELS[metric]}, layer {layer}", [run.sink_value(metric, layer) for run in runs])
    return lines


def overlay_plots(runs: list[Run], out_dir: Path) -> dict[str, Path]:
    """Training curves (from the CSVs) and per-layer sink profiles (from sinks.json), one line per run."""
    plots = {}
    for name, keys, log_y in [
        ("train_loss", TRAIN_LOSS_KEYS, False),
        ("val_loss", VAL_LOSS_KEYS, False),
        ("sinks_tracked_attention_over_training", ("sinks/intermediate/tracked_attention/mean",), False),
        ("sinks_intermediate_count_over_training", ("sinks/intermediate/count/mean",), False),
        *[(f"sinks_{m}_over_training", (f"sinks/{m}/mean",), m in LOG_SCALE) for m in LAYER_METRICS],
    ]:
        curves = {
            run.label: series(run.rows, first_present(run.rows, keys))
            for run in runs
            if first_present(run.rows, keys)
        }
        if curves:
            plots[name] = plot_overlay(
                curves, out_dir / f"{name}.png", name.replace("_", " "), "step", keys[0], log_y
            )
    for metric in (*LAYER_METRICS, "intermediate_sink_attention", "tracked_sink_attention"):
        curves = {
            run.label: ([r["layer"] for r in run.sinks["layers"]], [r[metric] for r in run.sinks["layers"]])
            for run in runs
            if run.sinks is not None and all(metric in r for r in run.sinks["layers"])
        }
        if curves:
            plots[f"{metric}_per_layer"] = plot_overlay(
                curves,
                out_dir / f"{metric}_per_layer.png",
                f"{METRIC_LABELS[metric]} per layer (sinks.json)",
                "layer",
                METRIC_LABELS[metric],
                metric in LOG_SCALE,
            )
    return plots


def compare(run_dirs: list[str], layers: list[int], out_dir: str, baseline: str | None = None) -> Path:
    paths = [Path(p) for p in run_dirs]
    runs = [Run(path, label) for path, label in zip(paths, unique_labels(paths))]
    base = runs[0]
    if baseline is not None:
        matches = [run for run in runs if baseline in (run.label, run.path.name, str(run.path))]
        if not matches:
            raise ValueError(f"--baseline {baseline!r} is none of the runs: {[run.label for run in runs]}")
        base = matches[0]
    seeds = {run.seed for run in runs if run.seed is not None}
    if len(seeds) > 1:
        print(
            f"warning: the runs have different seeds {sorted(seeds)}: quality differences mix seed noise in"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(runs, layers, base)
    plots = overlay_plots(runs, out)
    body = ["# Run comparison", "", *[f"- {run.label}: `{run.path}`" for run in runs], "", *table, ""]
    body += [f"![{name}]({path.name})" for name, path in plots.items()]
    report = out / "comparison.md"
    report.write_text("\n".join(body) + "\n")
    print("\n".join(table) + f"\n\nwritten: {report} and {len(plots)} plots", flush=True)
    return report


def parse_layers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with CSV logs and/or sinks.json)")
    parser.add_argument(
        "--layers", type=parse_layers, default=[], help="sink metrics at these layers, e.g. 12,20"
    )
    parser.add_argument("--out", default="comparison", help="output folder (default ./comparison)")
    parser.add_argument(
        "--baseline",
        default=None,
        help="run (label or folder) that quality is compared against (default: the first)",
    )
    args = parser.parse_args(argv)
    compare(args.runs, args.layers, args.out, args.baseline)


if __name__ == "__main__":
    main()
