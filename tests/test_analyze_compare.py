"""analyze.py end to end on tiny_llama (CLI and a trained-adapter run folder); compare.py on fake run folders."""

import csv
import json
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import analyze
import compare

ROOT = Path(__file__).resolve().parents[1]
LAYER_KEYS = {
    "layer",
    "first_token_attention",
    "sink_rate",
    "max_activation",
    "max_activation_position",
    "max_activation_feature",
    "activation_ratio",
    "bos_cosine",
}


def analyze_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("analyze", overrides=list(overrides))


def test_analyze_cli_on_tiny_llama(tmp_path, monkeypatch):
    texts = tmp_path / "texts.txt"
    texts.write_text("The sun rises in the east.\n\nCats like to sleep in warm places.\nA third line.\n")
    out = tmp_path / "analysis"
    argv = ["analyze.py", "backbone=tiny_llama", f"texts={texts}", f"output_dir={out}"]
    monkeypatch.setattr(sys, "argv", argv)
    analyze.main()  # the Hydra entry point, in-process (a subprocess would re-import torch: slow on 2 cores)
    assert (out / ".hydra" / "config.yaml").exists()
    sinks = json.loads((out / "sinks.json").read_text())
    assert sinks["num_texts"] == 3 and sinks["model"] == "build_tiny_llama"
    assert [row["layer"] for row in sinks["layers"]] == [0, 1]
    assert all(LAYER_KEYS <= set(row) for row in sinks["layers"])
    assert isinstance(sinks["intermediate_sinks"], list)
    for name in ("layer_curves", "head_heatmap", "massive_activations"):
        assert (out / f"{name}.png").stat().st_size > 1000
    summary = (out / "summary.md").read_text()
    assert "First-token attention" in summary and "| layer |" in summary


def test_missing_texts_file_names_the_path_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*config key `texts`"):
        analyze.read_texts(str(tmp_path / "nope.txt"), max_texts=10)
    assert len(analyze.read_texts(None, max_texts=64)) >= 12  # the shipped default texts


def test_analyze_trained_adapter_run(tmp_path, tiny_lm):
    from peft import LoraConfig, get_peft_model

    run = tmp_path / "run_decorr"
    (run / ".hydra").mkdir(parents=True)
    backbone = OmegaConf.load(ROOT / "conf" / "backbone" / "tiny_llama.yaml")
    OmegaConf.save(
        OmegaConf.create({"backbone": backbone, "model": {"backbone": "${backbone}"}}),
        run / ".hydra" / "config.yaml",
    )
    model, _ = tiny_lm
    lora = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(run / "adapter")

    base = analyze.analyze(analyze_config("backbone=tiny_llama", f"output_dir={tmp_path / 'base'}"))
    tuned = analyze.analyze(analyze_config(f"run={run}", f"output_dir={tmp_path / 'tuned'}"))
    assert tuned["model"] == "run_decorr (adapter on build_tiny_llama)"
    assert tuned["layers"][1]["first_token_attention"] != pytest.approx(
        base["layers"][1]["first_token_attention"]
    )
    assert (tmp_path / "tuned" / "summary.md").exists()


def fake_run(root: Path, name: str, losses: list[float], attention: float, with_sinks_json: bool) -> Path:
    run = root / name
    metrics = run / "csv" / "version_0" / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    with open(metrics, "w", newline="") as handle:
        writer = csv.DictWriter(
            handle,
            [
                "epoch",
                "step",
                "train/loss",
                "val/loss",
                "val/wer",
                "sinks/first_token_attention/mean",
                "sinks/first_token_attention/layer_1",
            ],
        )
        writer.writeheader()
        for step, loss in enumerate(losses):
            writer.writerow({"epoch": 0, "step": step, "train/loss": loss})
            writer.writerow(
                {
                    "epoch": 0,
                    "step": step,
                    "sinks/first_token_attention/mean": attention + step,
                    "sinks/first_token_attention/layer_1": attention + step,
                }
            )
        writer.writerow({"epoch": 0, "step": len(losses) - 1, "val/loss": losses[-1] + 0.5, "val/wer": 0.25})
    if with_sinks_json:
        layers = [
            {
                "layer": i,
                "first_token_attention": attention * (i + 1),
                "sink_rate": 50.0,
                "max_activation": 10.0,
                "max_activation_position": 0,
                "max_activation_feature": 3,
                "activation_ratio": 100.0 * (i + 1),
                "bos_cosine": 0.5,
            }
            for i in range(3)
        ]
        (run / "sinks.json").write_text(
            json.dumps({"model": "m", "num_texts": 2, "layers": layers, "intermediate_sinks": []})
        )
    return run


