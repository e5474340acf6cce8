"""model.lr_scale: learning-rate multipliers by parameter name (an unfrozen Whisper trained slower)."""

import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from models.avsr.projector import ModalityProjector
from models.avsr.tiny import build_tiny_whisper_encoder
from models.causal_lm import build_tiny_llama
from recipes.avsr import AVSRRecipe
from recipes.optim import scaled_param_groups
from tests.hydra_utils import compose_train
from tests.test_avsr_recipe import SPECIAL, make_batches


def _asr_recipe(lr_scale, frozen=False):
    return AVSRRecipe(
        backbone=functools.partial(build_tiny_llama, special_tokens=SPECIAL),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        prompt="Transcribe:",
        modality="audio",
        audio_encoder=functools.partial(build_tiny_whisper_encoder, true_length=True, frozen=frozen),
        audio_projector=functools.partial(ModalityProjector, rate=4),
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        generation={"max_new_tokens": 3, "num_beams": 1},
        lr_scale=lr_scale,
    )


def test_groups_take_the_first_matching_pattern_and_refuse_typos_and_zero():
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    named = [("model.encoders.audio.w", a), ("model.projectors.audio.w", b), ("model.llm.lora_A", c)]
    groups = scaled_param_groups(named, 1e-3, {"encoders\\.audio": 0.05, "projectors": 2.0})
    by_lr = sorted((g["lr"], g["params"]) for g in groups)
    assert [lr for lr, _ in by_lr] == pytest.approx([5e-5, 1e-3, 2e-3])
    assert [params for _, params in by_lr] == [[a], [c], [b]]
    with pytest.raises(ValueError, match=r"\['encoder\\\\.vidoe'\] match no trainable parameter"):
        scaled_param_groups(named, 1e-3, {"encoder\\.vidoe": 0.1})
    with pytest.raises(ValueError, match="must be > 0"):
        scaled_param_groups(named, 1e-3, {"encoders": 0.0})


def test_an_unfrozen_whisper_trains_at_its_scaled_rate_through_the_recipe():
    recipe = _asr_recipe({"model.encoders.audio": 0.05})
    # frozen=false: Whisper trains (all but its fixed sinusoidal positions, which HF keeps frozen)
    encoder = [p for p in recipe.model.encoders["audio"].parameters() if p.requires_grad]
    assert len(encoder) > 10
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, inference_mode=False)  # fmt: skip
    before = [p.detach().clone() for p in encoder]
    trainer.fit(recipe, DataLoader(make_batches("audio", 2), batch_size=None))
    groups = trainer.optimizers[0].param_groups
    encoder_ids = {id(p) for p in encoder}
    slow = [g for g in groups if {id(p) for p in g["params"]} == encoder_ids]
    assert len(groups) == 2 and len(slow) == 1
    assert slow[0]["lr"] == pytest.approx(5e-5)  # 0.05 x optimizer.lr (a schedule would scale both alike)
    assert any(not torch.equal(b, p) for b, p in zip(before, encoder))  # the encoder moved


def test_lr_scale_needs_separate_groups_and_the_configured_lr():
    recipe = _asr_recipe({"model.encoders.audio": 0.05})
    recipe.optimizer_factory = functools.partial(torch.optim.AdamW)  # no lr in the config
    with pytest.raises(ValueError, match="optimizer.lr"):
        recipe.configure_optimizers()


def test_the_command_line_form_composes():
    cfg = compose_train(["experiment=asr_study", "audio_encoder.frozen=false",
                         "model.lr_scale={model.encoders.audio:0.05}"])  # fmt: skip
    assert dict(cfg.model.lr_scale) == {"model.encoders.audio": 0.05} and cfg.audio_encoder.frozen is False
    assert compose_train(["experiment=asr_study"]).model.lr_scale is None  # one learning rate by default
