"""Python's garbage collector on a schedule instead of whenever allocations trigger it.

A compiled model (torch.compile's graphs, guards and CUDA-graph trees) leaves millions of long-lived Python
objects, and an automatic full collection walks all of them: a host pause of its own in a random step. At
small-model speeds (tens of steps per second, the host the bottleneck) such pauses show up as stalls
between steps. `ScheduledGarbageCollection` freezes what exists once training starts (`gc.freeze`: the
model, the compiled graphs, the data: never scanned again), turns automatic collection off and collects
every `every_n_steps` steps instead, on every rank at the same step (as NeMo and Megatron do for the same
reason). At the end of training the collector is restored as it was.

    python train.py ... 'callbacks=[default,gc_control]'   (conf/callbacks/gc_control.yaml)
"""

from __future__ import annotations

import gc

import lightning as L


class ScheduledGarbageCollection(L.Callback):
    def __init__(self, every_n_steps: int = 200, freeze: bool = True):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.freeze = every_n_steps, freeze
        self.collections = 0
        self._was_enabled, self._last_step = True, 0

    def on_train_start(self, trainer, pl_module):
        self._was_enabled = gc.isenabled()
        gc.collect()
        if self.freeze:
            gc.freeze()
        gc.disable()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step  # optimizer steps: with accumulation, several batches share one
        if step % self.every_n_steps == 0 and step != self._last_step:
            gc.collect()
            self.collections += 1
            self._last_step = step

    def on_train_end(self, trainer, pl_module):
        if self.freeze:
            gc.unfreeze()
        if self._was_enabled:
            gc.enable()
