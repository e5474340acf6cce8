"""Sink figures as PNG files (matplotlib's object API with the Agg canvas: no pyplot, no display, no global state).

- layer curves: first-token attention (with the uniform-attention level) and max/median |h| per layer;
- head heatmap: first-token attention per layer x head;
- massive activations: the top-3 feature magnitudes and the median |h| per layer (log scale), as in Sun et al.;
- overlays: one curve per run on shared axes (compare.py).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diagnostics.report import SinkReport


def _new_figure(width: float = 6.4, height: float = 4.0) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def plot_layer_curves(report: SinkReport, path: str | Path, title: str = "") -> Path:
    """Two panels over layers: first-token attention (vs the uniform level) and max/median |h| (log)."""
    layers = [row.layer for row in report.layers]
    figure = _new_figure(10, 4)
    attention_axes, ratio_axes = figure.subplots(1, 2)
    attention_axes.plot(
        layers, report.values("first_token_attention"), marker="o", label="first-token attention"
    )
    attention_axes.axhline(
        report.uniform_first_token_attention, color="grey", linestyle="--", label="uniform"
    )
    attention_axes.plot(layers, report.values("bos_cosine"), marker=".", alpha=0.6, label="BOS cosine")
    attention_axes.set(xlabel="layer", ylabel="mean over heads and queries")
    attention_axes.legend(loc="best", fontsize="small")
    ratio_axes.semilogy(layers, report.values("activation_ratio"), marker="o", color="tab:red")
    ratio_axes.set(xlabel="layer", ylabel="max |h| / median |h|")
    figure.suptitle(title or "Attention sinks per layer")
    return _save(figure, path)


def plot_head_heatmap(report: SinkReport, path: str | Path, title: str = "") -> Path:
    """Layer x head image of first-token attention (rows = measured layers)."""
    values = [row.first_token_attention_per_head for row in report.layers]
    figure = _new_figure(6.4, max(3.0, 0.22 * len(values) + 1.5))
    axes = figure.subplots()
    image = axes.imshow(values, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    axes.set(xlabel="head", ylabel="layer", title=title or "First-token attention per head")
    axes.set_yticks(range(len(values)), [str(row.layer) for row in report.layers], fontsize="x-small")
    figure.colorbar(image, ax=axes)
    return _save(figure, path)


def plot_massive_activations(report: SinkReport, path: str | Path, title: str = "") -> Path:
    """Top-k feature magnitudes (k = 1..3, max over tokens) and the median |h| per layer, log scale."""
    layers = [row.layer for row in report.layers]
    figure = _new_figure(8, 4.5)
    axes = figure.subplots()
    depth = min(len(row.top_features) for row in report.layers)
    for rank in range(depth):
        axes.semilogy(
            layers, [row.top_features[rank][1] for row in report.layers], marker="o", label=f"top {rank + 1}"
        )
    axes.semilogy(
        layers, [row.median_activation for row in report.layers], color="grey", linestyle="--", label="median"
    )
    for row in report.layers:
        if row.top_features:
            axes.annotate(
                str(row.top_features[0][0]),
                (row.layer, row.top_features[0][1]),
                fontsize="x-small",
                textcoords="offset points",
                xytext=(0, 4),
                ha="center",
            )
    axes.set(
        xlabel="layer",
        ylabel="|h| (feature id of the top one annotated)",
        title=title or "Massive activations",
    )
    axes.legend(loc="best", fontsize="small")
    return _save(figure, path)


def write_sink_plots(
    report: SinkReport, out_dir: str | Path, prefix: str = "", title: str = ""
) -> dict[str, Path]:
    """All three figures into out_dir as `<prefix>layer_curves.png`, `..head_heatmap.png`, `..massive_activations.png`."""
    out_dir = Path(out_dir)
    return {
        "layer_curves": plot_layer_curves(report, out_dir / f"{prefix}layer_curves.png", title),
        "head_heatmap": plot_head_heatmap(report, out_dir / f"{prefix}head_heatmap.png", title),
        "massive_activations": plot_massive_activations(
            report, out_dir / f"{prefix}massive_activations.png", title
        ),
    }


def plot_overlay(
    curves: dict[str, tuple[list[float], list[float]]],
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
) -> Path:
    """One line per label: curves = {label: (x values, y values)}."""
    figure = _new_figure()
    axes = figure.subplots()
    for label, (xs, ys) in curves.items():
        axes.plot(xs, ys, marker="o" if len(xs) < 40 else None, markersize=3, label=label)
    if log_y:
        axes.set_yscale("log")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.legend(loc="best", fontsize="small")
    return _save(figure, path)
