"""The GPU training configuration (fast path, whole-decoder compile, bf16 autocast, fused AdamW, gradient
clipping, objectives) run through `train()` on CPU, where each piece has a CPU form: a GPU session must not
be the first place where these pieces meet (the fused optimizer met Lightning's clipping refusal there)."""

from __future__ import annotations

import math

import pytest

from tests.hydra_utils import compose_train, logged, tiny_sft_overrides
from train import train

GPU_LIKE = [
    "model.kernels=fast",
    "model.fast.require_cuda=false",  # the fast path without CUDA (tests only)
    "model.fast.compile=model",
    "model.fast.compile_backend=aot_eager",  # Dynamo + AOT autograd, no Inductor codegen on CPU
    "trainer.precision=bf16-mixed",
    "optimizer.fused=true",  # the CUDA default (recipes/optim.py), forced here: CPU has fused AdamW too
    "trainer.gradient_clip_val=1.0",
    "data.pad_to_multiple_of=64",
    "trainer.max_steps=3",
    "validate_before_training=false",
    "callbacks.sink_diagnostics.every_n_steps=0",
]


@pytest.mark.parametrize(
    ("objectives", "logged_terms"), [("[decorr,adl]", ("decorr", "adl")), ("[meap]", ())]
)
def test_fast_path_with_objectives_trains_through_the_recipe(tmp_path, objectives, logged_terms):
    run_dir = tmp_path / "run"
    cfg = compose_train(tiny_sft_overrides(*GPU_LIKE, f"objective={objectives}"), run_dir)
    train(cfg)
    losses = logged(run_dir, "train/loss")
    assert losses and all(math.isfinite(x) for x in losses)
    for term in logged_terms:
        assert logged(run_dir, f"train/loss_{term}")
