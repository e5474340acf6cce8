"""Shared helpers for study reports: read an arm's outputs, format a markdown table, draw plots.

An arm's run folder (studies/arms.py) holds `results.json` (train.py), `sinks.json` (the final sink
measurement), `sinks/step_<N>.json` (every measurement) and `csv/metrics.csv` (the logged curves).

    arm = load_arm(study_dir / "baseline")
    arm.after("val/perplexity"); arm.curve("val/perplexity"); arm.sinks_at(0)
    table = markdown_table(["arm", "ppl"], [["baseline", fmt(12.3)]])
    line_plot({"baseline": arm.curve("val/loss")}, out / "val_loss.png", "val loss", "step", "loss")
    write_report(out / "report.md", "Study", ["intro text", table], {"val loss": out / "val_loss.png"})
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from compare import read_metrics, series
from diagnostics.plots import plot_overlay


@dataclass
class ArmOutputs:
    """What one finished (or unfinished) arm left in its run folder."""

    name: str
    path: Path
    results: dict = field(default_factory=dict)
    sinks: dict | None = None  # the final sinks.json
    rows: list[dict] = field(default_factory=list)  # every logged CSV row

    def after(self, key: str) -> float:
        """A metric of the final validation (results.json "after"), nan if absent."""
        return float(self.results.get("after", {}).get(key, float("nan")))

    def curve(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of a logged metric."""
        return series(self.rows, key)

    def sinks_at(self, step: int) -> dict | None:
        """The sink measurement of one step (`sinks/step_<N>.json`), None if absent."""
        path = self.path / "sinks" / f"step_{step:06d}.json"
        return json.loads(path.read_text()) if path.exists() else None

    @property
    def finished(self) -> bool:
        return bool(self.results)


def load_arm(path: str | Path, name: str | None = None) -> ArmOutputs:
    path = Path(path)
    results_file, sinks_file = path / "results.json", path / "sinks.json"
    return ArmOutputs(
        name=name or path.name,
        path=path,
        results=json.loads(results_file.read_text()) if results_file.exists() else {},
        sinks=json.loads(sinks_file.read_text()) if sinks_file.exists() else None,
        rows=read_metrics(path) if path.exists() else [],
    )


def fmt(value: float | None, digits: int = 3, unit: str = "") -> str:
    """Number for a table (followed by unit): n/a for None/nan, thousands separators for large values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}{unit}"
    return f"{value:.{digits}f}{unit}"


def times(value: float) -> str:
    """A ratio as '0.42x' (n/a for nan)."""
    return fmt(value, 2, "x")


def percent_change(value: float, reference: float) -> float:
    """100 * (value / reference - 1); nan when the reference is 0 or nan."""
    if reference is None or value is None or math.isnan(reference) or math.isnan(value) or reference == 0:
        return float("nan")
    return 100.0 * (value / reference - 1.0)


def ratio(value: float, reference: float) -> float:
    """value / reference; nan when the reference is 0 or nan."""
    if reference is None or value is None or math.isnan(reference) or reference == 0:
        return float("nan")
    return value / reference


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def line_plot(
    curves: dict[str, tuple[list[float], list[float]]],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
) -> Path | None:
    """One line per label (labels with no points are dropped); None when nothing is left to draw."""
    curves = {label: xy for label, xy in curves.items() if xy[0]}
    return plot_overlay(curves, path, title, xlabel, ylabel, log_y) if curves else None


def grouped_bar_plot(values: dict[str, dict[str, float]], path: str | Path, title: str, ylabel: str) -> Path:
    """values = {group (x tick): {series label: value}}: one bar per series in each group."""
    figure = Figure(figsize=(max(6.4, 1.2 * len(values)), 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    groups = list(values)
    labels = list(dict.fromkeys(label for group in values.values() for label in group))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        xs = [g + i * width for g in range(len(groups))]
        ys = [values[group].get(label, float("nan")) for group in groups]
        axes.bar(xs, ys, width=width, label=label)
    axes.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize="small")
    axes.set(title=title, ylabel=ylabel)
    axes.legend(loc="best", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def commands_section(arms: list[ArmOutputs]) -> str:
    """Markdown list of the train.py command of each arm that started (its `command.txt`)."""
    commands = ["Commands (one train.py per arm):", ""] + [
        f"- {a.name}: `{(a.path / 'command.txt').read_text().strip()}`"
        for a in arms
        if (a.path / "command.txt").exists()
    ]
    return "\n".join(commands)


def write_report(path: str | Path, title: str, sections: list[str], plots: dict[str, Path | None]) -> Path:
    """`# title`, the sections (markdown strings) separated by blank lines, then the plots (relative links)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = [f"# {title}", "", *[s + "\n" for s in sections]]
    shown = {name: p for name, p in plots.items() if p is not None}
    if shown:
        body += ["## Plots", ""] + [f"![{name}]({Path(p).name})" for name, p in shown.items()]
    path.write_text("\n".join(body) + "\n")
    return path
