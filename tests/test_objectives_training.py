"""Each objective through the real recipe (CausalLMRecipe + Lightning) on a tiny LoRA Llama: its loss falls
over a few dozen steps while cross-entropy stays finite. One fixed batch, so a drop is signal, not noise."""

import logging
from functools import partial

import pytest
import torch

from models.causal_lm import build_tiny_llama
from models.layer_subset import build_layer_subset
from recipes.causal_lm import CausalLMRecipe
from recipes.objectives.adl import AttentionDiversityObjective, sample_query_positions
from recipes.objectives.base import ObjectiveContext
from recipes.objectives.compose import micro_batch_step
from recipes.objectives.decorr import BosDecorrelationObjective, input_side_mask
from recipes.objectives.leaf import LeafDistillationObjective
from recipes.objectives.meap import MeapObjective
from recipes.objectives.window import WindowTokenNormaliser
from tests.lightning_utils import quiet_cpu_trainer

# Every token id of the texts below is < 4096, so a 4096-row vocabulary keeps the tiny model fast.
TINY = partial(build_tiny_llama, special_tokens={"eos_token": "<|im_end|>"}, num_layers=3, vocab_size=4096)
PROMPTS = ["What is a cat?", "What is the sea?", "What is a friend?"]
ANSWERS = [
    "A small animal that can sleep in the sun and play with the dog all day.",
    "The sea is a large body of water, and it has many fish in it.",
    "A person who will help you when you need it most, and who will stay.",
]


def sft_batch(tokenizer):
    rows = []
    for prompt, answer in zip(PROMPTS, ANSWERS):
        p, a = tokenizer(prompt).input_ids, tokenizer(" " + answer).input_ids + [tokenizer.eos_token_id]
        rows.append((p + a, [-100] * len(p) + a))
    length = max(len(ids) for ids, _ in rows) + 2  # some padding in every row
    batch = {
        k: torch.full((len(rows), length), v, dtype=torch.long)
        for k, v in (("input_ids", tokenizer.pad_token_id), ("labels", -100), ("attention_mask", 0))
    }
    for i, (ids, labels) in enumerate(rows):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["labels"][i, : len(ids)] = torch.tensor(labels)
        batch["attention_mask"][i, : len(ids)] = 1
    return batch


def train(objectives, steps=16, lr=1e-2, ce_weight=1.0, backbone=TINY):
    """Fit the recipe on one repeated batch; returns (recipe, {name: [loss per step]}, [ce per step])."""
    torch.manual_seed(0)
    recipe = CausalLMRecipe(
        backbone=backbone,
        optimizer=partial(torch.optim.AdamW, lr=lr),
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        objectives=objectives,
        ce_weight=ce_weight,
        seed=1,
    )
    history = {name: [] for name in objectives}
    history["ce"] = []
    for name, objective in objectives.items():

        def record(ctx, name=name, loss=objective.loss):
            value = loss(ctx)
            history[name].append(float(value.detach()))
            if name == next(iter(objectives)):
                with torch.no_grad():
                    shifted = ctx.logits[:, :-1].flatten(0, 1).float()
                    ce = torch.nn.functional.cross_entropy(shifted, ctx.batch["labels"][:, 1:].flatten())
                history["ce"].append(float(ce))
            return value

        objective.loss = record
    batch = sft_batch(recipe.tokenizer)
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None)
    trainer = quiet_cpu_trainer(max_steps=steps, limit_val_batches=0)
    trainer.fit(recipe, train_dataloaders=loader)
    return recipe, history


def assert_falls(values, factor):
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < factor * first, f"loss did not fall enough: {first:.4g} -> {last:.4g}"


def test_decorr_loss_falls():
    _, history = train({"decorr": BosDecorrelationObjective(weight=10.0, tokens="non_pad")}, steps=16)
    assert_falls(history["decorr"], 0.5)
    assert all(torch.isfinite(torch.tensor(history["ce"])))


def test_adl_loss_falls():
    # A random tiny model attends almost uniformly: nothing passes 2/n, so use a lower threshold and ADL alone.
    adl = AttentionDiversityObjective(weight=1.0, num_rows=8, threshold=0.5, seed=3)
    _, history = train({"adl": adl}, steps=16, lr=2e-2, ce_weight=0.0)
    assert_falls(history["adl"], 0.8)
    assert all(torch.isfinite(torch.tensor(history["ce"])))


