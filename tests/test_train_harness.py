"""The training harness end to end on a tiny seeded model: pinned losses, resume, export, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from models.causal_lm import build_tiny_llama
from tests.hydra_utils import FIXTURES, compose_train, logged, tiny_sft_overrides
from train import train

# First three training losses of the seeded tiny run (recorded from this harness; tolerance 1e-3).
PINNED_FIRST_LOSSES = [10.8675537109375, 10.84436321258545, 10.816951751708984]


def test_smoke_run_pins_first_losses_and_writes_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_train(tiny_sft_overrides("trainer.max_steps=3", "scheduler=none"), run_dir)
    after = train(cfg)
    losses = logged(run_dir, "train/loss")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    if PINNED_FIRST_LOSSES is not None:
        assert losses == pytest.approx(PINNED_FIRST_LOSSES, abs=1e-3)
    assert "val/loss" in after
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    print("LOSSES", json.dumps(losses))


def test_resume_reproduces_uninterrupted_curve(tmp_path):
    common = [
        "scheduler=none",
        "trainer.max_steps=-1",
        "trainer.limit_train_batches=null",
        "validate_before_training=false",
    ]
    full_dir = tmp_path / "full"
    train(compose_train(tiny_sft_overrides(*common, "trainer.max_epochs=2"), full_dir))
    part_dir = tmp_path / "part"
    train(compose_train(tiny_sft_overrides(*common, "trainer.max_epochs=1"), part_dir))
    first_half = logged(part_dir, "train/loss")
    # same run folder, ckpt_path=auto picks up checkpoints/last.ckpt (what a Slurm requeue does)
    train(compose_train(tiny_sft_overrides(*common, "trainer.max_epochs=2"), part_dir))
    resumed = logged(part_dir, "train/loss")
    uninterrupted = logged(full_dir, "train/loss")
    assert len(first_half) == 4 and len(uninterrupted) == 8, (first_half, uninterrupted)
    assert resumed == pytest.approx(uninterrupted, abs=1e-5)


def test_adapter_round_trips_through_peft(tmp_path):
    run_dir = tmp_path / "run"
    from hydra.utils import instantiate

    cfg = compose_train(tiny_sft_overrides("trainer.max_steps=2", "validate_before_training=false"), run_dir)
    train(cfg)
    base, tokenizer = build_tiny_llama(special_tokens={"eos_token": "<|im_end|>"})
    loaded = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    recipe = instantiate(cfg.model, objectives={})
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    recipe.load_state_dict(state, strict=False)
    ids = tokenizer(["a river of words"], return_tensors="pt")
    with torch.no_grad():
        expected = recipe.llm.eval()(**ids).logits
        got = loaded(**ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    lora_weights = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_weights), "trained adapter must not be all zeros"


def test_missing_data_file_names_path_and_key(tmp_path):
    cfg = compose_train(tiny_sft_overrides(f"data.train_file={tmp_path}/nope.jsonl"), tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*data\.train_file"):
        train(cfg)


def test_missing_model_path_names_key(tmp_path):
    cfg = compose_train(
        tiny_sft_overrides("backbone=hf", f"backbone.source={tmp_path}/no-model"), tmp_path / "r"
    )
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match=r"no-model.*`backbone\.source`"):
        train(cfg)


def test_malformed_jsonl_lines_are_skipped_and_counted(tmp_path):
    from data.text.datasets import SFTDataset

    bad = tmp_path / "bad.jsonl"
    lines = open(FIXTURES / "tiny_sft.jsonl").read().splitlines()[:4]
    lines.insert(1, "{not json")
    lines.insert(3, json.dumps({"prompt": "p", "response": ""}))
    bad.write_text("\n".join(lines) + "\n")
    _, tokenizer = build_tiny_llama(num_layers=1)
    dataset = SFTDataset(bad, tokenizer, max_length=64)
    assert len(dataset) == 4
    assert [n for n, _ in dataset.report.skipped] == [2, 4]
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        SFTDataset(bad, tokenizer, max_length=64, strict=True)


def test_unknown_experiment_lists_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as err:
        compose_train(["experiment=lm_typo"])
    assert "lm_sft" in str(err.value)


def test_config_key_typo_is_an_error():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="optimizer.learning_rate"):
        compose_train(["experiment=lm_sft", "optimizer.learning_rate=1e-3"])


def test_wandb_without_credentials_logs_offline_and_finishes(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    import wandb

    from train import _finish_wandb

    run_dir = tmp_path / "run"
    cfg = compose_train(
        tiny_sft_overrides("trainer.max_steps=1", "logger=many", "validate_before_training=false"), run_dir
    )
    try:
        train(cfg)
    finally:
        _finish_wandb()
    assert wandb.run is None, "train() must finish its W&B run (or W&B merges runs)"
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("*.wandb")), "the offline run holds no logged data"


def test_top_level_key_typo_from_a_config_file_is_an_error(tmp_path):
    # `+key=...` merges like a key written in an experiment file would: Hydra accepts it silently
    cfg = compose_train(tiny_sft_overrides("+trainr.max_steps=3"), tmp_path / "run")
    with pytest.raises(KeyError, match="'trainr'.*did you mean 'trainer'"):
        train(cfg)
