"""Non-finite losses and gradients: a bad step is skipped and counted, N in a row stop the run with a clear
error, and no non-finite checkpoint or adapter is ever written."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from harness import nonfinite_guard
from harness.nonfinite_guard import NonFiniteGuard, NonFiniteTrainingError, check_finite_weights
from tests.hydra_utils import compose_train, tiny_sft_overrides
from train import train

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # CUDA: on the GPU machine
FAST = ["scheduler=none", "validate_before_training=false", "callbacks.sink_diagnostics=null"]


def _trainable(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if "lora_" in k}


@pytest.fixture()
def device_skips(monkeypatch):
    """Records, per optimizer step, whether the guard let the optimizer skip on the device (no host sync)."""
    seen = []

    def spy(trainer, optimizer):
        seen.append(original(trainer, optimizer))
        return seen[-1]

    original = nonfinite_guard.skips_on_device
    monkeypatch.setattr(nonfinite_guard, "skips_on_device", spy)
    return seen


@pytest.mark.parametrize("fused", [False, True])
def test_nan_gradient_at_step_k_is_skipped_counted_and_weights_stay_finite(
    tmp_path, capsys, fused, device_skips
):
    """foreach AdamW: the host reads the flag and drops the gradients; fused AdamW (CUDA's default, and on CPU
    when asked): the optimizer skips on the device (`found_inf`) and the host counts it a step later."""
    inject = [
        "+callbacks.fault._target_=tests.fault_injection.NonFiniteGradAtSteps",
        "+callbacks.fault.steps=[1]",
    ]
    optimizer = [f"optimizer.fused={str(fused).lower()}"]
    bad_dir, ref_dir = tmp_path / "bad", tmp_path / "ref"
    train(compose_train(tiny_sft_overrides(*FAST, *optimizer, "trainer.max_steps=2", *inject), bad_dir))
    assert "non-finite steps skipped: 1 " in capsys.readouterr().out
    assert device_skips == [fused] * 2  # the last step's flag is counted at the end of training
    train(compose_train(tiny_sft_overrides(*FAST, *optimizer, "trainer.max_steps=1"), ref_dir))
    bad, ref = _trainable(bad_dir), _trainable(ref_dir)
    assert bad and all(torch.isfinite(v).all() for v in bad.values())
    # the skipped step changed nothing (no AdamW moment, step count or weight-decay update): 2 steps, 1 skipped
    # == 1 step
    for key, value in ref.items():
        assert torch.equal(bad[key], value), key


@pytest.mark.parametrize("fused", [False, True])
def test_consecutive_non_finite_losses_stop_the_run_and_write_nothing(tmp_path, fused):
    run_dir = tmp_path / "run"
    cfg = compose_train(
        tiny_sft_overrides(
            *FAST,
            f"optimizer.fused={str(fused).lower()}",
            "trainer.max_steps=4",
            "objective=[decorr]",
            "objective.decorr.weight=nan",  # every loss is NaN
            "callbacks.nonfinite_guard.max_consecutive=2",
        ),
        run_dir,
    )
    with pytest.raises(NonFiniteTrainingError, match=r"2 optimizer steps in a row.*max_consecutive"):
        train(cfg)
    assert not (run_dir / "adapter").exists()
    assert not list(run_dir.rglob("*.ckpt"))


def test_non_finite_checkpoints_and_exports_are_refused():
    guard = NonFiniteGuard()
    guard.on_save_checkpoint(None, None, {"state_dict": {"w": torch.ones(2), "ids": torch.tensor([1, 2])}})
    with pytest.raises(NonFiniteTrainingError, match="checkpoint"):
        guard.on_save_checkpoint(None, None, {"state_dict": {"w": torch.tensor([1.0, float("inf")])}})
    layer = torch.nn.Linear(2, 2)
    check_finite_weights(layer, "the adapter")
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match="refusing to write the adapter.*weight"):
        check_finite_weights(layer, "the adapter")


@pytest.mark.parametrize("device", DEVICES)
def test_device_skip_changes_nothing_and_is_counted_a_step_later(device):
    """The sync-free path at unit level on every device present (on CUDA: the pinned copy and the event):
    a bad step leaves weights, moments and step count as they were; the host counts it at the next step."""
    param = torch.nn.Parameter(torch.ones(4, device=device))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    trainer = SimpleNamespace(world_size=1, precision_plugin=SimpleNamespace(), global_step=0)
    guard = NonFiniteGuard(max_consecutive=2)

    def step(loss: float, grad: float) -> None:
        guard.on_before_backward(trainer, None, torch.tensor(loss, device=device))
        param.grad = torch.full_like(param, grad)
        guard.on_before_optimizer_step(trainer, None, optimizer)
        optimizer.step()
        trainer.global_step += 1

    step(1.0, 1.0)
    weights, state = param.detach().clone(), {k: v.clone() for k, v in optimizer.state[param].items()}
    step(float("nan"), 1.0)  # a non-finite loss
    assert guard.skipped == 0  # not read yet: no host sync in the step
    step(1.0, float("inf"))  # a non-finite gradient; the previous step is counted now
    assert (guard.skipped, guard.consecutive) == (1, 1)
    assert torch.equal(param.detach(), weights)
    assert all(torch.equal(optimizer.state[param][k], v) for k, v in state.items())  # step count too
    with pytest.raises(
        NonFiniteTrainingError, match="2 optimizer steps in a row.*weights are those of step 1"
    ):
        guard.settle()
    step(1.0, 1.0)  # a good step applies
    assert not torch.equal(param.detach(), weights) and optimizer.state[param]["step"].item() == 2
