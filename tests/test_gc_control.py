"""ScheduledGarbageCollection: automatic collection off during training, one every N optimizer steps, the
collector restored afterwards."""

import gc

import lightning as L
import pytest
import torch

from harness.gc_control import ScheduledGarbageCollection
from tests.lightning_utils import quiet_cpu_trainer


class Probe(L.LightningModule):
    """Records, in each step, whether automatic collection is on and how many objects are frozen."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.seen: list[tuple[bool, int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((gc.isenabled(), gc.get_freeze_count()))
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(callback, steps=10, accumulate=1):
    module = Probe()
    trainer = quiet_cpu_trainer(max_steps=steps, accumulate_grad_batches=accumulate, callbacks=[callback])
    batches = [torch.randn(2, 4) for _ in range(steps * accumulate)]
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return module


@pytest.mark.parametrize("accumulate", [1, 2])
def test_collects_every_n_optimizer_steps_and_restores_the_collector(accumulate, monkeypatch):
    assert gc.isenabled()
    freezes = []
    real_freeze = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: (freezes.append(len(freezes)), real_freeze()))
    callback = ScheduledGarbageCollection(every_n_steps=3, freeze_after_steps=4)
    module = fit(callback, accumulate=accumulate)
    assert callback.collections == 3  # after optimizer steps 3, 6 and 9 (not once per accumulated batch)
    assert all(not enabled and frozen > 0 for enabled, frozen in module.seen)  # off, and the model frozen
    # frozen at the start, after steps 3 and 4 (the compiled graphs exist by then), 6 and 9: 5 times
    assert len(freezes) == 5
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_disabled_collector_stays_disabled_and_bad_intervals_are_refused():
    gc.disable()
    try:
        fit(ScheduledGarbageCollection(every_n_steps=5, freeze=False), steps=4)
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()
    with pytest.raises(ValueError, match="every_n_steps"):
        ScheduledGarbageCollection(every_n_steps=0)
