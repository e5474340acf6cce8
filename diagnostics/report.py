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
# what the decorrelation objective is meant to move (tokens at t >= 1; OBJECTIVES "Intermediate sinks")
INTERMEDIATE_METRICS = (
    "intermediate_sink_count",
    "intermediate_sink_attention",
    "intermediate_sink_bos_cosine",
    "intermediate_sink_max_activation",
    "intermediate_sink_activation_ratio",
)
# the sinks of the first measurement, at their step-0 (sample, position, layer), measured again
TRACKED_METRICS = ("tracked_sink_attention", "tracked_sink_max_activation", "tracked_sink_bos_cosine")
METRIC_LABELS = {
    "intermediate_sink_count": "intermediate sinks per sequence",
    "intermediate_sink_attention": "attention to intermediate sinks",
    "intermediate_sink_bos_cosine": "intermediate sinks' cosine to BOS",
    "intermediate_sink_max_activation": "max abs h at t>=1 on BOS's features",
    "intermediate_sink_activation_ratio": "that max / median abs h",
    "tracked_sink_attention": "attention to the step-0 sinks",
    "tracked_sink_max_activation": "step-0 sinks' max abs h on BOS's features",
    "tracked_sink_bos_cosine": "step-0 sinks' cosine to BOS",
    "attention_entropy": "attention entropy (nats)",
    "attention_entropy_normalized": "attention entropy / log(keys)",
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
    # intermediate sinks (t >= 1, cos to BOS and received attention above thresholds): per sequence count,
    # summed received attention per sequence, mean cosine to BOS; largest |h| at t >= 1 on BOS's massive
    # features and its ratio to the median |h|
    intermediate_sink_count: float = 0.0
    intermediate_sink_attention: float = 0.0
    intermediate_sink_bos_cosine: float = float("nan")
    intermediate_sink_max_activation: float = float("nan")
    intermediate_sink_activation_ratio: float = float("nan")
    bos_massive_features: list[int] = field(default_factory=list)
    # the sinks found at the first measurement (same probe tokens), measured now
    tracked_sink_count: float = 0.0
    tracked_sink_attention: float = 0.0
    tracked_sink_bos_cosine: float = float("nan")
    tracked_sink_max_activation: float = float("nan")
    # mean attention entropy over heads and queries q > 0 (nats; normalised: / log(q + 1), 1 = uniform)
    attention_entropy: float = float("nan")
    attention_entropy_normalized: float = float("nan")


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
    """A metric at one layer of a sinks.json dict (nan if that layer or metric is absent)."""
    for row in sinks["layers"]:
        if row["layer"] == layer:
            return float(row.get(metric, float("nan")))
    return float("nan")


def layer_mean(sinks: dict, metric: str, layers: list[int] | None = None) -> float:
    """Mean of a metric over the chosen layers (None = all), nan values and absent keys left out."""
    values = [
        float(row.get(metric, float("nan")))
        for row in sinks["layers"]
        if layers is None or row["layer"] in layers
    ]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def band_layers(sinks: dict, bands: dict | None) -> dict[str, list[int]]:
    """{band: measured layers in it}; bands map a name to [first, last] (inclusive; last None = to the end).

    Bands with no measured layer are left out; None gives one band "all"."""
    measured = [row["layer"] for row in sinks["layers"]]
    if not bands:
        return {"all": measured}
    result = {}
    for name, (first, last) in bands.items():
        chosen = [i for i in measured if i >= first and (last is None or i <= last)]
        if chosen:
            result[name] = chosen
    return result


def band_means(sinks: dict, bands: dict | None, metrics=INTERMEDIATE_METRICS) -> dict[str, dict[str, float]]:
    """{band: {metric: mean over the band's layers}} (see `band_layers`)."""
    return {
        name: {metric: layer_mean(sinks, metric, layers) for metric in metrics}
        for name, layers in band_layers(sinks, bands).items()
    }


def tracked_change(first: dict, last: dict, layers: list[int] | None = None) -> dict[str, float]:
    """Attention to the step-0 sinks (mean over `layers`, None = all) then and now, and its % change."""
    before = layer_mean(first, "tracked_sink_attention", layers)
    after = layer_mean(last, "tracked_sink_attention", layers)
    change = 100.0 * (after / before - 1.0) if before and not math.isnan(before) else float("nan")
    return {
        "num_sinks": len(first.get("intermediate_sinks", [])),
        "attention_before": before,
        "attention_after": after,
        "attention_change_pct": change,
        "max_activation_before": layer_mean(first, "tracked_sink_max_activation", layers),
        "max_activation_after": layer_mean(last, "tracked_sink_max_activation", layers),
    }


def tracked_headline(first: dict, last: dict, bands: dict | None = None) -> str:
    """One line: "the sinks at step 0 lost X% of their attention", over the first layer band (all layers
    without bands), with the numbers behind it."""
    name, layers = next(iter(band_layers(first, bands).items()), ("all", None))
    change = tracked_change(first, last, layers)
    if change["num_sinks"] == 0 or math.isnan(change["attention_change_pct"]):
        return "no intermediate sinks at the first measurement: nothing to track"
    verb = "lost" if change["attention_change_pct"] <= 0 else "gained"
    where = f"layers {name} ({layers[0]}-{layers[-1]})" if layers else "all layers"
    return (
        f"the {change['num_sinks']} intermediate sinks of step {first.get('step', 0)} {verb} "
        f"{abs(change['attention_change_pct']):.1f}% of their attention "
        f"({format_number(change['attention_before'])} -> {format_number(change['attention_after'])}, "
        f"mean over {where}); their max abs h on BOS's features "
        f"{format_number(change['max_activation_before'])} -> {format_number(change['max_activation_after'])}"
    )


def format_number(value: float) -> str:
    if value is None or math.isnan(float(value)):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def layer_table_lines(sinks: dict) -> list[str]:
    """Markdown table with one row per layer: intermediate sinks first, then the position-0 metrics."""
    lines = [
        "| layer | int. sinks/seq | attn to them | their cos to BOS | max abs h t>=1 on BOS feats (ratio) "
        "| first-token attn | sink rate % | max abs h (pos, feat) | max/median | BOS cosine |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sinks["layers"]:
        where = f"({row['max_activation_position']}, {row['max_activation_feature']})"
        nan = float("nan")
        lines.append(
            f"| {row['layer']} | {format_number(row.get('intermediate_sink_count', nan))} "
            f"| {format_number(row.get('intermediate_sink_attention', nan))} "
            f"| {format_number(row.get('intermediate_sink_bos_cosine', nan))} "
            f"| {format_number(row.get('intermediate_sink_max_activation', nan))} "
            f"({format_number(row.get('intermediate_sink_activation_ratio', nan))}) "
            f"| {format_number(row['first_token_attention'])} | {format_number(row['sink_rate'])} "
            f"| {format_number(row['max_activation'])} {where} | {format_number(row['activation_ratio'])} "
            f"| {format_number(row['bos_cosine'])} |"
        )
    return lines


def band_lines(sinks: dict, bands: dict | None) -> list[str]:
    """Markdown bullets: the intermediate-sink numbers of each layer band."""
    lines = []
    for name, layers in band_layers(sinks, bands).items():
        means = {m: layer_mean(sinks, m, layers) for m in INTERMEDIATE_METRICS}
        lines.append(
            f"- Intermediate sinks, layers {name} ({layers[0]}-{layers[-1]}): "
            f"{format_number(means['intermediate_sink_count'])} per sequence, receiving "
            f"{format_number(means['intermediate_sink_attention'])} of the attention, cosine to BOS "
            f"{format_number(means['intermediate_sink_bos_cosine'])}; max abs h at t>=1 on BOS's features "
            f"{format_number(means['intermediate_sink_max_activation'])} "
            f"({format_number(means['intermediate_sink_activation_ratio'])}x the median)."
        )
    return lines


def segment_band_mean(sinks: dict, segment: str, metric: str, layers: list[int]) -> float:
    """Mean over `layers` of a per-segment metric (`by_segment[segment][metric]`), nan values left out."""
    values = [
        float(row.get("by_segment", {}).get(segment, {}).get(metric, float("nan")))
        for row in sinks["layers"]
        if row["layer"] in layers
    ]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def before_after_lines(
    before: dict, after: dict, layers: list[int] | None = None, bands: dict | None = None
) -> list[str]:
    """Markdown table of two sinks.json dicts (e.g. start vs end of training). First what the decorrelation
    objective is meant to move, per layer band: intermediate sinks, attention to the step-0 sinks, BOS cosine,
    and per segment (AVSR: audio, video, prompt, transcript; first band only) the intermediate sinks; then the position-0
    metrics (first-token attention, sink rate, max/median |h|), mean over layers and at `layers`."""
    lines = ["| sink metric | before | after |", "|---|---:|---:|"]

    def add(label: str, first: float, last: float) -> None:
        lines.append(f"| {label} | {format_number(first)} | {format_number(last)} |")

    groups = band_layers(before, bands)
    for metric in (*INTERMEDIATE_METRICS, *TRACKED_METRICS[:2], "bos_cosine"):
        for name, group in groups.items():
            label = f"{METRIC_LABELS[metric]}, layers {name} ({group[0]}-{group[-1]})"
            add(label, layer_mean(before, metric, group), layer_mean(after, metric, group))
    segments = sorted({name for row in before["layers"] for name in row.get("by_segment", {})})
    name, group = next(iter(groups.items()), ("all", []))  # per segment: the first band (where sinks live)
    for segment in segments if group else []:
        for metric in ("intermediate_sink_count", "intermediate_sink_attention"):
            label = f"{METRIC_LABELS[metric]}, {segment} tokens, layers {name}"
            add(
                label,
                segment_band_mean(before, segment, metric, group),
                segment_band_mean(after, segment, metric, group),
            )
    for metric in LAYER_METRICS:
        label = METRIC_LABELS[metric]
        add(f"{label}, mean over layers", layer_mean(before, metric), layer_mean(after, metric))
        for layer in layers or []:
            add(
                f"{label}, layer {layer}",
                layer_value(before, layer, metric),
                layer_value(after, layer, metric),
            )
    return lines


def summary_markdown(
    sinks: dict,
    plots: dict[str, Path] | None = None,
    title: str = "Sink diagnostics",
    bands: dict | None = None,
) -> str:
    """Short `summary.md`: headline numbers, the per-layer table, intermediate sinks and plot links."""
    strongest = max(sinks["layers"], key=lambda row: row["first_token_attention"])
    massive = max(sinks["layers"], key=lambda row: row["max_activation"])
    lines = [
        f"# {title}",
        "",
        f"Model: `{sinks['model']}`; {sinks['num_texts']} texts, {sinks.get('num_tokens', '?')} tokens.",
        "",
        *band_lines(sinks, bands),
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
