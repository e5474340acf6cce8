"""test_checkpoint (harness/test_checkpoint.py): score and export the last weights, or the best by validation."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from harness.test_checkpoint import resolve_test_checkpoint
from tests.lightning_utils import quiet_cpu_trainer


class Drifting(L.LightningModule):
    """One weight that training moves by +1 a step; validation error |w - 2| is best at w = 2 (step 2),
    then worse: a run that 'overfits' after step 2. Test logs the weight it was given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return (self.w * -1.0) + 0 * batch[0].sum()  # SGD lr 1: w += 1 each step

    def validation_step(self, batch, batch_idx):
        self.log("val/err", (self.w - 2).abs())

    def test_step(self, batch, batch_idx):
        self.log("test/w", self.w.detach())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def loader():
    return DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)


def test_best_scores_the_checkpoint_where_validation_was_best(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/err", mode="min", save_top_k=1)
    trainer = quiet_cpu_trainer(max_steps=5, enable_checkpointing=True, callbacks=[checkpoint])
    module = Drifting()
    trainer.fit(module, train_dataloaders=loader(), val_dataloaders=loader())
    assert float(module.w.detach()) == 5.0  # the last weights
    path, line = resolve_test_checkpoint("best", [checkpoint])
    assert path == checkpoint.best_model_path and "best val/err = 0" in line
    tested = trainer.test(module, dataloaders=loader(), ckpt_path=path, verbose=False)[0]
    assert tested["test/w"] == 2.0  # the best weights, not the last
    assert resolve_test_checkpoint("last", [checkpoint]) == (None, "tested: the last weights")


def test_best_without_a_monitored_checkpoint_is_a_clear_error_and_an_empty_one_falls_back():
    with pytest.raises(ValueError, match="needs a ModelCheckpoint callback with a monitor"):
        resolve_test_checkpoint("best", [ModelCheckpoint(monitor=None)])
    path, line = resolve_test_checkpoint("best", [ModelCheckpoint(monitor="val/wer")])
    assert path is None and "no best checkpoint by val/wer" in line
    with pytest.raises(ValueError, match="last', 'best"):
        resolve_test_checkpoint("bset", [])


def test_the_asr_study_scores_its_best_val_wer_checkpoint():
    from tests.hydra_utils import compose_train

    cfg = compose_train(["experiment=asr_study"])
    assert cfg.test_checkpoint == "best" and cfg.callbacks.model_checkpoint.monitor == "val/wer"
    assert compose_train(["experiment=lm_sft"]).test_checkpoint == "last"


def test_an_asr_study_arm_scores_and_exports_its_best_checkpoint(tmp_path):
    """Through train.py (the study's --smoke arm: tiny models, CPU): the summary names the best val/wer
    checkpoint that was validated, tested and exported."""
    from studies import asr_downsampling as study

    study.main(["--smoke", "--out", str(tmp_path), "--only", "x4_base_s0"])
    log = (tmp_path / "x4_base_s0" / "train.log").read_text()
    assert "tested: " in log and "checkpoints/best-" in log and "(best val/wer = " in log
    import json

    results = json.loads((tmp_path / "x4_base_s0" / "results.json").read_text())
    assert "checkpoints/best-" in results["scored_checkpoint"] and "test/wer" in results["after"]
