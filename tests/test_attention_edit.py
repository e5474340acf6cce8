"""ACT and ZeroTuning: hand-computed edits, rows summing to 1, off = identical logits, edits seen by diagnostics."""

import pytest
import torch

from models.attention_capture import QueryKeyCapture, sampled_attention_probs
from models.attention_edit import (
    ACT,
    ZeroTuning,
    act_redistribute,
    act_sink_keys,
    visibility,
    zerotuning_rescale,
)

PROBS = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0],
        [0.2, 0.6, 0.2, 0.0],
        [0.1, 0.5, 0.1, 0.3],
    ]
)[None, None]  # [1,1,4,4]
CAUSAL = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None, None]


def test_act_matches_a_hand_computation():
    # received attention: key 0 0.45 (never a sink), key 1 (0.5+0.6+0.5)/3 = 0.533, key 2 0.15, key 3 0.3
    sinks = act_sink_keys(PROBS, CAUSAL, threshold=0.4)
    assert sinks.tolist() == [[[False, True, False, False]]]
    edited = act_redistribute(PROBS, sinks, torch.tensor([True]), scale=0.4)
    expected = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.8, 0.2, 0.0, 0.0],  # 0.3 removed from key 1, all to key 0
            [0.38, 0.24, 0.38, 0.0],  # 0.36 removed, split 0.2:0.2
            [0.16, 0.2, 0.16, 0.48],  # 0.3 removed, split 0.1:0.1:0.3
        ]
    )
    assert torch.allclose(edited[0, 0], expected, atol=1e-6)
    assert torch.allclose(
        act_redistribute(PROBS, sinks, torch.tensor([False]), 0.4), PROBS
    )  # head not chosen
    all_sinks = act_sink_keys(PROBS, CAUSAL, threshold=0.1)
    assert all_sinks.tolist() == [[[False, True, True, True]]]
    assert torch.allclose(
        act_redistribute(PROBS, all_sinks, torch.tensor([True]), 0.4).sum(-1), torch.ones(4)
    )


def test_zerotuning_matches_a_hand_computation_and_follows_left_padding():
    edited = zerotuning_rescale(PROBS, CAUSAL, torch.tensor([2.0]))
    assert torch.allclose(edited[0, 0, 3], torch.tensor([0.2, 0.5, 0.1, 0.3]) / 1.1)
    assert torch.allclose(edited[0, 0, 1], torch.tensor([1.0, 0.5, 0.0, 0.0]) / 1.5)
    assert torch.allclose(edited.sum(-1), torch.ones(1, 1, 4))
    padded = CAUSAL & torch.tensor([False, True, True, True])  # key 0 is left padding
    probs = torch.tensor([[0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0.5, 0.5, 0], [0, 0.25, 0.25, 0.5]])[None, None]
    out = zerotuning_rescale(probs, padded, torch.tensor([0.5]))
    assert torch.allclose(out[0, 0, 2], torch.tensor([0, 0.25, 0.5, 0]) / 0.75)  # the first real token


def test_visibility_reads_every_mask_format():
    assert torch.equal(visibility(None, 1, 4, 4, "cpu"), CAUSAL)
    assert visibility(None, 1, 1, 4, "cpu").tolist() == [[[[True] * 4]]]  # one new query with a cache
    additive = torch.zeros(1, 1, 4, 4).masked_fill(~CAUSAL, torch.finfo(torch.float32).min)
    assert torch.equal(visibility(additive, 1, 4, 4, "cpu"), CAUSAL)
    padding = torch.tensor([[0, 1, 1, 1]])
    assert visibility(padding, 1, 4, 4, "cpu")[0, 0, 3].tolist() == [False, True, True, True]


@pytest.fixture()
def model_and_batch(tiny_lm):
    model, tokenizer = tiny_lm
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    batch = tokenizer(["The cat sat on the mat today.", "A dog."], return_tensors="pt", padding=True)
    return model.eval(), dict(batch)


def test_off_gives_identical_logits_and_factor_one_matches_the_fused_kernel(model_and_batch):
    model, batch = model_and_batch
    with torch.no_grad():
        reference = model(**batch).logits
        with ZeroTuning(heads={0: [0]}, factor=1.0).applied(model):
            explicit = model(**batch).logits  # layer 0 computed explicitly, no change in value
        with ZeroTuning(heads={0: [0, 1]}, factor=0.2).applied(model):
            edited = model(**batch).logits
        with ACT(threshold=0.05).applied(model):
            act = model(**batch).logits
        after = model(**batch).logits
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(after, reference)  # off (after the context) = the unedited model, bit for bit
    valid = batch["attention_mask"].bool()
    assert torch.allclose(explicit[valid], reference[valid], atol=1e-5)
    assert not torch.allclose(edited[valid], reference[valid], atol=1e-4)
    assert not torch.allclose(act[valid], reference[valid], atol=1e-4)


