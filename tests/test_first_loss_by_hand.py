"""An independent check of the pinned first loss: the cross-entropy of the first training batch computed by
hand from the tiny model's logits (log_softmax + gather), not by the loss code the harness uses."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from tests.hydra_utils import compose_train, tiny_sft_overrides
from tests.test_train_harness import PINNED_FIRST_LOSSES

IGNORED = -100  # label of positions that are not targets (prompt, padding)


def test_first_training_loss_equals_a_hand_computed_cross_entropy(tmp_path):
    cfg = compose_train(tiny_sft_overrides("trainer.max_steps=3", "scheduler=none"), tmp_path / "run")
    L.seed_everything(cfg.seed, workers=True)  # as train() does before building anything
    module = instantiate(cfg.model, objectives={}, _convert_="all")
    datamodule = instantiate(cfg.data)
    datamodule.connect_tokenizer(module.tokenizer)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))  # epoch 0, the batch of training step 0
    with torch.no_grad():
        logits = module.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # position t predicts token t + 1
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORED
    picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    hand_ce = float(-picked[scored].sum() / scored.sum())
    assert scored.sum() > 0
    assert hand_ce == pytest.approx(PINNED_FIRST_LOSSES[0], abs=1e-3)
