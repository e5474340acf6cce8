"""The sink report: per-layer numbers, the `sinks.json` schema, `summary.md`, before/after table lines.

`sinks.json` (written by analyze.py and, at the end of training, by the callback):

    {"model": str, "num_texts": int,
     "layers": [{"layer", "first_token_attention", "sink_rate", "max_activation", "max_activation_position",
                 "max_activation_feature", "activation_ratio", "bos_cosine", ...extras}, ...],
     "intermediate_sinks": [{"sample", "position", "token", "segment", "layers", "max_bos_cosine",
                             "max_received_attention"}, ...],
     ...extras}

Extras (per layer: per-head first-token attention, median |h|, top features, per-segment numbers; top level:
uniform first-token attention, sink settings) are additive: readers rely only on the keys above.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

LAYER_METRICS = ("first_token_attention", "sink_rate", "activation_ratio", "bos_cosine")
METRIC_LABELS = {
    "first_token_attention": "first-token attention",
    "sink_rate": "sink rate (%)",
    "activation_ratio": "max/median abs h",
    "bos_cosine": "BOS cosine",
    "max_activation": "max abs h",
}


@dataclass
class LayerSinks:
    """Sink numbers of one decoder layer (layer i = output of decoder layer i = hidden_states[i + 1])."""

    layer: int
    first_token_attention: float
    sink_rate: float
    max_activation: float
    max_activation_position: int
    max_activation_feature: int
    activation_ratio: float
    bos_cosine: float
    max_activation_sample: int = 0
    median_activation: float = 0.0
    first_token_attention_per_head: list[float] = field(default_factory=list)
    top_features: list[tuple[int, float]] = field(default_factory=list)
    by_segment: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class SinkReport:
    """Result of one probe (`diagnostics.probe.measure_sinks`)."""

    layers: list[LayerSinks]
    num_samples: int
    num_tokens: int
    uniform_first_token_attention: float
    sink_key_position: int = 0
    sink_eps: float = 0.3
    intermediate_sinks: list[dict] = field(default_factory=list)

    def values(self, metric: str) -> list[float]:
        """One number per measured layer, in layer order."""
        return [float(getattr(row, metric)) for row in self.layers]

    def mean(self, metric: str) -> float:
        values = [v for v in self.values(metric) if not math.isnan(v)]
        return sum(values) / len(values) if values else float("nan")

    def layer(self, index: int) -> LayerSinks:
        for row in self.layers:
            if row.layer == index:
                return row
        raise KeyError(f"layer {index} was not measured (measured: {[r.layer for r in self.layers]})")

    def to_json(self, model: str, num_texts: int | None = None) -> dict:
        """The `sinks.json` dict (schema in the module docstring)."""
        return {
            "model": model,
            "num_texts": self.num_samples if num_texts is None else num_texts,
            "num_tokens": self.num_tokens,
            "uniform_first_token_attention": self.uniform_first_token_attention,
            "sink_key_position": self.sink_key_position,
            "sink_eps": self.sink_eps,
            "layers": [asdict(row) for row in self.layers],
            "intermediate_sinks": self.intermediate_sinks,
        }


def write_sinks_json(path: str | Path, sinks: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sinks, indent=2, allow_nan=True))
    return path


def load_sinks_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def layer_value(sinks: dict, layer: int, metric: str) -> float:
    """A metric at one layer of a sinks.json dict (nan if that layer is absent)."""
    for row in sinks["layers"]:
        if row["layer"] == layer:
            return float(row[metric])
    return float("nan")


def layer_mean(sinks: dict, metric: str) -> float:
    values = [float(row[metric]) for row in sinks["layers"] if not math.isnan(float(row[metric]))]
    return sum(values) / len(values) if values else float("nan")


def format_number(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def layer_table_lines(sinks: dict) -> list[str]:
    """Markdown table with one row per layer."""
    lines = [
        "| layer | first-token attn | sink rate % | max abs h (pos, feat) | max/median | BOS cosine |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sinks["layers"]:
        where = f"({row['max_activation_position']}, {row['max_activation_feature']})"
        lines.append(
            f"| {row['layer']} | {format_number(row['first_token_attention'])} | {format_number(row['sink_rate'])} "
            f"| {format_number(row['max_activation'])} {where} | {format_number(row['activation_ratio'])} "
            f"| {format_number(row['bos_cosine'])} |"
        )
    return lines


def before_after_lines(before: dict, after: dict, layers: list[int] | None = None) -> list[str]:
    """Markdown table of layer means (and chosen layers) of two sinks.json dicts, e.g. start vs end of training."""
    lines = ["| sink metric | before | after |", "|---|---:|---:|"]
    for metric in LAYER_METRICS:
        label = METRIC_LABELS[metric]
        lines.append(
            f"| {label}, mean over layers | {format_number(layer_mean(before, metric))} "
            f"| {format_number(layer_mean(after, metric))} |"
        )
        for layer in layers or []:
            lines.append(
                f"| {label}, layer {layer} | {format_number(layer_value(before, layer, metric))} "
                f"| {format_number(layer_value(after, layer, metric))} |"
            )
    return lines


def summary_markdown(
    sinks: dict, plots: dict[str, Path] | None = None, title: str = "Sink diagnostics"
) -> str:
    """Short `summary.md`: headline numbers, the per-layer table, intermediate sinks and plot links."""
    strongest = max(sinks["layers"], key=lambda row: row["first_token_attention"])
    massive = max(sinks["layers"], key=lambda row: row["max_activation"])
    lines = [
        f"# {title}",
        "",
        f"Model: `{sinks['model']}`; {sinks['num_texts']} texts, {sinks.get('num_tokens', '?')} tokens.",
        "",
        f"- First-token attention: mean {format_number(layer_mean(sinks, 'first_token_attention'))} over layers, "
        f"highest {format_number(strongest['first_token_attention'])} at layer {strongest['layer']} "
        f"(uniform attention would give {format_number(sinks.get('uniform_first_token_attention', float('nan')))}).",
        f"- Sink rate (k={sinks.get('sink_key_position', 0)}, eps={sinks.get('sink_eps', 0.3)}): "
        f"mean {format_number(layer_mean(sinks, 'sink_rate'))}%.",
        f"- Largest activation: {format_number(massive['max_activation'])} at layer {massive['layer']}, "
        f"position {massive['max_activation_position']}, feature {massive['max_activation_feature']} "
        f"({format_number(massive['activation_ratio'])}x the median |h|).",
        f"- Intermediate sinks found: {len(sinks['intermediate_sinks'])}.",
        "",
        *layer_table_lines(sinks),
    ]
    if sinks["intermediate_sinks"]:
        lines += [
            "",
            "## Intermediate sinks",
            "",
            "| sample | position | token | layers | max cos | max attn |",
            "|---:|---:|---|---|---:|---:|",
        ]
        for sink in sinks["intermediate_sinks"][:20]:
            lines.append(
                f"| {sink['sample']} | {sink['position']} | `{sink.get('token', '')!s}` | "
                f"{','.join(map(str, sink['layers']))} | {sink['max_bos_cosine']:.2f} | "
                f"{sink['max_received_attention']:.2f} |"
            )
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({Path(path).name})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"
