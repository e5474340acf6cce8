"""SinkDiagnosticsCallback on a minimal LightningModule around the tiny model (3 steps, CSVLogger)."""

import csv
import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from torch.utils.data import DataLoader

from diagnostics.callback import SinkDiagnosticsCallback, _first_val_dataloader
from models.segments import PROMPT
from tests.lightning_utils import quiet_cpu_trainer

TEXTS = ["The cat sat on the mat.", "Dogs bark at night.", "Rain falls on the quiet town.", "Hello there."]


class RecordingLogger(Logger):
    """Keeps every (step, metrics) it receives."""

    def __init__(self):
        super().__init__()
        self.records = []

    name = "recording"
    version = "0"

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class TinyLM(L.LightningModule):
    """Implements the recipe contract: `llm` and `sink_probe_inputs(batch)`."""

    def __init__(self, llm):
        super().__init__()
        self.llm = llm

    def training_step(self, batch, batch_idx):
        return self.llm(**batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.llm(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sink_probe_inputs(self, batch):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return inputs, batch["attention_mask"].long() * PROMPT


def tiny_trainer(tmp_path, **settings) -> L.Trainer:
    """The quiet CPU Trainer with checkpointing on (Lightning's default), no sanity check and one
    validation batch; `settings` add to or override these."""
    defaults = dict(
        enable_checkpointing=True, default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=1
    )
    return quiet_cpu_trainer(**{**defaults, **settings})


class TextData(L.LightningDataModule):
    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def _loader(self):
        def collate(texts):
            batch = dict(self.tokenizer(texts, return_tensors="pt", padding=True))
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            return batch

        return DataLoader(TEXTS, batch_size=4, collate_fn=collate)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


def test_callback_logs_metrics_and_writes_files(tmp_path, tiny_lm):
    model, tokenizer = tiny_lm
    callback = SinkDiagnosticsCallback(every_n_steps=2, probe_batch_size=3, layers_to_log=[1])
    recording = RecordingLogger()
    loggers = [
        CSVLogger(tmp_path, name="csv", version=""),
        recording,
        WandbLogger(mode="disabled", save_dir=str(tmp_path)),
    ]
    tiny_trainer(
        tmp_path,
        max_steps=3,
        devices=1,
        logger=loggers,
        callbacks=[callback],
        enable_checkpointing=False,
        check_val_every_n_epoch=100,
    ).fit(TinyLM(model), datamodule=TextData(tokenizer))

    steps = [step for step, metrics in recording.records if "sinks/first_token_attention/mean" in metrics]
    assert steps == [0, 2, 3]  # before training, every 2 steps, at the end
    logged = next(metrics for step, metrics in recording.records if step == 0)
    for metric in ("first_token_attention", "activation_ratio", "bos_cosine", "sink_rate"):
        assert f"sinks/{metric}/layer_1" in logged and f"sinks/{metric}/mean" in logged
        assert f"sinks/{metric}/layer_0" not in logged
    assert "sinks/bos_cosine/prompt/mean" in logged
    assert 0.0 < logged["sinks/first_token_attention/layer_1"] < 1.0

    with open(tmp_path / "csv" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("sinks/sink_rate/layer_1")]
    assert [int(row["step"]) for row in rows] == [0, 2, 3]

    sinks = json.loads((tmp_path / "sinks.json").read_text())
    assert sinks["num_texts"] == 3 and sinks["step"] == 3
    assert [row["layer"] for row in sinks["layers"]] == [0, 1]
    assert set(sinks["layers"][0]) >= {
        "first_token_attention",
        "sink_rate",
        "max_activation",
        "max_activation_position",
        "max_activation_feature",
        "activation_ratio",
        "bos_cosine",
    }
    for step in (0, 2, 3):
        for name in ("layer_curves", "head_heatmap", "massive_activations"):
            assert (tmp_path / "sinks" / f"step_{step:06d}_{name}.png").stat().st_size > 1000
        assert (tmp_path / "sinks" / f"step_{step:06d}.json").exists()

    lines = callback.summary_lines()
    assert lines[0] == "sinks on the probe batch: step 0 -> step 3"
    assert any(line.startswith("| first-token attention, layer 1 |") for line in lines)


def test_probe_loader_falls_back_to_trainer_val_dataloaders():
    loader = DataLoader([1, 2])
    assert _first_val_dataloader(SimpleNamespace(datamodule=None, val_dataloaders=[loader])) is loader
    with pytest.raises(RuntimeError, match="validation dataloader"):
        _first_val_dataloader(SimpleNamespace(datamodule=None, val_dataloaders=None))


def test_resumed_run_keeps_the_step0_figures_and_sinks(tmp_path, tiny_lm):
    """Issue 10: after a resume the "before" numbers and the tracked sinks are step 0's, from the checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    model, tokenizer = tiny_lm
    # thresholds every token passes, so that the tiny random model has "sinks" to track
    settings = dict(
        every_n_steps=0, plots=False, intermediate_cosine_threshold=-1.0, intermediate_attention_threshold=0.0
    )

    def fit(max_steps, callback, ckpt_path=None):
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
        trainer = tiny_trainer(
            tmp_path, max_steps=max_steps, callbacks=[callback, checkpoint], check_val_every_n_epoch=100
        )
        trainer.fit(TinyLM(model), datamodule=TextData(tokenizer), ckpt_path=ckpt_path)

    interrupted = SinkDiagnosticsCallback(**settings)
    fit(2, interrupted)
    assert interrupted.first[0] == 0 and interrupted.tracked_sinks
    resumed = SinkDiagnosticsCallback(**settings)
    fit(4, resumed, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.first[0] == 0 and resumed.first[1] == interrupted.first[1]
    assert resumed.tracked_sinks == interrupted.tracked_sinks
    lines = resumed.summary_lines()
    assert lines[0] == "sinks on the probe batch: step 0 -> step 4"
    assert "intermediate sinks of step 0" in lines[1]
    # the measurement at the resume step (2) tracked the step-0 sinks, not the ones it found itself
    at_resume = json.loads((tmp_path / "sinks" / "step_000002.json").read_text())
    assert at_resume["tracked_sinks"] == interrupted.tracked_sinks


def test_probe_gathers_the_fsdp_root_parameters(tmp_path, tiny_lm, monkeypatch):
    """Under FSDP the probe's forward (pl_module.llm, outside the wrapped root's forward) runs inside
    FSDP.summon_full_params(root, recurse=False): on 2 H200s it failed with "'weight' must be 2-D"
    (the embedding was a flat shard). Without FSDP no context is entered (nullcontext)."""
    from contextlib import contextmanager

    from torch.distributed.fsdp import FullyShardedDataParallel

    from harness import fsdp

    calls = []

    @contextmanager
    def summon(module, recurse=True, writeback=True):
        calls.append((module, recurse, writeback))
        yield

    monkeypatch.setattr(FullyShardedDataParallel, "summon_full_params", staticmethod(summon))
    root = torch.nn.Linear(1, 1)
    fake_trainer = SimpleNamespace(strategy=SimpleNamespace(model=root))
    monkeypatch.setattr(fsdp, "is_fsdp", lambda trainer: trainer is fake_trainer)
    with fsdp.root_params_gathered(L.Trainer(accelerator="cpu", logger=False)):
        pass
    assert calls == []
    with fsdp.root_params_gathered(fake_trainer):
        pass
    assert calls == [(root, False, False)]

    model, tokenizer = tiny_lm
    entered = []
    monkeypatch.setattr(
        "diagnostics.callback.root_params_gathered", lambda trainer: entered.append(trainer) or summon(root)
    )
    trainer = tiny_trainer(
        tmp_path,
        max_steps=1,
        callbacks=[SinkDiagnosticsCallback(every_n_steps=0, probe_batch_size=2)],
        enable_checkpointing=False,
    )
    trainer.fit(TinyLM(model), datamodule=TextData(tokenizer))
    assert entered and all(t is trainer for t in entered)