def test_meap_sft_appends_masked_copies_and_trains_the_mask_row():
    meap = MeapObjective(mode="sft", ratio=0.3, min_answer_tokens=5)
    recipe, history = train({"meap": meap}, steps=10)
    assert meap.mask_token_id == recipe.tokenizer.mask_token_id == len(recipe.tokenizer) - 1
    rows = recipe.llm.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and len(recipe.tokenizer) <= rows < len(recipe.tokenizer) + 64
    assert all(0 < f < 0.5 for f in history["meap"])  # [MASK] share of the real tokens, every step
    assert history["ce"][-1] < history["ce"][0] and all(torch.isfinite(torch.tensor(history["ce"])))
    embedding = recipe.llm.get_input_embeddings()
    names = [n for n, p in recipe.llm.named_parameters() if p.requires_grad]
    assert any("token_adapter" in n for n in names), names  # peft trainable_token_indices for [MASK]
    assert embedding(torch.tensor([meap.mask_token_id])).abs().sum() > 0


def test_meap_pretrain_masks_in_place_of_tokens():
    meap = MeapObjective(mode="pretrain", ratio=0.2)
    recipe, history = train({"meap": meap}, steps=3)
    assert all(0 < f < 0.3 for f in history["meap"])


def test_leaf_distillation_falls_towards_the_teacher():
    teacher = TINY  # the full 3-layer model; the student keeps 2 of its layers, as in the SmolLM2 demo
    student = partial(build_layer_subset, backbone=TINY, layers=[0, 2])
    leaf = LeafDistillationObjective(teacher=teacher, teacher_dtype="fp32")
    recipe, history = train({"leaf": leaf}, steps=16, ce_weight=0.0, backbone=student, lr=1e-2)
    assert recipe.llm.config.num_hidden_layers == 2
    assert_falls(history["leaf"], 0.5)
    assert all(torch.isfinite(torch.tensor(history["ce"])))
    assert not any(p.requires_grad for p in leaf.teacher.parameters())


def test_leaf_rejects_a_teacher_with_another_tokenizer(tiny_lm):
    model, tokenizer = tiny_lm
    other = build_tiny_llama(special_tokens={"eos_token": "<|im_end|>"})[1]
    other.add_special_tokens({"mask_token": "[MASK]"})
    leaf = LeafDistillationObjective(teacher=(model, other))
    with pytest.raises(ValueError, match="share one tokenizer"):
        leaf.setup(model, tokenizer)


# ---- the objectives' own pieces, without training ----------------------------------------------------


def test_input_side_mask_stops_at_first_target_and_skips_padding():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, -100, -100, -100, -100]])
    attention = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    expected = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(input_side_mask(attention, labels), expected)


def test_sink_token_set_picks_positions_aligned_with_bos():
    h = torch.randn(1, 5, 8)
    h[0, 3] = 3 * h[0, 0]
    ctx = ObjectiveContext(
        batch={"attention_mask": torch.ones(1, 5)}, logits=torch.zeros(1, 5, 2), hidden_states=(h, h, h)
    )
    mask = BosDecorrelationObjective(tokens="sinks", sink_threshold=0.9).token_mask(ctx)
    assert mask[0, 3] and mask[0, 0] and mask.sum() == 2  # position 0 is dropped inside the loss
    with pytest.raises(ValueError, match="tokens"):
        BosDecorrelationObjective(tokens="everything")


def test_query_rows_are_reproducible_real_and_never_position_zero():
    attention = torch.tensor([[1] * 6 + [0] * 4, [1] * 8 + [0] * 2])
    first = sample_query_positions(attention, 5, torch.Generator().manual_seed(0))
    again = sample_query_positions(attention, 5, torch.Generator().manual_seed(0))
    assert torch.equal(first, again) and first.numel() == 5
    assert (first >= 1).all() and (first <= 7).all() and torch.equal(first, first.sort().values)
    # fewer real positions than rows: every real one (1..7), then positions padded in every row (8, 9)
    assert sample_query_positions(attention, 64, torch.Generator()).tolist() == list(range(1, 10))
    counts = torch.zeros(10)  # uniform over the real positions 1..7, never a padded one while enough are real
    for seed in range(700):
        counts[sample_query_positions(attention, 3, torch.Generator().manual_seed(seed))] += 1
    assert counts[0] == 0 and counts[8:].sum() == 0 and counts[1:8].min() > 0.7 * 300
    with pytest.raises(ValueError, match="out of range"):
        AttentionDiversityObjective(layers=[0, 5]).attention_layers(3)


