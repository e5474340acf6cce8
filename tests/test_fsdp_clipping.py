"""Under FSDP the recipes clip through FSDP's own clip_grad_norm_ (Lightning's FSDPPrecision refuses
gradient_clip_algorithm='norm': the 2-H200 check failed on exactly that); elsewhere Lightning clips."""

from types import SimpleNamespace

from harness import fsdp


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
        assert "fsdp.clip_gradients" in recipe.configure_gradient_clipping.__code__.co_names or any(
            "clip_gradients" in name for name in recipe.configure_gradient_clipping.__code__.co_names
        )
