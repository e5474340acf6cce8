"""recipes/flat_params.py (tolerance: the clip's total norm sums in another order): training with the trainable parameters as views of one flat buffer gives the
weights of training without it (AdamW with weight decay, gradient clipping, gradient accumulation), survives
anything that drops the views, skips a step whose gradients were dropped, and resumes from its checkpoint."""

from __future__ import annotations

from functools import partial

import torch

from recipes.causal_lm import CausalLMRecipe
from recipes.flat_params import FlatParameters
from tests.lightning_utils import quiet_cpu_trainer
from tests.test_objectives_training import TINY, sft_batch


def _recipe(flat: bool) -> CausalLMRecipe:
    torch.manual_seed(0)
    return CausalLMRecipe(
        backbone=TINY,
        optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        seed=1,
        flat_params=flat,
    )


def _fit(recipe, steps: int, **trainer_args):
    batch = sft_batch(recipe.tokenizer)
    loader = torch.utils.data.DataLoader([batch] * steps * 2, batch_size=None)
    settings = dict(max_steps=steps, limit_val_batches=0, gradient_clip_val=0.05, accumulate_grad_batches=2)
    trainer = quiet_cpu_trainer(**{**settings, **trainer_args})
    trainer.fit(recipe, train_dataloaders=loader)
    return trainer


def _trainable(recipe) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in recipe.named_parameters() if p.requires_grad}


def test_flat_training_gives_the_same_weights():
    plain, flat = _recipe(False), _recipe(True)
    _fit(plain, 6)
    _fit(flat, 6)
    assert plain.flat_params is None and flat.flat_params is not None
    assert len(flat.flat_params.flat) == 1  # every LoRA tensor in one fp32 buffer
    a, b = _trainable(plain), _trainable(flat)
    assert a.keys() == b.keys() and len(a) > 4
    moved = 0
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
        moved += int(not torch.equal(a[name], _trainable(_recipe(False))[name]))
    assert moved > 0  # the weights did train


def test_views_come_back_after_zero_grad_set_to_none_and_a_dropped_step_is_skipped():
    lin = torch.nn.Linear(4, 3)
    flat = FlatParameters(list(lin.parameters()))
    optimizer = torch.optim.AdamW(flat.flat, lr=0.1)
    x = torch.randn(5, 4)
    lin(x).sum().backward()
    optimizer.zero_grad(set_to_none=True)  # what the non-finite guard does to skip a step
    before = lin.weight.detach().clone()
    optimizer.step()
    assert torch.equal(lin.weight, before)  # skipped: no update, no moments
    lin.zero_grad(set_to_none=True)  # a module-level reset drops the views too
    assert not flat.attached()
    flat.zero_grad()
    assert flat.attached() and flat.grads[0].abs().sum() == 0
    lin(x).sum().backward()
    assert flat.grads[0].abs().sum() > 0  # gradients land in the buffer again
    optimizer.step()
    assert not torch.equal(lin.weight, before)


def test_flat_run_resumes_from_its_checkpoint(tmp_path):
    straight = _recipe(True)
    _fit(straight, 6)
    first = _recipe(True)
    trainer = _fit(first, 3)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    size = ckpt.stat().st_size
    resumed = _recipe(True)
    trainer = quiet_cpu_trainer(
        max_steps=6, limit_val_batches=0, gradient_clip_val=0.05, accumulate_grad_batches=2
    )
    batch = sft_batch(resumed.tokenizer)
    loader = torch.utils.data.DataLoader([batch] * 12, batch_size=None)
    trainer.fit(resumed, train_dataloaders=loader, ckpt_path=ckpt)
    a, b = _trainable(straight), _trainable(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
    lora_bytes = sum(v.numel() * v.element_size() for v in a.values())
    assert size < 6 * lora_bytes + 2_000_000  # weights + two AdamW moments, stored once, not per view
