"""Train: Hydra composes `conf/`, every object comes from `hydra.utils.instantiate`.

python train.py experiment=avsr_decorr
python train.py experiment=lm_sft objective=[decorr,adl] trainer=gpu
python train.py experiment=lm_decorr debug=smoke
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from harness.config_check import check_top_level_keys
from harness.fsdp import gather_trainable_state
from harness.instantiate import instantiate_named
from harness.nonfinite_guard import check_finite_weights
from harness.resume import newest_checkpoint
from harness.run_dir import register_resolvers
from harness.summary import TrainLossHistory, summary_lines
from harness.test_checkpoint import resolve_test_checkpoint

log = logging.getLogger("unsink.train")
register_resolvers()


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    if ckpt_path in (None, "", "none"):
        return None
    if ckpt_path == "auto":  # the highest global step among requeue, step and last checkpoints
        newest = newest_checkpoint(run_dir)
        return str(newest) if newest is not None else None
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} does not exist (config key `ckpt_path`)")
    return ckpt_path


def train(cfg: DictConfig) -> dict:
    """Fit, validate before/after, export, print the summary; W&B is always finished, even on errors."""
    try:
        return _train(cfg)
    finally:
        _finish_wandb()


def _train(cfg: DictConfig) -> dict:
    check_top_level_keys(cfg)
    run_dir = Path(cfg.paths.run_dir)
    L.seed_everything(cfg.seed, workers=True)
    objectives = instantiate_named(cfg.get("objective"), skip_unselected=True)
    # plain containers (not DictConfig) so checkpoints load with torch.load(weights_only=True)
    module = instantiate(cfg.model, objectives=objectives, _convert_="all")
    datamodule = instantiate(cfg.data)
    if hasattr(datamodule, "connect_tokenizer"):
        datamodule.connect_tokenizer(module.tokenizer)
    loggers = list(instantiate_named(cfg.get("logger")).values())
    callbacks = instantiate_named(cfg.get("callbacks"))
    history = TrainLossHistory()
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[*callbacks.values(), history])
    if trainer.is_global_zero:
        for lg in loggers:
            if hasattr(lg, "log_hyperparams"):
                lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    before = {}
    if cfg.get("validate_before_training") and ckpt_path is None:
        before = _metrics(trainer.validate(module, datamodule=datamodule, verbose=False))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    # the weights scored after training (and exported): the last, or the best by validation (test_checkpoint)
    scored, scored_line = None, ""
    if cfg.get("test_after_training"):
        scored, scored_line = resolve_test_checkpoint(cfg.get("test_checkpoint", "last"), callbacks.values())
    after = _metrics(trainer.validate(module, datamodule=datamodule, ckpt_path=scored, verbose=False))
    if cfg.get("test_after_training"):
        after.update(_metrics(trainer.test(module, datamodule=datamodule, ckpt_path=scored, verbose=False)))
    check_finite_weights(module, "the exported weights", trainer.strategy)  # harness/nonfinite_guard.py
    gathered = gather_trainable_state(trainer, module)  # FSDP: a collective, before rank 0 exports alone
    if trainer.is_global_zero:
        exported = module.export(run_dir, merged=cfg.get("export_merged", False), state_dict=gathered)
        extra = [f"exported: {', '.join(f'{k} -> {v}' for k, v in exported.items())}"]
        extra += [scored_line] if scored_line else []
        for part in (datamodule, module, *callbacks.values()):
            if hasattr(part, "summary_lines"):
                extra.extend(part.summary_lines())
        lines = summary_lines(before, after, history, str(run_dir), trainer, extra)
        write_results(run_dir / "results.json", before, after, trainer.global_step, history, scored)
        _finish_wandb()  # its own closing report would otherwise bury ours
        print("\n".join(lines), flush=True)
    return after


def write_results(
    path: Path, before: dict, after: dict, step: int, history: TrainLossHistory, scored: str | None = None
) -> None:
    """Machine-readable end of run (studies read it; its presence marks a finished run). `scored`: the
    checkpoint `after` was measured on (test_checkpoint=best), None for the last weights."""
    payload = {
        "step": int(step),
        "scored_checkpoint": scored,
        "before": before,
        "after": after,
        "train_loss_first": history.first,
        "train_loss_last": history.last,
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _metrics(results: list[dict]) -> dict:
    merged = {}
    for result in results or []:
        merged.update({k: float(v) for k, v in result.items()})
    return merged


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


def _finish_wandb() -> None:
    """W&B merges runs unless each finishes; never let a logging problem mask the real error."""
    try:
        import wandb
    except ImportError:  # W&B not installed: nothing to finish
        return
    try:
        if wandb.run is not None:
            wandb.finish()
    except Exception as err:  # noqa: BLE001
        log.warning("wandb.finish() failed: %s", err)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
