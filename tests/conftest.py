"""Shared fixtures: tiny random-weight models of the real families (no network, no hub)."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SMOLLM2_SPECIAL_TOKENS = {"eos_token": "<|im_end|>"}


@pytest.fixture(scope="session")
def tiny_lm_factory():
    """Build a fresh tiny Llama (2 layers, width 64, real SmolLM2 tokenizer): call with overrides."""
    from models.causal_lm import build_tiny_llama

    def build(**overrides):
        overrides.setdefault("special_tokens", SMOLLM2_SPECIAL_TOKENS)
        return build_tiny_llama(**overrides)

    return build


@pytest.fixture()
def tiny_lm(tiny_lm_factory):
    """(model, tokenizer) of a fresh seeded tiny Llama."""
    return tiny_lm_factory()
