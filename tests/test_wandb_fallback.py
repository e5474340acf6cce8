"""W&B with an API key but no network: one warning, offline logging, training finishes; without the wandb
package: an error that names the loggers that run without it."""

from __future__ import annotations

import logging
import socket
import sys

import pytest

from harness.wandb_logger import make_wandb_logger
from tests.hydra_utils import compose_train, tiny_sft_overrides
from train import _finish_wandb, train


def _refused_port() -> int:
    with socket.socket() as sock:  # a port nothing listens on: connections are refused at once
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_wandb_with_a_key_falls_back_to_offline_and_training_finishes(
    tmp_path, monkeypatch, caplog, capsys
):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_refused_port()}")
    run_dir = tmp_path / "run"
    cfg = compose_train(
        tiny_sft_overrides(
            "trainer.max_steps=2",
            "logger=many",
            "logger.wandb.init_timeout=2",
            "validate_before_training=false",
            "callbacks.sink_diagnostics=null",
        ),
        run_dir,
    )
    assert cfg.logger.wandb.mode == "auto"  # online, since a key is set
    try:
        with caplog.at_level(logging.WARNING, logger="harness.wandb_logger"):
            train(cfg)
    finally:
        _finish_wandb()
    assert "unsink run summary" in capsys.readouterr().out
    warnings = [r.getMessage() for r in caplog.records if r.name == "harness.wandb_logger"]
    assert len(warnings) == 1 and "online start failed" in warnings[0] and "offline" in warnings[0]
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))
    assert (run_dir / "adapter" / "adapter_config.json").exists()


def test_a_missing_wandb_package_names_the_loggers_that_work(monkeypatch, tmp_path):
    """The GPU image has no wandb: the error says which logger settings run without it."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(ImportError, match="logger=csv"):
        make_wandb_logger(project="p", save_dir=str(tmp_path), run_id="r")
