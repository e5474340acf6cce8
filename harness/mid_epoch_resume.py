"""Continue an epoch where the checkpoint left it, instead of replaying it from its first batch.

Lightning restores a mid-epoch checkpoint (a requeue or a step checkpoint) with the right counters but, for a
plain DataLoader, restarts the data from the first batch of the epoch: the resumed run trains on batches
it has seen and, with epochs longer than a Slurm job, never sees the end of the data. Our samplers order the
data by (seed, epoch) only (`data/text/sampler.py`, `data/avsr/batching.py`), so skipping the batch *indices*
already trained reproduces an uninterrupted run exactly, without loading the skipped clips.
"""

from __future__ import annotations

import itertools
import logging

import lightning as L
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class _SkipFirstBatches:
    """A batch sampler whose next pass starts `skip` batches in; everything else is the wrapped one's."""

    def __init__(self, inner, skip: int):
        self.inner, self.skip = inner, skip

    def __iter__(self):
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.inner), skip, None)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def batches_done_in_epoch(trainer: L.Trainer) -> int:
    """Training batches of the current epoch already trained, as Lightning's restored counters say (0 if the
    checkpoint is at an epoch boundary)."""
    loop = trainer.fit_loop
    if not loop.restarted_mid_epoch:
        return 0
    done = loop.epoch_loop.batch_progress.current.completed
    done += 1 if loop.epoch_loop.restarted_on_train_batch_end else 0
    return 0 if done >= trainer.num_training_batches else done


class MidEpochResume(Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        skip = batches_done_in_epoch(trainer)
        loop = trainer.fit_loop
        if skip == 0 or loop._combined_loader is None or loop._data_fetcher is None:
            return
        for loader in loop._combined_loader.flattened:
            if getattr(loader, "batch_sampler", None) is None:
                log.warning("mid-epoch resume: %s has no batch sampler; the epoch restarts", type(loader))
                return
        for loader in loop._combined_loader.flattened:
            # DataLoader forbids setting batch_sampler after __init__; its iterators read it afresh
            object.__setattr__(loader, "batch_sampler", _SkipFirstBatches(loader.batch_sampler, skip))
            _set_sampler_epoch(loader, loop.epoch_progress.current.processed)
        iter(loop._data_fetcher)  # Lightning made the iterator before the restore was known; make it again
        log.info("mid-epoch resume: epoch %d continues at batch %d", trainer.current_epoch, skip)
