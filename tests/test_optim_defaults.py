"""Fused AdamW by default on CUDA parameters (recipes/optim.py device_defaults)."""

from functools import partial
from types import SimpleNamespace

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recipes.optim import device_defaults


def fake_param(device: str):
    return SimpleNamespace(device=torch.device(device), is_floating_point=lambda: True)


def test_adamw_config_fuses_on_cuda_only():
    factory = instantiate(OmegaConf.load("conf/optimizer/adamw.yaml"))
    assert factory.keywords["fused"] is None
    assert device_defaults(factory, [fake_param("cuda"), fake_param("cuda")]) == {"fused": True}
    assert device_defaults(factory, [fake_param("cpu")]) == {}
    assert device_defaults(factory, [fake_param("cuda"), fake_param("cpu")]) == {}
    assert device_defaults(factory, []) == {}
    assert device_defaults(factory, [fake_param("cuda")], scaler=object()) == {}  # fp16: Lightning's clipping


def test_an_explicit_choice_is_kept():
    params = [fake_param("cuda")]
    assert device_defaults(partial(torch.optim.AdamW, fused=False), params) == {}
    assert device_defaults(partial(torch.optim.AdamW, foreach=True), params) == {}
    assert device_defaults(partial(torch.optim.SGD, lr=0.1), params) == {}


def test_config_optimizer_still_builds_on_cpu():
    factory = instantiate(OmegaConf.load("conf/optimizer/adamw.yaml"))
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = factory([weight], **device_defaults(factory, [weight]))
    weight.grad = torch.ones(3)
    optimizer.step()
    assert optimizer.defaults["fused"] is None and weight.data.lt(1).all()
