"""Compare training runs: one markdown table and overlay plots, from each run's CSV logs and sinks.json.

    python compare.py outputs/train/run_a outputs/train/run_b --layers 12,20 --out comparison

Reads every `metrics.csv` under a run folder (Lightning's CSVLogger; several versions are concatenated in
path order) and `<run>/sinks.json` (written at the end of training by the sink callback, or by analyze.py;
when absent, the last logged `sinks/...` values are used). Writes `<out>/comparison.md` and PNG overlays.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from diagnostics.plots import plot_overlay
from diagnostics.report import (
    LAYER_METRICS,
    METRIC_LABELS,
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

    def sink_value(self, metric: str, layer: int | None) -> float:
        """Final value of a sink metric at a layer (None = mean over layers)."""
        if self.sinks is not None:
            return layer_mean(self.sinks, metric) if layer is None else layer_value(self.sinks, layer, metric)
        suffix = "mean" if layer is None else f"layer_{layer}"
        return last_value(self.rows, f"sinks/{metric}/{suffix}")


def unique_labels(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [f"{p.parent.name}/{p.name}" for p in paths]


def comparison_table(runs: list[Run], layers: list[int]) -> list[str]:
    """Markdown: one row per metric, one column per run."""
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
    for metric in LAYER_METRICS:
        curves = {
            run.label: ([r["layer"] for r in run.sinks["layers"]], [r[metric] for r in run.sinks["layers"]])
            for run in runs
            if run.sinks is not None
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


def compare(run_dirs: list[str], layers: list[int], out_dir: str) -> Path:
    paths = [Path(p) for p in run_dirs]
    runs = [Run(path, label) for path, label in zip(paths, unique_labels(paths))]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(runs, layers)
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
    args = parser.parse_args(argv)
    compare(args.runs, args.layers, args.out)


if __name__ == "__main__":
    main()
