"""The recipes' clipping (harness/clipping.py): under FSDP through FSDP's own clip_grad_norm_ (Lightning's
FSDPPrecision refuses gradient_clip_algorithm='norm': the 2-H200 check failed on exactly that); a fused
optimizer under bf16 autocast clipped by torch (Lightning refuses it); elsewhere Lightning clips."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from harness import clipping as fsdp


class _Module:
    def __init__(self, trainer):
        self.trainer = trainer
        self.lightning_calls = []

    def clip_gradients(self, optimizer, value, algorithm):
        self.lightning_calls.append((value, algorithm))


def _trainer(calls):
    model = SimpleNamespace(clip_grad_norm_=lambda value: calls.append(value))
    return SimpleNamespace(strategy=SimpleNamespace(model=model))


def test_fsdp_norm_clipping_goes_through_fsdp(monkeypatch):
    calls = []
    module = _Module(_trainer(calls))
    monkeypatch.setattr(fsdp, "is_fsdp", lambda trainer: True)
    fsdp.clip_gradients(module, None, 1.0, "norm")
    fsdp.clip_gradients(module, None, 0.5, None)
    assert calls == [1.0, 0.5] and module.lightning_calls == []


def test_without_fsdp_lightning_clips(monkeypatch):
    calls = []
    module = _Module(_trainer(calls))
    monkeypatch.setattr(fsdp, "is_fsdp", lambda trainer: False)
    fsdp.clip_gradients(module, None, 1.0, "norm")
    assert calls == [] and module.lightning_calls == [(1.0, "norm")]


def test_recipes_route_their_clipping_through_the_helper():
    from recipes.avsr import AVSRRecipe
    from recipes.causal_lm import CausalLMRecipe

    for recipe in (CausalLMRecipe, AVSRRecipe):
        assert recipe.configure_gradient_clipping.__globals__["clip_gradients"] is fsdp.clip_gradients


class _FusedStepRecorder(torch.optim.AdamW):
    """Fused AdamW (CPU fused kernels exist) that records the gradient norm it is asked to apply."""

    norms: list[float] = []

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        type(self).norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        super().step()
        return loss


class _Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        return (self.layer(batch) * 1000).pow(2).mean()  # gradients far above the clip value

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        fsdp.clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        return _FusedStepRecorder(self.parameters(), lr=1e-3, fused=True)


def _fit(module, precision, clip):
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=2,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(torch.randn(4, 8), batch_size=2))


def test_fused_optimizer_under_bf16_autocast_is_clipped():
    """Lightning alone raises "does not allow for gradient clipping" here; the recipes' hook clips by norm."""
    _FusedStepRecorder.norms = []
    _fit(_Regression(), "bf16-mixed", clip=1.0)
    assert len(_FusedStepRecorder.norms) == 2
    assert all(norm == pytest.approx(1.0, rel=1e-3) for norm in _FusedStepRecorder.norms)


def test_lightning_alone_refuses_that_clipping():
    class LightningClipping(_Regression):
        def configure_gradient_clipping(
            self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
        ):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    module = LightningClipping()
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        _fit(module, "bf16-mixed", clip=1.0)
