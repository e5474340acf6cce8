"""`${if_gpu:...}`: the demo command keeps its CPU numbers on CPU and scales up where a GPU runs it."""

import pytest
import torch
from omegaconf import OmegaConf

from harness.gpu_resolver import gpu_if_available, if_gpu
from tests.hydra_utils import compose_train


def _demo(*overrides: str) -> dict:
    cfg = compose_train(["experiment=avsr_decorr", *overrides])
    return {
        "trainer.accelerator": cfg.trainer.accelerator,
        "trainer.max_steps": cfg.trainer.max_steps,
        "trainer.precision": cfg.trainer.precision,
        "data.max_frames": cfg.data.max_frames,
        "data.prepare.num_train": cfg.data.prepare.num_train,
        "scheduler.warmup_steps": cfg.scheduler.warmup_steps,
        "data.audio_time_mask_window": cfg.data.audio_time_mask_window,
        "objective.decorr.start_step": cfg.objective.decorr.start_step,
        "objective.decorr.warmup_steps": cfg.objective.decorr.warmup_steps,
        "model.kernels": cfg.model.kernels,
        "peft.r": cfg.peft.r,
        "peft.target_modules": cfg.peft.target_modules,
    }


def test_if_gpu_follows_the_accelerator(monkeypatch):
    assert if_gpu("gpu", "big", "small") == "big" and if_gpu("cuda", 1, 0) == 1
    assert if_gpu("cpu", "big", "small") == "small"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert if_gpu("auto", "big", "small") == "big"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert if_gpu("auto", "big", "small") == "small" and gpu_if_available() == "cpu"


@pytest.mark.parametrize("accelerator", ["cpu", "gpu"])
def test_a_list_valued_branch_survives_resolve(accelerator):
    """The demo's LoRA targets are a list on CPU and a string on a GPU; Hydra's instantiate calls
    OmegaConf.resolve, which failed on a plain list coming back from the resolver."""
    cfg = OmegaConf.create(
        {"acc": accelerator, "peft": {"targets": "${if_gpu:${acc},all-linear,[q_proj,v_proj]}"}}
    )
    OmegaConf.resolve(cfg)
    expected = "all-linear" if accelerator == "gpu" else ["q_proj", "v_proj"]
    assert OmegaConf.to_container(cfg.peft)["targets"] == expected


@pytest.mark.parametrize("cuda", [False, True])
def test_demo_keeps_cpu_numbers_and_scales_up_on_a_gpu(cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    demo = _demo()
    cpu = {"trainer.max_steps": 80, "trainer.precision": "32-true", "data.max_frames": 400,
           "data.prepare.num_train": 200, "scheduler.warmup_steps": 5, "trainer.accelerator": "cpu",
           "data.audio_time_mask_window": 6400, "objective.decorr.start_step": 0,
           "objective.decorr.warmup_steps": 0, "model.kernels": "plain",
           "peft.r": 8, "peft.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}  # fmt: skip
    if not cuda:
        assert demo == cpu
    else:
        assert demo["trainer.precision"] == "bf16-mixed" and demo["trainer.accelerator"] == "gpu"
        assert demo["data.audio_time_mask_window"] == 0  # study 2's val tuning: masking off
        # study 2: the loss from step 0 delays reading the audio by ~500 steps; the GPU demo starts it at 500
        assert demo["objective.decorr.start_step"] == 500 and demo["objective.decorr.warmup_steps"] == 100
        assert demo["model.kernels"] == "fast" and demo["peft.target_modules"] == "all-linear"
        # the ninth session's GPU demo memorised 3,000 clips of the 81 built-in sentences: more clips now
        assert demo["data.prepare.num_train"] >= 10_000
        same_kind = (
            "trainer.precision",
            "trainer.accelerator",
            "data.audio_time_mask_window",
            "model.kernels",
            "peft.target_modules",
        )
        assert all(demo[key] > cpu[key] for key in cpu if key not in same_kind)
        assert _demo("trainer.accelerator=cpu") == cpu  # forcing the CPU gives the CPU demo back