def test_diagnostics_see_the_edited_probabilities(model_and_batch):
    model, batch = model_and_batch
    positions = torch.arange(batch["input_ids"].shape[1])
    with torch.no_grad():
        with QueryKeyCapture(model, [1]) as captured:
            model(**batch)
        plain = sampled_attention_probs(captured[1], positions, batch["attention_mask"])
        with ZeroTuning(heads={1: {2: 3.0}}).applied(model), QueryKeyCapture(model, [1]) as captured:
            model(**batch)
            edited = sampled_attention_probs(captured[1], positions, batch["attention_mask"])
    valid_rows = batch["attention_mask"].bool()[:, None, :].expand(-1, plain.shape[1], -1)
    assert torch.allclose(edited.sum(-1)[valid_rows], torch.ones(int(valid_rows.sum())), atol=1e-5)
    p0 = plain[:, 2, :, 0]
    assert torch.allclose(edited[:, 2, :, 0], 3 * p0 / (3 * p0 + 1 - p0), atol=1e-5)  # the hand formula
    assert torch.allclose(edited[:, [0, 1, 3]], plain[:, [0, 1, 3]], atol=1e-6)  # other heads untouched


def test_generation_runs_with_an_edit_and_heads_are_checked(model_and_batch, tiny_lm):
    model, batch = model_and_batch
    _, tokenizer = tiny_lm
    with ACT(heads={0: [1]}).applied(model):
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    with pytest.raises(ValueError, match="layers \\[7\\] do not exist"):
        with ACT(heads={7: [0]}).applied(model):
            pass


def test_analyze_and_calibration_commands_take_the_edit(tmp_path):
    import json

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import analyze
    import calibrate_attention_edit
    from tests.hydra_utils import REPO

    def config(name, *overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
            return compose(name, overrides=list(overrides))

    texts = tmp_path / "texts.txt"
    texts.write_text("The cat sat on the mat.\nA long time ago, in a town far away.\nRain again.\n")
    heads_file = tmp_path / "zt.json"
    calibrate_attention_edit.calibrate(
        config(
            "calibrate_attention_edit",
            "backbone=tiny_llama",
            "attention_edit=zerotuning",
            "attention_edit.factor=0.25",
            f"texts={texts}",
            "max_heads=3",
            f"output={heads_file}",
        )
    )
    heads = json.loads(heads_file.read_text())["heads"]
    assert sum(len(v) for v in heads.values()) == 3 and all(
        f == 0.25 for v in heads.values() for f in v.values()
    )
    common = ["backbone=tiny_llama", f"texts={texts}"]
    base = analyze.analyze(config("analyze", *common, f"output_dir={tmp_path / 'base'}"))
    edited = analyze.analyze(
        config(
            "analyze",
            *common,
            f"output_dir={tmp_path / 'edited'}",
            "attention_edit=zerotuning",
            f"attention_edit.heads_file={heads_file}",
        )
    )
    assert edited["model"].endswith("+ zerotuning")
    for layer in map(int, heads):
        before = base["layers"][layer]["first_token_attention_per_head"]
        after = edited["layers"][layer]["first_token_attention_per_head"]
        for head in map(int, heads[str(layer)]):
            assert after[head] < before[head]  # factor 0.25 on the first token


def test_loss_calibration_keeps_the_heads_whose_edit_helps(model_and_batch):
    from models.attention_edit_calibration import calibrate_heads, mean_token_nll

    model, batch = model_and_batch
    found = calibrate_heads(
        model, batch, ZeroTuning(), layers=[1], factors=[0.5, 2.0], max_heads=2, min_gain=0.0
    )
    assert found["criterion"] == "loss" and len(found["gains"]) == model.config.num_attention_heads
    gains = [g[3] for g in found["gains"]]
    assert gains == sorted(gains, reverse=True)
    kept = [(layer, head) for layer, heads in found["heads"].items() for head in heads]
    assert len(kept) == min(2, sum(g > 0 for g in gains))
    if kept:
        with ZeroTuning(heads={int(k): v for k, v in found["heads"].items()}).applied(model):
            assert mean_token_nll(model, batch) < found["baseline_nll"]