def test_compare_builds_table_and_overlays(tmp_path, capsys):
    a = fake_run(tmp_path, "baseline", [3.0, 2.5, 2.0], attention=0.25, with_sinks_json=True)
    b = fake_run(tmp_path, "decorr", [3.0, 2.6, 2.2], attention=0.125, with_sinks_json=False)
    compare.main([str(a), str(b), "--layers", "1", "--out", str(tmp_path / "cmp")])
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| metric | baseline | decorr |" in table
    assert "| final train loss | 2.0000 | 2.2000 |" in table
    assert "| final val loss | 2.5000 | 2.7000 |" in table
    assert "| final val/wer | 0.2500 | 0.2500 |" in table
    # baseline from sinks.json (layer 1 = 0.25 * 2), decorr from its last logged value (0.125 + 2)
    assert "| first-token attention, layer 1 | 0.500 | 2.125 |" in table
    assert "| max/median abs h, layer 1 | 200.0 | n/a |" in table
    for name in (
        "train_loss",
        "val_loss",
        "sinks_first_token_attention_over_training",
        "first_token_attention_per_layer",
        "activation_ratio_per_layer",
    ):
        assert (tmp_path / "cmp" / f"{name}.png").stat().st_size > 1000
    assert "first-token attention, layer 1" in capsys.readouterr().out


def _leaf_run(root: Path, tiny_lm_factory, config_backbone: str) -> Path:
    """An lm_leaf-like run folder: teacher = the 2-layer tiny model, student = its layer 0, adapter on the
    student; `config_backbone` is what model.backbone points at in the saved config."""
    from peft import LoraConfig, get_peft_model

    from models.layer_subset import keep_decoder_layers

    run = root / "run_leaf"
    (run / ".hydra").mkdir(parents=True)
    backbone = OmegaConf.load(ROOT / "conf" / "backbone" / "tiny_llama.yaml")
    student = {
        "_target_": "models.layer_subset.build_layer_subset",
        "_partial_": True,
        "backbone": "${backbone}",
        "layers": "::2",
    }
    config = {"backbone": backbone, "student": student, "model": {"backbone": config_backbone}}
    OmegaConf.save(OmegaConf.create(config), run / ".hydra" / "config.yaml")
    model = keep_decoder_layers(tiny_lm_factory()[0], "::2")
    lora = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(run / "adapter")
    return run


def test_analyze_a_leaf_run_measures_the_student(tmp_path, tiny_lm_factory):
    run = _leaf_run(tmp_path, tiny_lm_factory, "${student}")
    sinks = analyze.analyze(analyze_config(f"run={run}", f"output_dir={tmp_path / 'out'}"))
    assert [row["layer"] for row in sinks["layers"]] == [0]  # the 1-layer student, not the 2-layer teacher
    assert sinks["model"] == "run_leaf (adapter on build_layer_subset)"


def test_an_adapter_that_does_not_match_its_base_fails_loudly(tmp_path, tiny_lm_factory):
    run = _leaf_run(tmp_path, tiny_lm_factory, "${backbone}")  # the student's adapter on the teacher
    with pytest.raises(ValueError, match="does not match its base build_tiny_llama"):
        analyze.analyze(analyze_config(f"run={run}", f"output_dir={tmp_path / 'out'}"))


def _run_with_perplexity(tmp_path, name, perplexities, seed, tracked):
    """A run folder: val/perplexity at steps 0, 5, 10, ...; a seed; step-0 and final sinks with bands."""
    run = tmp_path / name
    (run / "csv").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(f"task_name: x\nseed: {seed}\n")
    with open(run / "csv" / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "val/perplexity"])
        writer.writeheader()
        for i, value in enumerate(perplexities):
            writer.writerow({"step": 5 * i, "val/perplexity": value})
    for path, value in ((run / "sinks" / "step_000000.json", 0.4), (run / "sinks.json", tracked)):
        layers = [
            {
                "layer": i,
                "tracked_sink_attention": value if i in (1, 2) else 0.0,
                "intermediate_sink_count": 1.0,
            }
            for i in range(4)
        ]
        bands = {"early_middle": [1, 2], "late": [3, None]}
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"layers": layers, "layer_bands": bands, "intermediate_sinks": []}))
    return run


def test_compare_quality_against_the_baseline_at_the_same_step_and_the_tracked_sinks(tmp_path, capsys):
    decorr = _run_with_perplexity(tmp_path, "decorr", [50.0, 22.0], seed=7, tracked=0.1)
    base = _run_with_perplexity(tmp_path, "baseline", [50.0, 20.0, 18.0], seed=7, tracked=0.4)
    compare.main([str(decorr), str(base), "--baseline", "baseline", "--out", str(tmp_path / "cmp")])
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    # decorr stopped at step 5: compared with the baseline's step-5 value (20), not its last (18) or step 0
    assert "| val/perplexity vs baseline at the same step (%) | +10.0 | +0.0 |" in table
    assert "| val/perplexity: step compared | 5 | 10 |" in table
    assert "| seed | 7 | 7 |" in table
    assert "| attention to the step-0 sinks, layers early_middle (1-2) | 0.100 | 0.400 |" in table
    assert "| attention to the step-0 sinks, change since step 0 (%) | -75.0 | 0.000 |" in table
    with pytest.raises(ValueError, match="--baseline 'nope'"):
        compare.main([str(decorr), str(base), "--baseline", "nope", "--out", str(tmp_path / "cmp2")])
