"""A W&B logger that never hangs or crashes a run: offline unless an API key is configured, and offline
(with one warning) when going online fails, e.g. a key on a compute node without network."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class OfflineFallbackWandbLogger(WandbLogger):
    """`wandb.init` failing online (no network, server down, bad key) starts the run offline instead; failing
    offline too, W&B is disabled for the run. One warning each time; training goes on."""

    FALLBACK = {"online": "offline", "offline": "disabled"}

    @property
    def experiment(self):
        start = WandbLogger.experiment.fget  # Lightning's (rank-zero only, dummy elsewhere)
        while True:
            try:
                return start(self)
            except Exception as err:  # noqa: BLE001  (W&B must never stop training)
                mode = self._wandb_init.get("mode")
                fallback = self.FALLBACK.get(mode)
                if fallback is None:
                    raise
                first_line = (str(err).splitlines() or [""])[0][:200]
                hint = (
                    " (upload later: `wandb sync <run>/wandb/offline-run-*`)" if fallback == "offline" else ""
                )
                log.warning(
                    "W&B %s start failed (%s: %s); logging %s%s",
                    mode,
                    type(err).__name__,
                    first_line,
                    fallback,
                    hint,
                )
                _abandon_current_run()
                self._experiment = None
                self._wandb_init["mode"] = fallback


def _abandon_current_run() -> None:
    """Drop a half-started run (its id stays taken in W&B's service process) so the next `wandb.init` can
    start the same id afresh."""
    import wandb

    try:
        if wandb.run is not None:
            wandb.finish(exit_code=1)
        wandb.teardown()
    except Exception as err:  # noqa: BLE001
        log.debug("W&B clean-up after a failed start: %s", err)


def make_wandb_logger(
    project: str,
    save_dir: str,
    run_id: str,
    group: str | None = None,
    tags: list[str] | None = None,
    mode: str = "auto",
    name: str | None = None,
    init_timeout: float = 30.0,
    **kwargs,
) -> OfflineFallbackWandbLogger:
    """Build the W&B logger.

    mode: auto (WANDB_MODE if set, else online when credentials exist, offline otherwise), online,
        offline, disabled.
    init_timeout: seconds `wandb.init` waits for the server before the run falls back to offline.
    The run id equals the run folder key with `resume="allow"`, so a requeued job continues its W&B run;
    offline runs are uploaded later with `wandb sync <save_dir>/wandb/offline-run-*`.
    """
    try:
        import wandb
    except ImportError as err:  # e.g. a GPU image without it: say what to do instead of a bare import error
        raise ImportError(
            "the W&B logger needs the wandb package (`make setup` installs it); without it, run with "
            "logger=csv (CSV metrics only) or logger=none"
        ) from err

    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if has_wandb_credentials() else "offline")
        if mode == "offline":
            log.info("W&B: no API key found, logging offline to %s (sync later with `wandb sync`)", save_dir)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    settings = kwargs.pop("settings", None) or wandb.Settings(init_timeout=init_timeout)
    return OfflineFallbackWandbLogger(
        project=project,
        save_dir=save_dir,
        id=run_id,
        name=name or run_id,
        group=group,
        tags=list(tags or []),
        mode=mode,
        resume="allow",
        settings=settings,
        **kwargs,
    )
