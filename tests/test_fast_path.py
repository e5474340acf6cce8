"""The fast path (models/fast.py, models/fast_loss.py) computes what the plain path computes.

Tolerances: fp32 fast path (chunked loss, compiled layers) vs plain: 1e-5 relative on loss and LoRA
gradients; bf16 frozen weights vs fp32 plain: 2e-2 relative on the loss, gradient cosine > 0.99.
"""

from functools import partial

import pytest
import torch

from models.fast import FastPath, cast_frozen, decoder_layers, resolve_fast_path
from models.fast_loss import chunked_lm_loss, install_chunked_loss
from recipes.llm_setup import prepare_llm
from recipes.objectives.compose import ObjectiveSet

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def batch_with_ignored_labels(vocab: int, seed: int = 0) -> dict:
    """B=3, T=12: prompts (-100), right padding (-100), one row with a single target."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (3, 12), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    attention_mask[2, 5:] = 0
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[attention_mask == 0] = -100
    labels[2, :4] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_lora_grads(llm, batch, autocast: bool = False):
    llm.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = llm(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in llm.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads


def build(tiny_lm_factory, kernels="plain", **fast):
    backbone = partial(tiny_lm_factory, hidden_size=32, num_layers=2, intermediate_size=64)
    settings = {"require_cuda": False, "compile": "none", "base_dtype": "fp32", **fast}
    torch.manual_seed(0)  # the same LoRA A init for every build
    llm, tokenizer = prepare_llm(backbone, ObjectiveSet(), LORA, kernels=kernels, fast=settings)
    torch.manual_seed(1)
    for name, param in llm.named_parameters():  # LoRA B starts at 0: make the gradients non-trivial
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    return llm, tokenizer


def test_chunked_loss_equals_transformers_loss_and_gradients(tiny_lm):
    model, _ = tiny_lm
    batch = batch_with_ignored_labels(model.config.vocab_size)
    hidden = model.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    hidden_ref = hidden.detach().requires_grad_(True)
    ref = model.loss_function(model.lm_head(hidden_ref), batch["labels"], model.config.vocab_size)
    ref.backward()
    hidden_new = hidden.detach().requires_grad_(True)
    new = chunked_lm_loss(hidden_new, model.lm_head, batch["labels"], chunk_tokens=5)  # 8 chunks
    new.backward()
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden_new.grad, hidden_ref.grad, rtol=1e-5, atol=1e-7)


def test_chunked_loss_is_per_instance(tiny_lm_factory):
    """A second model of the same class (a teacher) keeps its logits."""
    student, _ = tiny_lm_factory(hidden_size=32, intermediate_size=64)
    teacher, _ = tiny_lm_factory(hidden_size=32, intermediate_size=64)
    install_chunked_loss(student)
    batch = batch_with_ignored_labels(student.config.vocab_size)
    student.train(), teacher.train()
    assert student(**batch).logits is None
    assert teacher(**batch).logits.shape == (3, 12, teacher.config.vocab_size)
    student.eval()  # validation: full logits again
    assert student(**batch).logits is not None


def test_fast_path_fp32_matches_plain(tiny_lm_factory):
    plain, tokenizer = build(tiny_lm_factory, "plain")
    fast, _ = build(tiny_lm_factory, "fast", ce_chunk_tokens=7)
    batch = batch_with_ignored_labels(len(tokenizer))
    loss_p, grads_p = loss_and_lora_grads(plain, batch)
    loss_f, grads_f = loss_and_lora_grads(fast, batch)
    assert fast(**batch).logits is None  # the fast forward really ran
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    assert grads_f.keys() == grads_p.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-6)


def test_fast_path_bf16_base_weights_within_bf16_tolerance(tiny_lm_factory):
    plain, tokenizer = build(tiny_lm_factory, "plain")
    fast, _ = build(tiny_lm_factory, "fast", base_dtype="bf16")
    frozen = [p for p in fast.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in fast.parameters() if p.requires_grad)
    batch = batch_with_ignored_labels(len(tokenizer))
    loss_p, grads_p = loss_and_lora_grads(plain, batch)
    loss_f, grads_f = loss_and_lora_grads(fast, batch, autocast=True)
    assert abs(loss_f - loss_p) / loss_p < 2e-2
    flat_p = torch.cat([g.flatten() for g in grads_p.values()])
    flat_f = torch.cat([grads_f[n].flatten() for n in grads_p])
    assert torch.nn.functional.cosine_similarity(flat_p, flat_f, dim=0) > 0.99


def test_compiled_layers_match_eager(tiny_lm_factory):
    """Regional compilation (aot_eager on CPU: the same Dynamo/AOT graphs, no C++ build) changes nothing."""
    eager, tokenizer = build(tiny_lm_factory, "fast")
    compiled, _ = build(tiny_lm_factory, "fast", compile="layers", compile_backend="aot_eager")
    assert all(
        hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl
        for layer in decoder_layers(compiled)
    )
    batch = batch_with_ignored_labels(len(tokenizer))
    loss_e, grads_e = loss_and_lora_grads(eager, batch)
    loss_c, grads_c = loss_and_lora_grads(compiled, batch)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6)


def test_compiled_decoder_matches_eager_in_one_graph(tiny_lm_factory):
    """`compile: model`: the whole decoder is one Dynamo graph (no graph break) and computes the same loss
    and LoRA gradients as eager."""
    eager, tokenizer = build(tiny_lm_factory, "fast")
    compiled, _ = build(tiny_lm_factory, "fast", compile="model", compile_backend="aot_eager")
    from models.fast import decoder_model
    from models.packing import llm_inputs

    assert decoder_model(compiled)._compiled_call_impl is not None
    batch = batch_with_ignored_labels(len(tokenizer))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loss_e, grads_e = loss_and_lora_grads(eager, llm_inputs(batch))
    loss_c, grads_c = loss_and_lora_grads(compiled, llm_inputs(batch))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6)


def test_training_inputs_compile_one_graph_for_all_layers(tiny_lm_factory):
    """The recipe's inputs (models/packing.llm_inputs: use_cache=False) let every decoder layer reuse one
    compiled graph. With a KV cache built in the forward, Dynamo guards on each layer's cache slot and
    compiles a graph per layer (4 layers -> 5 graphs here; 30 on SmolLM2, minutes of compiling)."""
    from models.packing import llm_inputs

    backbone = partial(tiny_lm_factory, hidden_size=32, num_layers=4, intermediate_size=64)
    settings = {
        "require_cuda": False,
        "compile": "layers",
        "compile_backend": "aot_eager",
        "base_dtype": "fp32",
    }
    llm, tokenizer = prepare_llm(backbone, ObjectiveSet(), LORA, kernels="fast", fast=settings)
    batch = batch_with_ignored_labels(len(tokenizer))

    def graphs_for(inputs) -> int:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        llm(**inputs).loss.backward()
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]

    # layer 0's input does not require grad, layers 1-3's does: two variants of one graph
    assert graphs_for(llm_inputs(batch)) == 2
    assert graphs_for({**llm_inputs(batch), "use_cache": True}) > 2  # what the fix avoids


def test_lora_dropout_is_zero_on_fast_path(tiny_lm_factory):
    fast, _ = build(tiny_lm_factory, "fast", lora_dropout=0.0)
    dropouts = [m for n, m in fast.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(isinstance(m, torch.nn.Identity) for m in dropouts)


def test_fast_path_falls_back_to_plain_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_fast_path("fast", {}) is None
    assert resolve_fast_path("plain", {"require_cuda": False}) is None
    assert isinstance(resolve_fast_path("fast", {"require_cuda": False}), FastPath)
    with pytest.raises(ValueError, match="model.kernels"):
        resolve_fast_path("turbo", {})
    with pytest.raises(ValueError, match="unknown model.fast key"):
        resolve_fast_path("fast", {"require_cuda": False, "complie": "layers"})


def test_cast_frozen_keeps_trainable_fp32():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].requires_grad_(False)
    assert cast_frozen(model, torch.bfloat16) == 2
    assert model[0].weight.dtype == torch.float32 and model[1].weight.dtype == torch.bfloat16


def test_cross_entropy_choice(monkeypatch):
    from models import fast as fastpath

    settings = FastPath(require_cuda=False)
    monkeypatch.setattr(fastpath, "liger_available", lambda: False)
    assert fastpath.cross_entropy_mode(settings, needs_logits=False, trainable_tokens=False) == "chunked"
    assert fastpath.cross_entropy_mode(settings, needs_logits=True, trainable_tokens=False) == "none"
    monkeypatch.setattr(fastpath, "liger_available", lambda: True)
    assert fastpath.cross_entropy_mode(settings, False, False) == "liger"
    assert fastpath.cross_entropy_mode(settings, False, trainable_tokens=True) == "chunked"  # MEAP's row
    assert fastpath.cross_entropy_mode(settings, False, False, model_type="qwen2") == "chunked"
    assert fastpath.cross_entropy_mode(settings, False, False, hidden_size=576) == "chunked"  # SmolLM2
    assert fastpath.cross_entropy_mode(settings, False, False, hidden_size=2048) == "liger"  # 1B


def test_chunked_loss_compiles_its_softmax_where_asked(tiny_lm_factory, monkeypatch):
    """ce_compile: null = on only for >= 1024-wide models on CUDA; true / false as set; anything else is an error."""
    from models import fast as fastpath

    for ce_compile, expected in ((None, False), (True, True), (False, False)):
        llm, _ = build(tiny_lm_factory, "fast", fused_cross_entropy="chunked", ce_compile=ce_compile)
        assert llm.get_base_model()._unsink_ce_compile is expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto on a GPU: by width
    wide, narrow = torch.nn.Module(), torch.nn.Module()
    for model, width in ((wide, 2048), (narrow, 576)):
        model.model, model.lm_head = torch.nn.Identity(), torch.nn.Identity()
        model.config = type("Config", (), {"model_type": "llama", "hidden_size": width})()
        fastpath.apply_before_lora(model, FastPath(require_cuda=False, fused_cross_entropy="chunked"))
    assert wide._unsink_ce_compile is True and narrow._unsink_ce_compile is False
    with pytest.raises(ValueError, match="ce_compile must be null, true or false"):
        FastPath(ce_compile="yes")


def test_objective_that_reads_logits_gets_them(tiny_lm_factory):
    """LeaF reads the student logits: the fast path keeps them (and pays for them)."""
    from recipes.objectives.base import Objective

    class ReadsLogits(Objective):
        needs_logits = True

    backbone = partial(tiny_lm_factory, hidden_size=32, num_layers=2, intermediate_size=64)
    fast = {"require_cuda": False, "compile": "none"}
    objectives = ObjectiveSet({"reads": ReadsLogits()})
    llm, tokenizer = prepare_llm(backbone, objectives, LORA, kernels="fast", fast=fast)
    batch = batch_with_ignored_labels(len(tokenizer))
    assert llm(**batch).logits.shape == (3, 12, len(tokenizer))


def test_chunked_loss_with_inputs_embeds(tiny_lm_factory):
    """The AVSR recipe feeds embeddings, not ids: the chunked loss takes them too."""
    model, tokenizer = tiny_lm_factory(hidden_size=32, intermediate_size=64)
    batch = batch_with_ignored_labels(len(tokenizer))
    embeds = model.get_input_embeddings()(batch["input_ids"])
    inputs = {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    model.train()
    ref = model(**inputs).loss
    install_chunked_loss(model, chunk_tokens=5)
    out = model(**inputs)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape_name", ["demo", "paper", "tiny"])
def test_benchmark_builds_every_avsr_shape_with_a_tokenizer(shape_name, tiny_lm_factory, tmp_path):
    """benchmarks/fast_path.py avsr --tokenizer: each shape's LLM builds (on the meta device, no memory), with
    the shape's vocab or else the tokenizer's length (the demo row once raised KeyError: 'vocab_size')."""
    from benchmarks.fast_path import AVSR_SHAPES, random_llama

    _, tokenizer = tiny_lm_factory()
    tokenizer.save_pretrained(tmp_path)
    _, llm_shape = AVSR_SHAPES[shape_name]
    model, loaded = random_llama(llm_shape, str(tmp_path), "meta", "bf16")
    assert model.config.vocab_size == (llm_shape["vocab_size"] or len(loaded))
    assert model.config.num_hidden_layers == llm_shape["num_layers"]
    if shape_name == "demo":
        assert model.config.vocab_size == 49152  # SmolLM2's vocabulary


def test_benchmark_row_that_times_out_becomes_an_error_row(tmp_path):
    """A train.py row past its limit (a long compile) is recorded as an error with its output tail, and the
    benchmark goes on to the next row instead of dying on subprocess.TimeoutExpired."""
    from benchmarks.fast_path import train_py

    row = train_py(["experiment=lm_sft", "debug=smoke"], tmp_path / "never.json", timeout=1)
    assert row["error"].startswith("timed out after 1 s")
    assert row["wall_s"] >= 1 and row["command"].startswith("python train.py experiment=lm_sft")


def test_benchmark_rows_name_the_guard_behind_a_recompile(tmp_path):
    """Rows run with TORCH_LOGS=recompiles, and `recompile_reasons` keeps what recompiled and why (a real
    recompile here: a static-shape compile called with a second shape)."""
    import sys

    from benchmarks.fast_path import recompile_reasons, run_in_group

    script = tmp_path / "recompile.py"
    script.write_text(
        "import torch\n"
        "f = torch.compile(lambda x: x * 2, backend='eager', dynamic=False)\n"
        "f(torch.ones(3)); f(torch.ones(4))\n"
    )
    proc = run_in_group([sys.executable, str(script)], timeout=120)
    reasons = recompile_reasons(proc.stderr)
    assert proc.returncode == 0 and reasons[0].startswith(" Recompiling function")
    assert any("size mismatch" in line and "expected 3, actual 4" in line for line in reasons)
    assert recompile_reasons("no torch logs here\n") == []


def test_a_row_killed_by_a_signal_says_which(tmp_path, monkeypatch):
    """A row whose process dies from a signal (a native crash: no traceback) records its exit status in
    words beside the output tail, so the table tells a crash from a Python error."""
    import subprocess

    import benchmarks.fast_path as fast_path

    crashed = subprocess.CompletedProcess(["train.py"], -11, "", "last log line\n")
    monkeypatch.setattr(fast_path, "run_in_group", lambda command, timeout: crashed)
    row = fast_path.train_py(["experiment=lm_sft"], tmp_path / "never.json", timeout=5)
    assert row["returncode"] == "-11 (SIGSEGV)" and row["error"].endswith("last log line\n")
    assert fast_path.exit_status(1) == "1" and fast_path.exit_status(-999) == "-999"


def test_packing_rows_compare_flex_attention_on_the_gpu_only():
    """The packing section adds packed rows with flex attention (a block mask that skips the blocks across
    documents) beside SDPA's dense mask, at each packed row length; the tiny CPU check leaves flex out (it
    has no CPU backward)."""
    from types import SimpleNamespace

    from benchmarks.fast_path import packing_modes

    gpu = SimpleNamespace(tiny=False, pack_attn="sdpa,flex_attention")
    assert packing_modes(gpu, [None, 512]) == [
        ("padded", "sdpa", None),
        ("packed", "sdpa", None),
        ("packed", "flex_attention", None),
        ("packed", "sdpa", 512),
        ("packed", "flex_attention", 512),
    ]
    assert packing_modes(SimpleNamespace(tiny=True, pack_attn="sdpa,flex_attention"), [None]) == [
        ("padded", "sdpa", None),
        ("packed", "sdpa", None),
    ]
