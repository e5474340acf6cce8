"""AVSR recipe: one smoke training run per modality, objective wiring, diagnostics contract, export."""

import functools
import math

import lightning as L
import pytest
import torch
from peft import PeftModel
from torch.utils.data import DataLoader

from models import segments as seg
from models.avsr.projector import ModalityProjector
from models.avsr.tiny import build_tiny_video_encoder, build_tiny_whisper_encoder
from models.causal_lm import build_tiny_llama
from recipes.avsr import AVSRRecipe
from recipes.objectives.base import Objective, ObjectiveContext

SPECIAL = {"eos_token": "<|im_end|>"}
TEXTS = ["go forward ten meters", "turn left", "stop here now", "say hello"]


class ContractProbe(Objective):
    """Records what the recipe hands to objectives; its loss is a differentiable function of layer 1."""

    name = "probe"
    needs_hidden_states = True

    def __init__(self, weight: float = 0.5):
        super().__init__(weight)
        self.seen: list[ObjectiveContext] = []

    def attention_layers(self, num_layers: int) -> list[int]:
        return [num_layers - 1]

    def loss(self, ctx: ObjectiveContext) -> torch.Tensor:
        self.seen.append(ctx)
        hidden = ctx.hidden_states[1]
        mask = ctx.batch["segments"] != seg.PAD
        return (hidden[mask] ** 2).mean() * 1e-3


def make_batches(modality: str, count: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(count):
        frames = torch.tensor([10, 6])
        batch = {
            "text": [TEXTS[(2 * i) % 4], TEXTS[(2 * i + 1) % 4]],
            "ids": [f"{i}a", f"{i}b"],
            "skipped": {"too_long": 1 if i == 0 else 0, "unreadable": 0},
        }
        if modality in ("audio", "audiovisual"):
            batch["audio"] = (
                0.1 * torch.randn(2, 6400, generator=g) * (torch.arange(6400) < frames[:, None] * 640)
            )
            batch["audio_lengths"] = frames * 640
        if modality in ("video", "audiovisual"):
            video = torch.randn(2, 10, 1, 88, 88, generator=g)
            video[1, 6:] = 0
            batch["video"], batch["video_lengths"] = video, frames
        batches.append(batch)
    return batches


def build_recipe(modality: str, objectives=None) -> AVSRRecipe:
    return AVSRRecipe(
        backbone=functools.partial(build_tiny_llama, special_tokens=SPECIAL),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        prompt="Transcribe:",
        modality=modality,
        audio_encoder=functools.partial(build_tiny_whisper_encoder, true_length=True),
        video_encoder=functools.partial(build_tiny_video_encoder),
        audio_projector=functools.partial(ModalityProjector, rate=4),
        video_projector=functools.partial(ModalityProjector, rate=2, compression="avg_pool"),
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        objectives=objectives,
        generation={"max_new_tokens": 5, "num_beams": 1},
        seed=0,
    )


def fit(recipe: AVSRRecipe, modality: str, steps: int = 3) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        inference_mode=False,
    )
    trainer.fit(
        recipe,
        DataLoader(make_batches(modality, steps), batch_size=None),
        DataLoader(make_batches(modality, 1, seed=1), batch_size=None),
    )
    return trainer


@pytest.mark.parametrize("modality", ["audio", "video", "audiovisual"])
def test_smoke_training_per_modality_gives_finite_losses_and_wer(modality):
    probe = ContractProbe()
    recipe = build_recipe(modality, {"probe": probe})
    lora_before = {n: p.detach().clone() for n, p in recipe.llm.named_parameters() if "lora_B" in n}
    trainer = fit(recipe, modality)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/loss_ce", "train/loss_probe", "train/loss_probe_weighted", "val/loss"):
        assert math.isfinite(float(metrics[key])), key
    torch.testing.assert_close(metrics["train/loss_probe_weighted"], 0.5 * metrics["train/loss_probe"])
    wer = float(metrics["val/wer"])
    assert wer >= 0 and math.isclose(
        wer,
        sum(float(metrics[f"val/wer_{p}"]) for p in ("substitutions", "insertions", "deletions")),
        abs_tol=1e-6,
    )
    assert float(metrics["data/skipped_too_long"]) == 1
    assert any(
        not torch.equal(p, lora_before[n]) for n, p in recipe.llm.named_parameters() if n in lora_before
    )
    ctx = probe.seen[-1]
    segments = ctx.batch["segments"]
    assert ctx.hidden_states is not None and list(ctx.attention) == [1]  # tiny Llama: 2 layers
    assert segments.shape == ctx.batch["labels"].shape == ctx.logits.shape[:2]
    assert torch.equal(ctx.batch["attention_mask"], (segments != seg.PAD).long())
    present = set(segments.unique().tolist())
    assert (seg.AUDIO in present) == (modality != "video") and (seg.VIDEO in present) == (modality != "audio")
    assert (ctx.batch["labels"][segments != seg.TARGET] == -100).all()


