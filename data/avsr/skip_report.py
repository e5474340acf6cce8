"""Callback that logs skipped-clip totals at the end of every train/val/test epoch."""

import lightning as L


class ReportSkippedClips(L.Callback):
    """Calls `trainer.datamodule.report_skipped(stage)` on every rank; add it to `callbacks`."""

    def _report(self, trainer: L.Trainer, stage: str) -> None:
        report = getattr(trainer.datamodule, "report_skipped", None)
        if callable(report) and not trainer.sanity_checking:
            report(stage)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, "train")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, "test")
