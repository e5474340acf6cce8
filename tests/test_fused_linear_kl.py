"""models/fused_linear_kl.py and LeaF's fused path: the same KL and gradients as full logits, none made."""

from functools import partial

import pytest
import torch

from losses.leaf import distillation_loss
from models.causal_lm import build_tiny_llama
from models.fused_linear_kl import fused_linear_kl
from models.layer_subset import build_layer_subset
from recipes.objectives.base import ObjectiveContext
from recipes.objectives.leaf import LeafDistillationObjective
from tests.test_objectives_training import sft_batch

TINY = partial(build_tiny_llama, special_tokens={"eos_token": "<|im_end|>"}, num_layers=3, vocab_size=4096)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_equals_the_full_logits_kl_and_its_gradient(temperature):
    """fp64, a teacher head with more rows than the student's vocabulary, chunks smaller than the rows."""
    torch.manual_seed(0)
    b, t, d, d_teacher, v, v_teacher = 2, 9, 16, 24, 50, 56
    hidden = torch.randn(b, t, d, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(b, t, d_teacher, dtype=torch.float64)
    weight = torch.randn(v, d, dtype=torch.float64)
    teacher_weight = torch.randn(v_teacher, d_teacher, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t))
    labels[0, :4] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    reference = distillation_loss(hidden @ weight.t(), teacher_hidden @ teacher_weight.t(), labels,
                                  temperature, reduction="sum")  # fmt: skip
    (grad_reference,) = torch.autograd.grad(reference, hidden)
    counted = labels[:, 1:] != -100
    fused = fused_linear_kl(hidden[:, :-1][counted], weight, teacher_hidden[:, :-1][counted], teacher_weight,
                            temperature, chunk_tokens=4)  # fmt: skip
    (grad_fused,) = torch.autograd.grad(fused, hidden)
    assert torch.allclose(fused, reference, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad_fused, grad_reference, rtol=1e-9, atol=1e-12)
    assert grad_fused[:, -1].abs().sum() == 0  # the last position never counts


def test_compiled_rows_give_the_eager_kl_and_gradient():
    """compile_rows=True (objective.leaf.compile; CPU Inductor here): the eager values, chunks of two lengths."""
    torch.manual_seed(1)
    n, d, v = 11, 16, 50
    hidden = torch.randn(n, d)
    teacher_hidden, weight, teacher_weight = (
        torch.randn(n, 24),
        torch.randn(v, d) / 4,
        torch.randn(56, 24) / 5,
    )
    results = []
    for compile_rows in (False, True):
        h = hidden.clone().requires_grad_(True)
        loss = fused_linear_kl(h, weight, teacher_hidden, teacher_weight, 2.0, 4, compile_rows=compile_rows)
        (grad,) = torch.autograd.grad(loss, h)
        results.append((loss, grad))
    (eager, eager_grad), (compiled, compiled_grad) = results
    from models.compiled import is_compiled
    from models.fused_linear_kl import kl_rows

    assert is_compiled(kl_rows) and float(eager.detach()) > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)


def test_refuses_trainable_heads_and_a_smaller_teacher_vocabulary():
    h, w = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="frozen"):
        fused_linear_kl(h, w.requires_grad_(), h, torch.randn(10, 4))
    with pytest.raises(ValueError, match="smaller than the student"):
        fused_linear_kl(h, torch.randn(10, 4), h, torch.randn(8, 4))


def _student_context(objective_fused: bool, compile: bool = False):
    """A 2-of-3-layer student (frozen head) beside its 3-layer teacher; one forward as the recipe does it."""
    torch.manual_seed(0)
    student, tokenizer = build_layer_subset(backbone=TINY, layers=[0, 2])
    student.get_output_embeddings().weight.requires_grad_(False)
    torch.manual_seed(0)
    leaf = LeafDistillationObjective(teacher=TINY, teacher_dtype="fp32", temperature=2.0, fused=objective_fused,
                                     chunk_tokens=16, compile=compile)  # fmt: skip
    leaf.setup(student, tokenizer)
    batch = sft_batch(tokenizer)
    outputs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=leaf.needs_hidden_states)  # fmt: skip
    ctx = ObjectiveContext(
        batch=batch, logits=outputs.logits, hidden_states=outputs.hidden_states, model=student
    )
    return student, leaf, ctx


@pytest.mark.parametrize("compile", [False, True])
def test_leaf_fused_path_gives_the_reference_loss_and_gradients(compile):
    """The objective's fused path (hidden states, no logits read; its rows compiled or not) against its
    full-logits path, on the same student and teacher: the same summed KL and the same gradient on every
    trainable student weight."""
    results = {}
    for fused in (False, True):
        student, leaf, ctx = _student_context(fused, compile and fused)
        assert leaf.needs_logits is not fused and leaf.needs_hidden_states is fused
        if fused:
            ctx.logits = None  # the fast path makes none: the fused path must not need them
        loss = leaf.loss(ctx)
        params = [p for p in student.parameters() if p.requires_grad]
        results[fused] = (loss.detach(), torch.autograd.grad(loss, params))
    (loss_ref, grads_ref), (loss_fused, grads_fused) = results[False], results[True]
    assert torch.allclose(loss_fused, loss_ref, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads_fused, grads_ref))


def test_leaf_fused_path_without_a_frozen_head_or_logits_names_the_switch():
    student, leaf, ctx = _student_context(True)
    student.get_output_embeddings().weight.requires_grad_(True)  # a trainable head: no fused KL
    ctx.logits = None
    with pytest.raises(ValueError, match="objective.leaf.fused=false"):
        leaf.loss(ctx)
