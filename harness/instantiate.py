"""Build Lightning objects from config: named dicts of loggers/callbacks/objectives, one loop each."""

from __future__ import annotations

import logging

from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def instantiate_named(nodes: DictConfig | None, skip_unselected: bool = False) -> dict:
    """{name: object} for every `_target_` node of a dict config (None -> {}).

    skip_unselected: a node without `_target_` is settings left by an experiment for a group option that
    the command line deselected (e.g. `'objective=[]'` on an experiment that sets `objective.decorr.weight`):
    skip it with a warning instead of raising (objectives: the documented baseline override)."""
    if not nodes:
        return {}
    if not isinstance(nodes, DictConfig):
        raise TypeError(f"expected a dict of named config nodes, got {type(nodes).__name__}")
    built = {}
    for name, node in nodes.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            built[name] = instantiate(node)
        elif node is not None and skip_unselected:
            log.warning("config node %r has settings but its group option is not selected: skipped", name)
        elif node is not None:
            raise ValueError(f"config node {name!r} has no _target_: check the spelling of its group option")
    return built
