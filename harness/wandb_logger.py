"""A W&B logger that never hangs or crashes a run: offline unless an API key is configured."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def make_wandb_logger(
    project: str,
    save_dir: str,
    run_id: str,
    group: str | None = None,
    tags: list[str] | None = None,
    mode: str = "auto",
    name: str | None = None,
    **kwargs,
):
    """Build `lightning.pytorch.loggers.WandbLogger`.

    mode: auto (WANDB_MODE if set, else online when credentials exist, offline otherwise), online,
        offline, disabled.
    The run id equals the run folder key with `resume="allow"`, so a requeued job continues its W&B run;
    offline runs are uploaded later with `wandb sync <save_dir>/wandb/offline-run-*`.
    """
    from lightning.pytorch.loggers import WandbLogger

    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")
        if mode == "offline":
            log.info("W&B: no API key found, logging offline to %s (sync later with `wandb sync`)", save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
    return WandbLogger(
        project=project,
        save_dir=save_dir,
        id=run_id,
        name=name or run_id,
        group=group,
        tags=list(tags or []),
        mode=mode,
        resume="allow",
        **kwargs,
    )
