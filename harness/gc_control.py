"""Python's garbage collector on a schedule instead of whenever allocations trigger it.

A compiled model (torch.compile's graphs, guards and CUDA-graph trees) leaves millions of long-lived Python
objects, and an automatic full collection walks all of them: a host pause of its own in a random step. At
small-model speeds (tens of steps per second, the host the bottleneck) such pauses show up as stalls
between steps (on the H200 an automatic full collection paused a SmolLM2 whole-decoder run for 1.0 s).
`ScheduledGarbageCollection` turns automatic collection off when training starts and collects every
`every_n_steps` optimizer steps instead, on every rank at the same step (as NeMo's and Megatron's manual GC
do for the same reason). With `freeze`, what survives a collection is frozen (`gc.freeze`: never scanned
again): once when training starts, once after `freeze_after_steps` steps (torch.compile builds its graphs
and CUDA-graph trees lazily, in the first steps) and after each scheduled collection, so each one only
walks what the steps since have left. At the end of training the collector is restored as it was.

    python train.py ... 'callbacks=[default,gc_control]'   (conf/callbacks/gc_control.yaml)
"""

from __future__ import annotations

import gc

import lightning as L


class ScheduledGarbageCollection(L.Callback):
    def __init__(self, every_n_steps: int = 200, freeze: bool = True, freeze_after_steps: int = 10):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.freeze, self.freeze_after_steps = every_n_steps, freeze, freeze_after_steps
        self.collections = 0
        self._was_enabled, self._last_step = True, 0

    def _collect(self) -> None:
        gc.collect()
        if self.freeze:
            gc.freeze()

    def on_train_start(self, trainer, pl_module):
        self._was_enabled = gc.isenabled()
        self._collect()
        gc.disable()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step  # optimizer steps: with accumulation, several batches share one
        if step == self._last_step:
            return
        self._last_step = step
        if step % self.every_n_steps == 0:
            self._collect()
            self.collections += 1
        elif self.freeze and step == self.freeze_after_steps:  # the compiled graphs exist by now
            self._collect()

    def on_train_end(self, trainer, pl_module):
        if self.freeze:
            gc.unfreeze()
        if self._was_enabled:
            gc.enable()
