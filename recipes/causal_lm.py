"""LoRA fine-tuning of a causal LM with composable sink-mitigating objectives."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import lightning as L
import torch
from torchmetrics import MeanMetric

from harness.clipping import clip_gradients
from models import segments as seg
from models.attention_capture import disable_capture
from models.fast import mark_training_step
from models.lora import log_parameter_counts
from models.output_vocabulary import tied_for_saving
from models.packing import check_packing, llm_inputs
from models.segments import IGNORE_INDEX
from recipes.checkpoint import gathered_part, keep_trainable_state
from recipes.llm_setup import prepare_llm
from recipes.objectives.base import Objective
from recipes.objectives.compose import ObjectiveSet, accumulate_grad_batches, micro_batch_step, total_loss
from recipes.objectives.window import WindowTokenNormaliser
from recipes.optim import configure_optimizers

log = logging.getLogger(__name__)


class CausalLMRecipe(L.LightningModule):
    """Args:
    backbone: callable returning (model, tokenizer) (a Hydra `_partial_` node, e.g. the SmolLM2 GGUF).
    lora: kwargs of `models.lora.apply_lora`, or None for full fine-tuning of what `trainable` allows.
    objectives: {name: Objective} from `conf/objective/` (empty = plain CE).
    optimizer / scheduler: partials (`torch.optim.AdamW`, `recipes.optim.warmup_cosine`).
    ce_weight: weight of the next-token CE (0 for pure distillation, e.g. LeaF).
    trainable: {"freeze": [regex], "unfreeze": [regex]} applied after LoRA.
    gradient_checkpointing: trade compute for activation memory.
    seed: seeds objective randomness per step (MEAP masks, ADL row samples), so resumes match.
    kernels / fast: `plain` (HF + PEFT) or `fast` (models/fast.py, settings in `fast`; plain without CUDA).
    """

    def __init__(
        self,
        backbone: Callable,
        optimizer: Callable,
        scheduler: Callable | None = None,
        lora: Mapping | None = None,
        objectives: Mapping[str, Objective] | None = None,
        ce_weight: float = 1.0,
        trainable: Mapping | None = None,
        gradient_checkpointing: bool = False,
        seed: int = 0,
        kernels: str = "plain",
        fast: Mapping | None = None,
        flat_params: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler", "objectives"])
        self.objectives = ObjectiveSet(objectives)
        self.llm, self.tokenizer = prepare_llm(
            backbone, self.objectives, lora, trainable, gradient_checkpointing, kernels, fast
        )
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.use_flat_params, self.flat_params = flat_params, None
        self.ce_weight, self.seed = ce_weight, seed
        self.token_sum = self.objectives.sums_over_tokens
        self.window = WindowTokenNormaliser()
        self.val_loss = MeanMetric()
        self.strict_loading = False  # checkpoints hold only the trainable weights
        log_parameter_counts(self.llm)

    # ---- steps -----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        mark_training_step()
        check_packing(batch, self.objectives.objectives)
        key = micro_batch_step(self.global_step, batch_idx, accumulate_grad_batches(self._trainer))
        batch = self.objectives.transform_batch(batch, key, self.seed)
        inputs = llm_inputs(batch)
        outputs, ctx = self.objectives.forward(self.llm, inputs, batch, self.global_step, sample_key=key)
        losses = self.objectives.losses(ctx)
        batch_size = batch["input_ids"].shape[0]
        if self.token_sum:
            return self._token_sum_step(outputs.loss, losses, batch, batch_size)
        total, logs = total_loss(outputs.loss, losses, self.ce_weight)
        self.log("train/loss", logs.pop("loss"), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch_size)
        return total

    def _token_sum_step(self, ce_mean, losses, batch, batch_size):
        """CE and token-sum objectives as sums; gradients normalised per window in on_before_optimizer_step."""
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        total, logs = total_loss(ce_mean * tokens, losses, self.ce_weight)
        per_token = {k: v / tokens.clamp_min(1) for k, v in logs.items()}
        self.log("train/loss", per_token.pop("loss"), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in per_token.items()}, batch_size=batch_size)
        trainer = self._trainer
        accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
        ranks = trainer.world_size if trainer is not None else 1
        return self.window.scale(total, tokens, accumulate, ranks)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.token_sum:
            self.window.apply(p for group in optimizer.param_groups for p in group["params"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        outputs = self.llm(**llm_inputs(batch))
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        self.val_loss.update(outputs.loss.detach(), weight=tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # token-weighted, synced across ranks
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/perplexity", torch.exp(loss.clamp(max=30)), sync_dist=False)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        return configure_optimizers(
            self, self.optimizer_factory, self.scheduler_factory, flat=self.use_flat_params
        )

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if self.flat_params is not None:  # zero the flat gradient buffer in place, keep the views
            self.flat_params.zero_grad()
        else:
            optimizer.zero_grad()

    # ---- checkpoints: only trainable weights ------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep_trainable_state(checkpoint, self.llm, "llm.")

    # ---- diagnostics contract (diagnostics/callback.py) ------------------------------------------
    def sink_probe_inputs(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """LLM inputs and segment ids [B,T] (BOS / PROMPT / TARGET / PAD) for one validation batch."""
        mask = batch["attention_mask"].bool()
        segments = torch.where(batch["labels"] != IGNORE_INDEX, seg.TARGET, seg.PROMPT)
        segments = torch.where(mask, segments, torch.full_like(segments, seg.PAD))
        segments[:, 0] = torch.where(mask[:, 0], seg.BOS, seg.PAD)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, segments

    # ---- export ----------------------------------------------------------------------------------
    def export(
        self, run_dir: str | Path, merged: bool = False, state_dict: dict | None = None
    ) -> dict[str, str]:
        """Save the adapter in PEFT format (`adapter/`), the tokenizer, and optionally a merged model (a full
        model with an input-only `[MASK]` is saved tied: models/output_vocabulary.py, tied_for_saving).
        state_dict: trainable weights gathered under FSDP (`harness/fsdp.py`); None reads the module."""
        run_dir = Path(run_dir)
        disable_capture(self.llm)
        llm_state = gathered_part(state_dict, "llm.", merged, hasattr(self.llm, "peft_config"))
        paths = {}
        if hasattr(self.llm, "peft_config"):
            self.llm.save_pretrained(run_dir / "adapter", state_dict=llm_state)
            self.tokenizer.save_pretrained(run_dir / "adapter")
            paths["adapter"] = str(run_dir / "adapter")
            if merged:
                with tied_for_saving(self.llm.merge_and_unload()) as merged_model:
                    merged_model.save_pretrained(run_dir / "merged")
                self.tokenizer.save_pretrained(run_dir / "merged")
                paths["merged"] = str(run_dir / "merged")
        else:
            with tied_for_saving(self.llm):
                self.llm.save_pretrained(run_dir / "model")
            self.tokenizer.save_pretrained(run_dir / "model")
            paths["model"] = str(run_dir / "model")
        return paths
