"""Studies 1 (decorrelation on text) and 5 (ADL robustness): arms compose, the report's arithmetic, noise."""

import json
import math

import pytest
import torch

from studies import adl_robustness, decorr_text
from tests.hydra_utils import compose_train


@pytest.mark.parametrize("study", [decorr_text, adl_robustness])
def test_every_arm_composes_for_the_gpu_and_differs_only_in_its_objective(study, tmp_path):
    args = study.parse_args(["--out", str(tmp_path), "--steps", "1000"])
    arms = study.build_arms(args)
    assert arms[0].name == "baseline" and len(arms) >= 2
    configs = {arm.name: compose_train(arm.overrides, run_dir=tmp_path / arm.name) for arm in arms}
    for name, cfg in configs.items():
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
        assert cfg.trainer.max_steps == 1000 and cfg.data.batch_size == 32 and cfg.data.max_length == 256
        assert cfg.data.prepare._target_.endswith("build_public_domain_text")
        assert dict(cfg.callbacks.sink_diagnostics.layer_bands) == {"early_middle": [1, 8], "late": [9, None]}
        assert "wandb" not in (cfg.logger or {})
        expected = {"baseline": []}.get(name, ["decorr" if study is decorr_text else "adl"])
        assert sorted(cfg.get("objective") or {}) == expected, name
    if study is decorr_text:
        decorr = configs["decorr_w100"].objective.decorr
        assert decorr.weight == 100 and decorr.warmup_steps == 100 and decorr.tokens == "non_pad"


def _fake_arm(root, name, tracked, activation, perplexity):
    run = root / name
    (run / "sinks").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"step": 1000, "after": {"val/perplexity": perplexity}}))
    for path, (attention, act) in (
        (run / "sinks" / "step_000000.json", (0.5, 800.0)),
        (run / "sinks.json", (tracked, activation)),
    ):
        layers = [
            {
                "layer": i,
                "tracked_sink_attention": attention if 1 <= i <= 8 else 0.0,
                "tracked_sink_max_activation": act if 1 <= i <= 8 else math.nan,
                "intermediate_sink_count": 1.0,
                "bos_cosine": 0.5,
                "first_token_attention": 0.6,
                "intermediate_sink_max_activation": act,
            }
            for i in range(12)
        ]
        bands = {"early_middle": [1, 8], "late": [9, None]}
        path.write_text(json.dumps({"layers": layers, "layer_bands": bands, "intermediate_sinks": [{}] * 5}))


def test_decorr_report_divides_by_the_baseline_arm_and_checks_the_goal(tmp_path):
    _fake_arm(tmp_path, "baseline", tracked=0.4, activation=800.0, perplexity=20.0)
    _fake_arm(tmp_path, "decorr_w100", tracked=0.1, activation=200.0, perplexity=20.5)  # goal met
    _fake_arm(tmp_path, "decorr_w1000", tracked=0.05, activation=100.0, perplexity=25.0)  # perplexity +25%
    text = decorr_text.report(tmp_path, ["baseline", "decorr_w100", "decorr_w1000"]).read_text()
    assert "| decorr_w100 | 1000 | 0.100 | 0.25x | 200.0 | 0.25x |" in text and "| 2.5% | yes |" in text
    assert "| 25.0% | no |" in text
    assert "held 5 intermediate sinks; attention to them 0.500" in text
    assert (tmp_path / "relative_to_baseline.png").stat().st_size > 1000


def test_noise_insertion_keeps_the_original_tokens_in_order():
    generator = torch.Generator().manual_seed(0)
    block = list(range(100, 140))
    ids, original = adl_robustness.insert_noise(block, 0.25, [1, 2, 3], generator)
    assert len(ids) == 50 and sum(not o for o in original) == 10 and ids[0] == 100
    assert [t for t, o in zip(ids, original) if o] == block
    assert all(t in (1, 2, 3) for t, o in zip(ids, original) if not o)


def test_clean_perplexity_equals_the_model_loss(tiny_lm):
    model, tokenizer = tiny_lm
    blocks = adl_robustness.token_blocks("The cat sat on the mat. " * 40, tokenizer, length=16, count=3)
    assert len(blocks) == 3 and all(len(b) == 16 for b in blocks)
    ids = torch.tensor(blocks)
    with torch.no_grad():
        expected = math.exp(float(model(input_ids=ids, labels=ids).loss))
    clean = [(b, [True] * len(b)) for b in blocks]
    assert adl_robustness.noisy_perplexity(model, clean, pad_id=0, batch_size=2) == pytest.approx(
        expected, rel=1e-4
    )


@pytest.mark.slow
@pytest.mark.parametrize("study", [decorr_text, adl_robustness])
def test_smoke_study_runs_every_arm_and_writes_the_report(study, tmp_path):
    """Two train.py processes on CPU (about 1-3 minutes on 2 shared cores)."""
    report = study.main(["--smoke", "--out", str(tmp_path)])
    text = report.read_text()
    assert "| baseline | 4 |" in text and "(unfinished)" not in text
    assert all((tmp_path / name / "results.json").exists() for name in ("baseline",))
    assert len(list(tmp_path.glob("*.png"))) >= 3


def test_adl_study_links_a_finished_baseline_and_refuses_a_foreign_one(tmp_path):
    """--baseline-from shares one baseline arm between studies 1 and 5 (same overrides but the run name)."""
    other = tmp_path / "decorr_text" / "baseline"
    other.mkdir(parents=True)
    out = tmp_path / "adl"
    adl_robustness.link_baseline(out, other)
    assert (out / "baseline").resolve() == other.resolve()
    adl_robustness.link_baseline(out, other)  # rerun: the same link is fine
    with pytest.raises(TimeoutError, match="no results.json"):
        adl_robustness.wait_for_finished(out / "baseline", timeout_s=0.05, poll_s=0.01)
    (other / "results.json").write_text("{}")
    adl_robustness.wait_for_finished(out / "baseline", timeout_s=1, poll_s=0.01)
    (tmp_path / "adl2" / "baseline").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a link"):
        adl_robustness.link_baseline(tmp_path / "adl2", other)


def test_extra_overrides_reach_every_arm():
    args = decorr_text.parse_args(["--smoke", "--override", "model.kernels=fast", "--override", "seed=7"])
    for arm in decorr_text.build_arms(args):
        overrides = arm.overrides
        assert "model.kernels=fast" in overrides
        assert overrides.index("seed=7") > overrides.index("seed=42")  # later: Hydra keeps the last value
