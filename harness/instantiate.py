"""Build Lightning objects from config: named dicts of loggers/callbacks/objectives, one loop each."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig


def instantiate_named(nodes: DictConfig | None) -> dict:
    """{name: object} for every `_target_` node of a dict config (None -> {})."""
    if not nodes:
        return {}
    if not isinstance(nodes, DictConfig):
        raise TypeError(f"expected a dict of named config nodes, got {type(nodes).__name__}")
    built = {}
    for name, node in nodes.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            built[name] = instantiate(node)
        elif node is not None:
            raise ValueError(f"config node {name!r} has no _target_: check the spelling of its group option")
    return built
