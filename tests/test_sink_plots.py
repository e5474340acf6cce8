"""Sink figures are written as non-empty PNG files (from a hand-built report: no model needed)."""

from diagnostics.plots import plot_overlay, write_sink_plots
from diagnostics.report import LayerSinks, SinkReport

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_report(num_layers: int = 4, num_heads: int = 3) -> SinkReport:
    rows = [
        LayerSinks(
            layer=i,
            first_token_attention=0.2 * i,
            sink_rate=25.0 * i,
            max_activation=10.0**i,
            max_activation_position=0,
            max_activation_feature=7,
            activation_ratio=10.0 ** (i + 1),
            bos_cosine=0.1 * i,
            median_activation=0.5,
            first_token_attention_per_head=[0.1 * h + 0.2 * i for h in range(num_heads)],
            top_features=[(7, 10.0**i), (3, 2.0), (1, 1.0)],
        )
        for i in range(num_layers)
    ]
    return SinkReport(layers=rows, num_samples=2, num_tokens=20, uniform_first_token_attention=0.15)


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, path


def test_sink_plots_are_written(tmp_path):
    paths = write_sink_plots(fake_report(), tmp_path / "sinks", prefix="step_0_")
    assert set(paths) == {"layer_curves", "head_heatmap", "massive_activations"}
    for path in paths.values():
        assert path.parent == tmp_path / "sinks" and path.name.startswith("step_0_")
        assert_png(path)


def test_overlay_plot_is_written(tmp_path):
    curves = {"run_a": ([0, 1, 2], [3.0, 2.0, 1.5]), "run_b": ([0, 1, 2], [3.0, 2.5, 2.0])}
    path = plot_overlay(curves, tmp_path / "loss.png", "train/loss", "step", "loss", log_y=True)
    assert_png(path)
