"""Catch typos in top-level config keys, which Hydra merges silently when they come from a config file."""

from __future__ import annotations

import difflib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PRIMARY = Path(__file__).resolve().parents[1] / "conf" / "train.yaml"


def known_top_level_keys() -> set[str]:
    """Keys of conf/train.yaml plus the config groups (the folders of conf/: backbone, data, trainer, ...)."""
    keys = {k for k in OmegaConf.load(PRIMARY) if k != "defaults"}
    groups = {path.name for path in PRIMARY.parent.iterdir() if path.is_dir()}
    return keys | groups


def check_top_level_keys(cfg: DictConfig) -> None:
    """Raise on a top-level key nobody declared (e.g. `trainr:` in an experiment file), naming a close match."""
    known = known_top_level_keys()
    unknown = [key for key in cfg if key not in known]
    if unknown:
        hints = [
            f"{key!r}"
            + (
                f" (did you mean {close[0]!r}?)"
                if (close := difflib.get_close_matches(key, known, 1))
                else ""
            )
            for key in unknown
        ]
        raise KeyError(
            f"unknown top-level config key(s): {', '.join(hints)}. Declare new keys in conf/train.yaml."
        )