def test_test_stage_logs_corpus_wer_and_encoders_follow_their_frozen_flags():
    recipe = build_recipe("audiovisual")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, inference_mode=False)
    trainer.test(recipe, DataLoader(make_batches("audiovisual", 1), batch_size=None), verbose=False)
    assert "test/wer" in trainer.callback_metrics and "test/wer_deletions" in trainer.callback_metrics
    assert not any(p.requires_grad for p in recipe.model.encoders["audio"].parameters())  # Whisper frozen
    assert all(p.requires_grad for p in recipe.model.encoders["video"].parameters())


def test_sink_probe_inputs_and_export_round_trip(tmp_path):
    recipe = build_recipe("audiovisual").eval()
    batch = make_batches("audiovisual", 1)[0]
    inputs, segments = recipe.sink_probe_inputs(batch)
    assert (
        set(inputs) == {"inputs_embeds", "attention_mask"}
        and segments.shape == inputs["attention_mask"].shape
    )
    assert (segments[:, 0] == seg.BOS).all()
    with torch.no_grad():
        for name, p in recipe.llm.named_parameters():
            if "lora_B" in name:
                p.normal_()
        expected = recipe.llm(**inputs).logits
    paths = recipe.export(tmp_path)
    base, _ = build_tiny_llama(special_tokens=SPECIAL)
    reloaded = PeftModel.from_pretrained(base, paths["adapter"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected)
    saved = torch.load(paths["avsr_modules"], weights_only=True)
    keys = set(saved["state_dict"])
    assert any(k.startswith("projectors.audio.") for k in keys) and any(
        k.startswith("encoders.video.") for k in keys
    )
    assert not any(
        k.startswith(("llm.", "encoders.audio.")) for k in keys
    )  # adapter separate, Whisper frozen
    assert any(k.endswith("running_mean") for k in keys) and saved["settings"]["modality"] == "audiovisual"
    fresh = build_recipe("audiovisual")
    missing, unexpected = fresh.model.load_state_dict(saved["state_dict"], strict=False)
    assert not unexpected
    empty = fresh.training_step({"text": [], "ids": [], "skipped": {"too_long": 2}}, 0)  # all clips skipped
    empty.backward()
    assert float(empty) == 0 and all(p.grad is not None for p in fresh.parameters() if p.requires_grad)


def test_avsr_rejects_leaf_with_a_clear_error():
    from recipes.objectives.leaf import LeafDistillationObjective

    teacher = build_tiny_llama(special_tokens=SPECIAL)
    with pytest.raises(ValueError, match="causal LM recipe"):
        build_recipe("audio", {"leaf": LeafDistillationObjective(teacher=teacher, teacher_dtype="fp32")})


def test_avsr_rejects_meap_with_a_clear_error():
    """objective=[meap] on an AVSR experiment: refused at start-up, naming the option (was a KeyError)."""
    from recipes.objectives.meap import MeapObjective

    with pytest.raises(ValueError, match=r"\['meap'\] rewrites token-id batches.*remove it from `objective`"):
        build_recipe("audio", {"meap": MeapObjective(mode="sft")})


def test_measuring_sinks_does_not_change_the_model(tmp_path):
    """The probe runs the AVSR encoders too: in eval mode, with BatchNorm statistics untouched and every
    submodule's train/eval flag restored."""
    from types import SimpleNamespace

    from diagnostics.callback import SinkDiagnosticsCallback

    recipe = build_recipe("audiovisual")
    recipe.train()
    recipe.model.encoders["audio"].eval()  # a frozen encoder stays in eval mode after the probe
    modes = {name: m.training for name, m in recipe.named_modules()}
    stats = {k: v.clone() for k, v in recipe.state_dict().items() if "running_" in k or "num_batches" in k}
    assert stats, "the tiny video encoder has BatchNorm layers"
    callback = SinkDiagnosticsCallback(every_n_steps=0, plots=False, output_dir=str(tmp_path))
    callback.probe_batch = make_batches("audiovisual", 1)[0]
    trainer = SimpleNamespace(global_step=0, is_global_zero=False)
    callback.measure(trainer, recipe)
    after = recipe.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items())
    assert {name: m.training for name, m in recipe.named_modules()} == modes
