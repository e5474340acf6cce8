"""Lightning callback: measure sinks on a fixed probe batch before training, every N steps and at the end.

Contract with the recipes: the LightningModule has `llm` (HF/PEFT causal LM) and
`sink_probe_inputs(batch) -> (llm_inputs: dict, segments: Tensor[B,T] long)`. The probe batch is the first
validation batch (datamodule, else the trainer's val dataloaders), moved to the module's device once and
kept fixed; `sink_probe_inputs` is called on it at every measurement, so trainable encoders/projectors in
front of the LLM are measured as they are at that step.

Logged to every logger (slash names, step = trainer.global_step):
`sinks/<metric>/layer_<i>` for `layers_to_log`, `sinks/<metric>/mean` over all layers, and
`sinks/<metric>/<segment>/mean` for per-segment metrics, with metric in first_token_attention, sink_rate,
activation_ratio, bos_cosine; and the intermediate sinks (what decorrelation is meant to move)
`sinks/intermediate/<name>/{mean,layer_<i>,<band>,<segment>/mean}` with name in count, attention, bos_cosine,
max_activation, activation_ratio, tracked_attention, tracked_max_activation, plus
`sinks/intermediate/tracked_attention_change_pct` (attention to the step-0 sinks vs step 0). Files (rank 0): `<run>/sinks/step_<N>_*.png`, `<run>/sinks/step_<N>.json` and,
at the end, `<run>/sinks.json` (analyze.py schema).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import move_data_to_device

from diagnostics.plots import write_sink_plots
from diagnostics.probe import measure_sinks
from diagnostics.report import (
    INTERMEDIATE_METRICS,
    LAYER_METRICS,
    SinkReport,
    band_layers,
    before_after_lines,
    layer_mean,
    tracked_change,
    tracked_headline,
    write_sinks_json,
)
from harness.fsdp import root_params_gathered

log = logging.getLogger(__name__)
SEGMENT_METRICS = ("bos_cosine", "first_token_attention")
# first line of `summary_lines`; harness/summary.py moves this block to the top of the run summary
SUMMARY_HEADER = "sinks on the probe batch"
# sinks.json key -> W&B name under sinks/intermediate/
INTERMEDIATE_LOG_NAMES = {
    **{metric: metric.removeprefix("intermediate_sink_") for metric in INTERMEDIATE_METRICS},
    "tracked_sink_attention": "tracked_attention",
    "tracked_sink_max_activation": "tracked_max_activation",
}


def intermediate_log_metrics(
    sinks: dict, first: dict | None, layers_to_log: list[int] | None, bands: dict | None
) -> dict[str, float]:
    """`sinks/intermediate/<name>/{mean,layer_<i>,<band>,<segment>/mean}` of one sinks.json dict, and
    `sinks/intermediate/tracked_attention_change_pct` against the first measurement `first`."""
    metrics = {}
    rows = {row["layer"]: row for row in sinks["layers"]}
    chosen = rows if layers_to_log is None else [i for i in layers_to_log if i in rows]
    for key, name in INTERMEDIATE_LOG_NAMES.items():
        metrics[f"sinks/intermediate/{name}/mean"] = layer_mean(sinks, key)
        for band, layers in band_layers(sinks, bands).items():
            metrics[f"sinks/intermediate/{name}/{band}"] = layer_mean(sinks, key, layers)
        for layer in chosen:
            metrics[f"sinks/intermediate/{name}/layer_{layer}"] = float(rows[layer].get(key, float("nan")))
    segments = sorted({name for row in sinks["layers"] for name in row.get("by_segment", {})})
    for key in INTERMEDIATE_METRICS:
        for segment in segments:
            values = [
                r["by_segment"][segment].get(key) for r in sinks["layers"] if segment in r["by_segment"]
            ]
            values = [v for v in values if v is not None and v == v]
            if values:
                name = INTERMEDIATE_LOG_NAMES[key]
                metrics[f"sinks/intermediate/{name}/{segment}/mean"] = sum(values) / len(values)
    if first is not None:
        metrics["sinks/intermediate/tracked_attention_change_pct"] = tracked_change(first, sinks)[
            "attention_change_pct"
        ]
        for band, layers in band_layers(sinks, bands).items():
            change = tracked_change(first, sinks, layers)["attention_change_pct"]
            metrics[f"sinks/intermediate/tracked_attention_change_pct/{band}"] = change
    return metrics


def sink_log_metrics(report: SinkReport, layers_to_log: list[int] | None) -> dict[str, float]:
    """The position-0 scalars of one measurement (layers_to_log None = every measured layer)."""
    measured = {row.layer: row for row in report.layers}
    chosen = measured if layers_to_log is None else [i for i in layers_to_log if i in measured]
    metrics = {}
    for metric in LAYER_METRICS:
        metrics[f"sinks/{metric}/mean"] = report.mean(metric)
        for layer in chosen:
            metrics[f"sinks/{metric}/layer_{layer}"] = float(getattr(measured[layer], metric))
    segments = sorted({name for row in report.layers for name in row.by_segment})
    for metric in SEGMENT_METRICS:
        for name in segments:
            values = [row.by_segment[name][metric] for row in report.layers if name in row.by_segment]
            metrics[f"sinks/{metric}/{name}/mean"] = sum(values) / len(values)
    return metrics


def define_wandb_sink_metrics(trainer: L.Trainer) -> None:
    """Plot `sinks/*` against trainer/global_step in W&B, when a W&B run is active (never raises)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            try:
                logger.experiment.define_metric("sinks/*", step_metric="trainer/global_step")
            except Exception as err:  # noqa: BLE001 - a logging problem must not stop training
                log.warning("W&B define_metric failed: %s", err)


