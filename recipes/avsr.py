"""AVSR fine-tuning (ASR / VSR / AVSR) of a LoRA causal LM fed by Whisper and lip-reading encoders.

The model is `models.avsr.AVSRModel`; this module adds objectives, optimisation, metrics and export, with
the same conventions as `recipes/causal_lm.py` (objectives composed by `recipes/objectives/compose.py`,
optimiser by `recipes/optim.py`). Logged: train/loss, train/loss_ce, train/loss_<objective>[_weighted],
val|test/loss, val|test/wer and val|test/wer_{substitutions,insertions,deletions}, data/skipped_<reason>.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import lightning as L
import torch
from torchmetrics import MeanMetric

from data.avsr.skipped_clips import skip_metrics
from harness.clipping import clip_gradients
from metrics.wer import CorpusWER
from models.attention_capture import disable_capture
from models.avsr.avsr_model import MODALITIES, AVSRModel
from models.fast import mark_training_step
from models.lora import log_parameter_counts, set_trainable
from models.segments import IGNORE_INDEX
from recipes.avsr_export import export_avsr
from recipes.checkpoint import keep_trainable_state
from recipes.llm_setup import prepare_llm
from recipes.objectives.base import Objective
from recipes.objectives.compose import ObjectiveSet, accumulate_grad_batches, micro_batch_step, total_loss
from recipes.optim import configure_optimizers

log = logging.getLogger(__name__)


class AVSRRecipe(L.LightningModule):
    """Args:
    backbone: callable returning (llm, tokenizer) (Hydra `_partial_`, e.g. the SmolLM2 GGUF).
    modality: audio (ASR) | video (VSR) | audiovisual (AVSR); only that modality's encoders are built.
    audio_encoder / video_encoder: callables returning encoders (`output_dim`, forward(x, lengths)).
    audio_projector / video_projector: callables `(input_dim=, output_dim=) -> ModalityProjector`.
    prompt: the task instruction after the modality tokens, or {modality: instruction} (the active one is used);
        delimiters / bos_token: see `AVSRModel`.
    lora: kwargs of `models.lora.apply_lora` or None; trainable: {"freeze": [regex], "unfreeze": [regex]}
        over the whole model's parameter names (`model.llm.`, `model.encoders.video.`, `model.projectors.`).
    objectives: {name: Objective}; optimizer / scheduler: partials; ce_weight: weight of the transcript CE.
    generation: kwargs of `AVSRModel.generate` for validation and test (max_new_tokens, num_beams).
    seed: seeds objective randomness per step.
    kernels / fast: the LLM's `plain` or `fast` path (models/fast.py; plain without CUDA).
    lr_scale: {regex over parameter names: factor} learning-rate multipliers, e.g. {"model.encoders.audio":
        0.05} for a pretrained encoder unfrozen with `audio_encoder.frozen=false` (recipes/optim.py).
    """

    def __init__(
        self,
        backbone: Callable,
        optimizer: Callable,
        prompt: str | Mapping[str, str],
        modality: str = "audiovisual",
        audio_encoder: Callable | None = None,
        video_encoder: Callable | None = None,
        audio_projector: Callable | None = None,
        video_projector: Callable | None = None,
        scheduler: Callable | None = None,
        lora: Mapping | None = None,
        objectives: Mapping[str, Objective] | None = None,
        delimiters: Mapping | None = None,
        bos_token: str | None = None,
        ce_weight: float = 1.0,
        trainable: Mapping | None = None,
        generation: Mapping | None = None,
        gradient_checkpointing: bool = False,
        seed: int = 0,
        kernels: str = "plain",
        fast: Mapping | None = None,
        lr_scale: Mapping[str, float] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(
            ignore=[
                "backbone",
                "optimizer",
                "scheduler",
                "objectives",
                "audio_encoder",
                "video_encoder",
                "audio_projector",
                "video_projector",
            ]
        )
        if modality not in MODALITIES:
            raise ValueError(f"model.modality must be one of {sorted(MODALITIES)}, got {modality!r}")
        self.objectives = ObjectiveSet(objectives)
        if self.objectives.sums_over_tokens:  # LeaF's teacher reads token ids; AVSR inputs are embeddings
            raise ValueError("token-sum objectives (leaf) run with the causal LM recipe, not with AVSR")
        rewriters = [name for name, o in self.objectives.objectives.items() if o.rewrites_token_ids]
        if rewriters:  # MEAP masks input_ids; the AVSR LLM input is embeddings built from audio/video
            raise ValueError(
                f"objective {rewriters} rewrites token-id batches and runs with the causal LM recipe only, "
                "not with AVSR: remove it from `objective` (e.g. objective=[decorr])"
            )
        llm, self.tokenizer = prepare_llm(
            backbone, self.objectives, lora, None, gradient_checkpointing, kernels, fast
        )
        width = llm.config.hidden_size
        parts = {}
        for name, build_encoder, build_projector in (
            ("audio", audio_encoder, audio_projector),
            ("video", video_encoder, video_projector),
        ):
            if name not in MODALITIES[modality]:
                continue
            if build_encoder is None or build_projector is None:
                raise ValueError(f"modality {modality!r} needs `{name}_encoder` and `model.{name}_projector`")
            encoder = build_encoder()
            parts[f"{name}_encoder"] = encoder
            parts[f"{name}_projector"] = build_projector(input_dim=encoder.output_dim, output_dim=width)
        if isinstance(prompt, Mapping):
            if modality not in prompt:
                raise KeyError(f"model.prompt has no entry for modality {modality!r}: {sorted(prompt)}")
            prompt = prompt[modality]
        self.model = AVSRModel(
            llm,
            self.tokenizer,
            modality,
            prompt,
            delimiters=dict(delimiters or {}),
            bos_token=bos_token,
            **parts,
        )
        if trainable:
            set_trainable(self.model, trainable.get("freeze", []), trainable.get("unfreeze", []))
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.lr_scale = dict(lr_scale or {})
        self.ce_weight, self.seed = ce_weight, seed
        self.generation = dict(generation or {"max_new_tokens": 48, "num_beams": 1})
        self.loss_metrics = {"val": MeanMetric(), "test": MeanMetric()}
        self.wer_metrics = {"val": CorpusWER(), "test": CorpusWER()}
        for stage in ("val", "test"):  # registered, so they move with the module and sync across ranks
            self.add_module(f"{stage}_loss", self.loss_metrics[stage])
            self.add_module(f"{stage}_wer", self.wer_metrics[stage])
        self.examples: list[tuple[str, str]] = []
        self.strict_loading = False  # checkpoints hold only the trainable weights
        log_parameter_counts(self.model)

    @property
    def llm(self) -> torch.nn.Module:
        """The (PEFT-wrapped) causal LM (diagnostics contract)."""
        return self.model.llm

    # ---- steps -----------------------------------------------------------------------------------
    def _log_skipped(self, batch: dict) -> None:
        for name, count in skip_metrics(batch.get("skipped") or {}).items():
            self.log(
                name,
                float(count),
                reduce_fx="sum",
                on_step=False,
                on_epoch=True,
                batch_size=1,
                sync_dist=True,
            )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        mark_training_step()
        self._log_skipped(batch)
        if not batch["text"]:  # every clip of this batch was skipped: a zero loss keeps DDP ranks in step
            return sum(p.reshape(-1)[0] * 0.0 for p in self.parameters() if p.requires_grad)
        key = micro_batch_step(self.global_step, batch_idx, accumulate_grad_batches(self._trainer))
        batch = self.objectives.transform_batch(batch, key, self.seed)
        packed = self.model.build_inputs(batch)
        context_batch = {
            **batch,
            "attention_mask": packed.attention_mask,
            "labels": packed.labels,
            "segments": packed.segments,
        }
        inputs = {**packed.llm_inputs(with_labels=True), "use_cache": False}
        outputs, ctx = self.objectives.forward(
            self.llm, inputs, context_batch, self.global_step, sample_key=key
        )
        total, logs = total_loss(outputs.loss, self.objectives.losses(ctx), self.ce_weight)
        batch_size = len(batch["text"])
        self.log("train/loss", logs.pop("loss"), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch_size)
        return total

    def _evaluate(self, batch: dict, stage: str) -> None:
        self._log_skipped(batch)
        if not batch["text"]:
            return
        packed = self.model.build_inputs(batch)
        outputs = self.llm(**packed.llm_inputs(with_labels=True), use_cache=False)
        self.loss_metrics[stage].update(
            outputs.loss.detach(), weight=(packed.labels[:, 1:] != IGNORE_INDEX).sum()
        )
        hypotheses = self.model.generate(batch, **self.generation)
        self.wer_metrics[stage].update(hypotheses, batch["text"])
        self.examples.extend(list(zip(batch["text"], hypotheses))[: max(0, 3 - len(self.examples))])

    def _log_epoch(self, stage: str) -> None:
        loss, wer = self.loss_metrics[stage].compute(), self.wer_metrics[stage].compute()
        self.loss_metrics[stage].reset()
        self.wer_metrics[stage].reset()
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{stage}/wer", wer["wer"], prog_bar=True, sync_dist=False)
        for part in ("substitutions", "insertions", "deletions"):
            self.log(f"{stage}/wer_{part}", wer[part], sync_dist=False)
        for reference, hypothesis in self.examples:
            log.info("%s example  ref: %s\n%s example  hyp: %s", stage, reference, stage, hypothesis)
        self.examples.clear()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        return configure_optimizers(
            self, self.optimizer_factory, self.scheduler_factory, lr_scale=self.lr_scale
        )

    # ---- checkpoints: only what trains -----------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep_trainable_state(checkpoint, self.model, "model.")

    # ---- diagnostics contract (diagnostics/callback.py) ------------------------------------------
    @torch.no_grad()
    def sink_probe_inputs(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """Teacher-forced LLM inputs (inputs_embeds, attention_mask) and segment ids [B,T] of a batch."""
        packed = self.model.build_inputs(batch)
        return packed.llm_inputs(), packed.segments

    # ---- export ----------------------------------------------------------------------------------
    def export(
        self, run_dir: str | Path, merged: bool = False, state_dict: dict | None = None
    ) -> dict[str, str]:
        """`adapter/` (PEFT, loadable by PeftModel.from_pretrained) + `avsr_modules.pt` (projectors, trained
        encoders, model settings); `merged/` with the LoRA merged into the LLM when asked.
        state_dict: trainable weights gathered under FSDP (`harness/fsdp.py`); None reads the module."""
        disable_capture(self.llm)
        return export_avsr(self.model, self.hparams, run_dir, merged, state_dict)