def test_meap_sft_copies_only_rows_with_long_answers():
    meap = MeapObjective(mode="sft", ratio=0.5, min_answer_tokens=2)
    meap.mask_token_id = 99
    batch = {
        "input_ids": torch.arange(12).reshape(2, 6),
        "attention_mask": torch.ones(2, 6, dtype=torch.long),
        "labels": torch.tensor([[-100, -100, 2, 3, 4, 5], [-100, -100, -100, -100, 10, 11]]),
        "num_items_in_batch": torch.tensor(7),  # a 0-dim field: passed through, not copied
    }
    out = meap.transform_batch(batch, torch.Generator().manual_seed(0))
    assert out["input_ids"].shape == (3, 6) and out["attention_mask"].shape == (3, 6)
    assert torch.equal(out["input_ids"][:2], batch["input_ids"])  # originals kept as they were
    copy_ids, copy_labels = out["input_ids"][2], out["labels"][2]
    assert (copy_ids == 99).sum() == 2 and (copy_ids[:2] == torch.tensor([0, 1])).all()
    assert torch.equal(copy_labels[copy_ids == 99], batch["input_ids"][0][copy_ids == 99])
    assert out["num_items_in_batch"] is batch["num_items_in_batch"]


def test_micro_batch_step_differs_between_the_micro_batches_of_a_step():
    """Under gradient accumulation every micro-batch of a step has the same global_step; the key that
    seeds objective randomness must still differ between them (and stay global_step without it)."""
    assert [micro_batch_step(step, step, 1) for step in range(5)] == list(range(5))
    keys = [micro_batch_step(idx // 4, idx, 4) for idx in range(40)]  # batch_idx 0..39, A = 4
    assert keys == list(range(40))


def test_window_normalisation_gives_the_global_token_mean_gradient():
    """A=3 micro-batches with unequal token counts on R=2 simulated ranks, as Lightning + DDP apply them."""
    gen = torch.Generator().manual_seed(0)
    tokens = [
        [torch.randn(n, 4, generator=gen) for n in (2, 7, 3)],
        [torch.randn(n, 4, generator=gen) for n in (5, 1, 4)],
    ]
    theta = torch.nn.Parameter(torch.randn(4, generator=gen))
    normalisers = [WindowTokenNormaliser(), WindowTokenNormaliser()]
    grads = []
    for normaliser, rank in zip(normalisers, tokens):
        theta.grad = None
        for x in rank:
            loss = normaliser.scale(
                (x @ theta).square().sum(), torch.tensor(x.shape[0]), accumulate=3, ranks=2
            )
            (loss / 3).backward()  # Lightning's 1/A
        grads.append(theta.grad.clone())
    theta.grad = sum(grads) / 2  # DDP's mean over ranks
    window = sum(x.shape[0] for rank in tokens for x in rank)
    normalisers[0].local_tokens = torch.tensor(float(window), dtype=torch.float64)  # what all_reduce gives
    assert normalisers[0].apply([theta]) == window
    full = torch.cat([x for rank in tokens for x in rank])
    expected = torch.autograd.grad((full @ theta).square().mean(), theta)[0]
    assert torch.allclose(theta.grad, expected, atol=1e-6)
    assert normalisers[0].local_tokens is None  # reset for the next window


def test_window_normalisation_all_reduces_when_distributed(tmp_path):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    try:
        normaliser, param = WindowTokenNormaliser(), torch.nn.Parameter(torch.ones(2))
        param.grad = torch.full((2,), 12.0)
        normaliser.scale(torch.tensor(1.0), torch.tensor(4), accumulate=2, ranks=1)
        normaliser.scale(torch.tensor(1.0), torch.tensor(2), accumulate=2, ranks=1)
        assert normaliser.apply([param]) == 6
        assert torch.equal(param.grad, torch.full((2,), 2.0))
    finally:
        torch.distributed.destroy_process_group()


def _decorr_context(labels: torch.Tensor) -> ObjectiveContext:
    h = torch.randn(labels.shape[0], labels.shape[1], 8)
    return ObjectiveContext(
        batch={"attention_mask": torch.ones_like(labels), "labels": labels},
        logits=torch.zeros(*labels.shape, 2),
        hidden_states=(h, h, h),
    )


def test_decorr_on_plain_text_lm_batches_names_the_option_instead_of_training_at_zero():
    every_position_a_target = torch.arange(12).reshape(2, 6)  # data=text_lm: labels = input_ids
    with pytest.raises(ValueError, match="objective.decorr.tokens=non_pad"):
        BosDecorrelationObjective(tokens="input_side").loss(_decorr_context(every_position_a_target))
    assert BosDecorrelationObjective(tokens="non_pad").loss(_decorr_context(every_position_a_target)) > 0


def test_decorr_warns_when_a_batch_selects_nothing(caplog):
    only_bos_prompt = torch.tensor([[-100, 5, 6, 7]])  # input side = position 0 alone, which never counts
    with caplog.at_level(logging.WARNING, logger="recipes.objectives.decorr"):
        loss = BosDecorrelationObjective(tokens="input_side").loss(_decorr_context(only_bos_prompt))
    assert loss == 0 and "selected no position" in caplog.text


def test_adl_rows_follow_the_sample_key_not_the_step(monkeypatch):
    """Under gradient accumulation the micro-batches of one step share `step` (the weight schedule) but not
    `sample_key`, so each draws its own ADL query rows; the same key draws the same rows (resumes)."""
    from recipes.objectives import adl as adl_module

    drawn = []

    class Drawn(Exception):
        pass

    def record(mask, num_rows, generator):
        drawn.append(adl_module.sample_query_positions.__wrapped__(mask, num_rows, generator))
        raise Drawn

    record.__wrapped__ = adl_module.sample_query_positions
    monkeypatch.setattr(adl_module, "sample_query_positions", record)
    objective = AttentionDiversityObjective(num_rows=4)
    mask = torch.ones(2, 64, dtype=torch.long)
    for key in (7, 8, 7):
        ctx = ObjectiveContext(
            batch={"attention_mask": mask}, logits=None, attention={0: None}, step=3, sample_key=key
        )
        with pytest.raises(Drawn):
            objective.loss(ctx)
    assert not torch.equal(drawn[0], drawn[1]) and torch.equal(drawn[0], drawn[2])


@pytest.mark.parametrize("cls", [BosDecorrelationObjective, AttentionDiversityObjective, MeapObjective])
def test_weight_is_zero_before_start_step_then_warms_up(cls):
    """`start_step` switches a loss on late (study 2: after the speech model has started to read its audio),
    then `warmup_steps` ramps it from there; every objective's config takes both."""
    objective = cls(weight=2.0, warmup_steps=4, start_step=10)
    weights = [objective.weight_at(step) for step in (0, 9, 10, 11, 13, 50)]
    assert weights == [0.0, 0.0, 0.5, 1.0, 2.0, 2.0]
    assert BosDecorrelationObjective(weight=3.0).weight_at(0) == 3.0  # defaults: on from step 0
    with pytest.raises(ValueError, match="start_step"):
        cls(weight=1.0, start_step=-1)


def test_objective_configs_take_start_step():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parent.parent / "conf/objective"
    for name in ("decorr", "adl", "leaf"):
        cfg = OmegaConf.load(conf / f"{name}.yaml")[name]
        assert cfg.start_step == 0
    cfg = OmegaConf.load(conf / "decorr.yaml").decorr
    cfg.start_step = 400
    assert instantiate(cfg).weight_at(399) == 0.0 and instantiate(cfg).weight_at(400) > 0


def test_decorr_counts_later_empty_batches_without_reading_them_each_step(caplog, monkeypatch):
    """After the first batch, empty selections add to a device-side count read every EMPTY_CHECK_EVERY
    batches (no host sync per step on the GPU); none is lost, and the warning names how many."""
    from recipes.objectives import decorr as decorr_module

    monkeypatch.setattr(decorr_module, "EMPTY_CHECK_EVERY", 10)
    selects = _decorr_context(torch.tensor([[-100, -100, 6, 7]]))
    empty = _decorr_context(torch.tensor([[-100, 5, 6, 7]]))
    objective = BosDecorrelationObjective(tokens="input_side")
    with caplog.at_level(logging.WARNING, logger="recipes.objectives.decorr"):
        for call in range(1, 21):  # calls 4 and 6 select nothing; the count is read at calls 10 and 20
            objective.loss(empty if call in (4, 6) else selects)
            if call == 9:
                assert "selected no position" not in caplog.text
    assert objective.empty_batches == 2
    assert caplog.text.count("selected no position in 2 batch(es)") == 1


def test_decorr_compile_uses_the_compiled_loss_with_the_same_value(monkeypatch):
    from recipes.objectives import decorr

    labels = torch.arange(12).reshape(2, 6)
    ctx = _decorr_context(labels)
    eager = BosDecorrelationObjective(tokens="non_pad").loss(ctx)
    calls = []

    def compile_once(function, **options):
        def loss_fn(*args):
            calls.append((function.__name__, options, len(args)))
            return function(*args)

        return loss_fn

    monkeypatch.setattr(decorr, "compile_once", compile_once)
    torch.testing.assert_close(BosDecorrelationObjective(tokens="non_pad", compile=True).loss(ctx), eager)
    assert calls == [("bos_decorrelation_loss", {"dynamic": True}, 4)]
    BosDecorrelationObjective(tokens="non_pad").loss(ctx)  # null: a narrow model on CPU stays eager
    assert len(calls) == 1