def _in_eval_mode(measure):
    """Measuring must not change the model: the whole module (AVSR encoders too: BatchNorm statistics,
    dropout) runs in eval mode, and every submodule's own train/eval flag is restored afterwards."""

    @functools.wraps(measure)
    def wrapper(self, trainer: L.Trainer, pl_module: L.LightningModule):
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            return measure(self, trainer, pl_module)
        finally:
            for module, training in modes.items():
                module.training = training

    return wrapper


class SinkDiagnosticsCallback(Callback):
    """Sink metrics on a fixed probe batch: at train start, every `every_n_steps` optimizer steps, at the end.

    Args:
        every_n_steps: measurement period in global steps (0 = only before and after training).
        probe_batch_size: samples of the first validation batch to keep.
        layers_to_log: layers logged one by one (means always cover every layer); None = all.
        sink_eps, sink_key_position, intermediate_*: thresholds passed to `measure_sinks`.
        plots: write PNG figures (and W&B images when a WandbLogger is active).
        output_dir: where `sinks/` and `sinks.json` go; None = trainer.default_root_dir (the run folder).
        chunk_size: query rows per chunk when recomputing attention.
        layer_bands: {name: [first, last]} layer bands (inclusive, last null = to the end) for the
            intermediate-sink numbers, e.g. SmolLM2's early/middle layers 1-8 vs the late ones; None = all.
        num_bos_features: how many of BOS's largest features count as its massive features.
        max_intermediate_candidates: positions per layer whose received attention is recomputed.

    The first measurement (normally step 0) and the intermediate sinks it found are callback state: saved
    in checkpoints, so that a resumed run still tracks the step-0 sinks and prints step-0 "before" numbers.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        probe_batch_size: int = 8,
        layers_to_log: list[int] | None = None,
        sink_eps: float = 0.3,
        sink_key_position: int = 0,
        intermediate_cosine_threshold: float = 0.8,
        intermediate_attention_threshold: float = 0.2,
        plots: bool = True,
        output_dir: str | None = None,
        chunk_size: int = 256,
        layer_bands: dict | None = None,
        num_bos_features: int = 1,
        max_intermediate_candidates: int = 64,
    ):
        self.every_n_steps = every_n_steps
        self.probe_batch_size = probe_batch_size
        self.layers_to_log = list(layers_to_log) if layers_to_log is not None else None
        self.probe_kwargs = dict(
            sink_eps=sink_eps,
            sink_key_position=sink_key_position,
            chunk_size=chunk_size,
            intermediate_cosine_threshold=intermediate_cosine_threshold,
            intermediate_attention_threshold=intermediate_attention_threshold,
            num_bos_features=num_bos_features,
            max_intermediate_candidates=max_intermediate_candidates,
        )
        self.layer_bands = {k: list(v) for k, v in layer_bands.items()} if layer_bands else None
        self.plots = plots
        self.output_dir = output_dir
        self.probe_batch = None
        self.first: tuple[int, dict] | None = None  # (step, sinks.json dict)
        self.last: tuple[int, dict] | None = None
        self._last_step: int | None = None
        self.tracked_sinks: list[dict] | None = None  # the first measurement's intermediate sinks

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The first measurement and its sinks (plain containers: checkpoints load with weights_only)."""
        if self.first is None:
            return {}
        return {"first_step": self.first[0], "first": self.first[1], "tracked_sinks": self.tracked_sinks}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("first") is not None:
            self.first = (int(state_dict["first_step"]), state_dict["first"])
            self.tracked_sinks = state_dict.get("tracked_sinks") or []

    # ----------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        define_wandb_sink_metrics(trainer)
        self.measure(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.measure(trainer, pl_module)
        if trainer.is_global_zero and self.last is not None:
            write_sinks_json(self.run_dir(trainer) / "sinks.json", self.last[1])

    # ------------------------------------------------------------------------------------ measuring
    def run_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or trainer.default_root_dir)

    def fixed_probe_batch(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """The first validation batch, on the module's device (fetched once)."""
        if self.probe_batch is None:
            loader = _first_val_dataloader(trainer)
            self.probe_batch = move_data_to_device(next(iter(loader)), pl_module.device)
        return self.probe_batch

    @torch.no_grad()
    @_in_eval_mode
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> SinkReport:
        """Measure, log, and (rank 0) write files for the current step. All ranks run the forward."""
        step = trainer.global_step
        llm_inputs, segments = pl_module.sink_probe_inputs(self.fixed_probe_batch(trainer, pl_module))
        n = self.probe_batch_size
        llm_inputs = {k: v[:n] if torch.is_tensor(v) else v for k, v in llm_inputs.items()}
        segments = segments[:n] if segments is not None else None
        with root_params_gathered(trainer):  # FSDP: the probe's forward bypasses the wrapped root
            report = measure_sinks(
                pl_module.llm, llm_inputs, segments, tracked_sinks=self.tracked_sinks, **self.probe_kwargs
            )
        if self.tracked_sinks is None:  # first measurement: its sinks are the ones tracked from now on
            self.tracked_sinks = [
                {k: s[k] for k in ("sample", "position", "layers", "token", "segment")}
                for s in report.intermediate_sinks
            ]
        self._last_step = step
        sinks = report.to_json(model=_model_name(pl_module.llm))
        sinks["step"] = step
        sinks["layer_bands"] = self.layer_bands
        sinks["tracked_sinks"] = self.tracked_sinks
        self.first = self.first or (step, sinks)
        self.last = (step, sinks)
        if trainer.is_global_zero:
            self._log(trainer, report, step)
        return report

    def _log(self, trainer: L.Trainer, report: SinkReport, step: int) -> None:
        metrics = intermediate_log_metrics(
            self.last[1], self.first[1] if self.first else None, self.layers_to_log, self.layer_bands
        )
        metrics.update(sink_log_metrics(report, self.layers_to_log))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()
        out_dir = self.run_dir(trainer) / "sinks"
        write_sinks_json(out_dir / f"step_{step:06d}.json", self.last[1])
        if self.plots:
            paths = write_sink_plots(report, out_dir, prefix=f"step_{step:06d}_", title=f"step {step}")
            _log_wandb_images(trainer, paths, step)

    def summary_lines(self) -> list[str]:
        """Before/after sink numbers for the end-of-run summary (empty before any measurement): the header,
        the one-line fate of the step-0 sinks, then the table (lines starting with "|")."""
        if self.first is None or self.last is None:
            return []
        (first_step, before), (last_step, after) = self.first, self.last
        header = f"{SUMMARY_HEADER}: step {first_step} -> step {last_step}"
        table = before_after_lines(before, after, self.layers_to_log, self.layer_bands)
        return [header, tracked_headline(before, after, self.layer_bands), *table]


def _model_name(llm: torch.nn.Module) -> str:
    config = getattr(llm, "config", None)
    return getattr(config, "_name_or_path", "") or type(llm).__name__


def _first_val_dataloader(trainer: L.Trainer):
    datamodule = getattr(trainer, "datamodule", None)
    loaders = (
        datamodule.val_dataloader()
        if datamodule is not None and hasattr(datamodule, "val_dataloader")
        else None
    )
    if loaders is None:
        loaders = trainer.val_dataloaders
    if isinstance(loaders, list | tuple):
        loaders = loaders[0] if loaders else None
    if isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    if loaders is None:
        raise RuntimeError("SinkDiagnosticsCallback needs a validation dataloader for its probe batch")
    return loaders


def _log_wandb_images(trainer: L.Trainer, paths: dict[str, Path], step: int) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            try:
                for name, path in paths.items():
                    logger.log_image(key=f"sinks/plots/{name}", images=[str(path)], step=step)
            except Exception as err:  # noqa: BLE001
                log.warning("W&B image logging failed: %s", err)
