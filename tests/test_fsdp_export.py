"""The FSDP export path on CPU (Lightning runs FSDP on GPUs only; benchmarks/fsdp_check.sh runs it there):
rank 0 writes the adapter from the trainable weights gathered on every rank, not from its own shards."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from recipes.checkpoint import trainable_state_keys
from tests.hydra_utils import compose_train, tiny_sft_overrides


def test_adapter_exported_from_a_gathered_state_equals_the_module_export(tmp_path):
    cfg = compose_train(tiny_sft_overrides(), tmp_path / "run")
    recipe = instantiate(cfg.model, objectives={}, _convert_="all")
    with torch.no_grad():
        for name, param in recipe.named_parameters():
            if "lora_B" in name:
                param.normal_()
    keys = trainable_state_keys(recipe)
    gathered = {k: v.clone() for k, v in recipe.state_dict().items() if k in keys}
    assert gathered and all(k.startswith("llm.") for k in gathered)
    recipe.export(tmp_path / "plain")
    with (
        torch.no_grad()
    ):  # rank 0's own (sharded) weights are not the trained ones: export must not read them
        for name, param in recipe.named_parameters():
            if "lora_" in name:
                param.zero_()
    recipe.export(tmp_path / "gathered", state_dict=gathered)
    plain = load_file(str(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"))
    from_gathered = load_file(str(tmp_path / "gathered" / "adapter" / "adapter_model.safetensors"))
    assert plain.keys() == from_gathered.keys() and plain
    assert all(torch.equal(plain[k], from_gathered[k]) for k in plain)
    with pytest.raises(ValueError, match="export_merged=false"):
        recipe.export(tmp_path / "merged", merged=True, state_dict=gathered)


def test_trainable_keys_ignore_fsdp_wrapper_names():
    outer = torch.nn.Module()
    outer.layer = torch.nn.Module()
    outer.layer._fsdp_wrapped_module = torch.nn.Linear(2, 2)
    outer.layer._fsdp_wrapped_module.bias.requires_grad_(False)
    assert trainable_state_keys(outer) == {"layer.weight"}
