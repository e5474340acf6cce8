"""models/fused_linear_ce.py: the loss and gradients of the LM head + CE computed in the forward pass equal
plain autograd over full logits (ignored labels, chunks that do not divide N, trainable head rows), and
the chunked loss takes that path exactly when the head is frozen.

Tolerances: fp32 1e-5 relative (loss) and 1e-4 (gradients); bf16 weights 2e-2 and gradient cosine > 0.999.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import fast_loss
from models.fused_linear_ce import FusedLinearCrossEntropy, fused_linear_cross_entropy
from models.trainable_tokens import use_row_sparse_trainable_tokens
from tests.test_trainable_tokens import _tiny_tied_lm


def _problem(dtype=torch.float32, n=37, d=16, v=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = (torch.randn(v, d, generator=gen) / d**0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::3] = -100  # prompts and padding
    rows = torch.tensor([v - 1, 7])
    delta = torch.randn(2, d, generator=gen) / d**0.5  # fp32 master weights, as under LoRA
    return hidden, weight, labels, rows, delta


def _reference(hidden, weight, labels, rows=None, delta=None):
    w = weight if rows is None else weight.index_copy(0, rows, delta.to(weight.dtype))
    logits = (hidden @ w.t()).float()
    return F.cross_entropy(logits, labels, ignore_index=-100)


@pytest.mark.parametrize("trainable_rows", [False, True])
@pytest.mark.parametrize("chunk", [5, 64])
def test_fused_loss_and_gradients_equal_full_logits(trainable_rows, chunk):
    hidden, weight, labels, rows, delta = _problem()
    rows, delta = (rows, delta) if trainable_rows else (None, None)
    h_ref = hidden.clone().requires_grad_(True)
    d_ref = None if delta is None else delta.clone().requires_grad_(True)
    ref = _reference(h_ref, weight, labels, rows, d_ref)
    ref.backward()
    h_new = hidden.clone().requires_grad_(True)
    d_new = None if delta is None else delta.clone().requires_grad_(True)
    new = fused_linear_cross_entropy(h_new, weight, labels, chunk, rows, d_new)
    (2.5 * new).backward()  # backward scales by the upstream gradient
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_new.grad, 2.5 * h_ref.grad, rtol=1e-4, atol=1e-7)
    if trainable_rows:
        assert d_new.grad.abs().sum() > 0 and d_new.grad.dtype == torch.float32
        torch.testing.assert_close(d_new.grad, 2.5 * d_ref.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_softmax_rows_give_the_eager_loss_and_gradients(dtype):
    """`compile_rows=True` (torch.compile of the per-chunk softmax; CPU Inductor here): the eager values, with
    chunks of two lengths (37 = 7 x 5 + 2: the remainder compiles once more), trainable rows and ignored labels."""
    hidden, weight, labels, rows, delta = _problem(dtype)
    results = []
    for compile_rows in (False, True):
        h = hidden.clone().requires_grad_(True)
        d = delta.clone().requires_grad_(True)
        loss = fused_linear_cross_entropy(h, weight, labels, 5, rows, d, compile_rows=compile_rows)
        loss.backward()
        results.append((loss, h.grad, d.grad))
    (eager_loss, eager_h, eager_d), (loss, grad_h, grad_d) = results
    from models.compiled import is_compiled
    from models.fused_linear_ce import softmax_rows

    assert is_compiled(softmax_rows)  # the compiled function was built and used
    assert grad_h.dtype == dtype and grad_h.abs().sum() > 0
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(loss, eager_loss, **tol)
    torch.testing.assert_close(grad_h, eager_h, **tol)
    torch.testing.assert_close(grad_d, eager_d, **tol)


def test_fused_loss_in_bf16_within_rounding():
    hidden, weight, labels, rows, delta = _problem(torch.bfloat16)
    h_ref = hidden.float().requires_grad_(True)
    ref = _reference(h_ref, weight.float(), labels, rows, delta)
    ref.backward()
    h_new = hidden.clone().requires_grad_(True)
    new = fused_linear_cross_entropy(h_new, weight, labels, 8, rows, delta.requires_grad_(True))
    new.backward()
    assert h_new.grad.dtype == torch.bfloat16
    torch.testing.assert_close(new, ref, rtol=2e-2, atol=1e-3)
    cosine = F.cosine_similarity(h_new.grad.float().flatten(), h_ref.grad.flatten(), dim=0)
    assert cosine > 0.999


def test_no_targets_gives_zero_and_zero_gradient():
    hidden, weight, labels, _, _ = _problem()
    labels[:] = -100
    h = hidden.requires_grad_(True)
    loss = fused_linear_cross_entropy(h, weight, labels, 8)
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().sum() == 0


def test_refuses_a_trainable_head_weight():
    hidden, weight, labels, _, _ = _problem()
    with pytest.raises(ValueError, match="frozen"):
        fused_linear_cross_entropy(hidden, weight.requires_grad_(True), labels)


def _count_fused(monkeypatch):
    calls = []
    original = FusedLinearCrossEntropy.apply
    monkeypatch.setattr(
        FusedLinearCrossEntropy, "apply", lambda *a: calls.append(1) or original(*a), raising=True
    )
    return calls


def test_chunked_loss_takes_the_fused_path_only_for_a_frozen_head(tiny_lm, monkeypatch):
    model, _ = tiny_lm
    calls = _count_fused(monkeypatch)
    hidden = torch.randn(2, 6, model.config.hidden_size, requires_grad=True)
    labels = torch.randint(0, model.config.vocab_size, (2, 6))
    fast_loss.chunked_lm_loss(hidden, model.lm_head, labels, 4).backward()
    assert calls == []  # the tiny model's head trains: checkpointed chunks
    model.lm_head.weight.requires_grad_(False)
    fast_loss.chunked_lm_loss(hidden, model.lm_head, labels, 4).backward()
    assert calls == [1]
    with torch.no_grad():  # validation: no gradient to compute in the forward pass
        fast_loss.chunked_lm_loss(hidden, model.lm_head, labels, 4)
    assert calls == [1]


def test_chunked_loss_with_trainable_tokens_on_a_tied_head(tiny_lm_factory, monkeypatch):
    """MEAP's case: peft's trainable tokens on a tied head (row-sparse): the fused path runs and gives the
    loss and the delta's gradient of the full-logits forward."""
    model, new_id = _tiny_tied_lm(tiny_lm_factory)
    use_row_sparse_trainable_tokens(model)
    causal_lm = model.base_model.model
    ids = torch.tensor([[1, 5, 7, new_id, 9, new_id, 4], [3, 4, new_id, 5, 2, 2, 8]])
    labels = ids.clone()
    labels[:, :2] = -100
    delta = next(p for n, p in model.named_parameters() if "trainable_tokens_delta" in n)

    def loss_and_delta_grad(fused: bool):
        model.zero_grad()
        hidden = causal_lm.model(input_ids=ids).last_hidden_state
        if fused:
            loss = fast_loss.chunked_lm_loss(hidden, causal_lm.lm_head, labels, 5)
        else:
            loss = causal_lm.loss_function(causal_lm.lm_head(hidden), labels, causal_lm.config.vocab_size)
        loss.backward()
        return loss.detach(), delta.grad.clone()

    ref_loss, ref_grad = loss_and_delta_grad(False)
    calls = _count_fused(monkeypatch)
    loss, grad = loss_and_delta_grad(True)
    assert calls == [1]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compile_rows", [False, True])
def test_loss_without_gradients_equals_full_logits(compile_rows):
    """Inputs that need no gradient take the loss-only pass (no [c,V] gradient made), eager or compiled."""
    hidden, weight, labels, _, _ = _problem()
    loss = fused_linear_cross_entropy(hidden, weight, labels, 5, compile_rows=compile_rows)
    torch.testing.assert_close(loss, _reference(hidden, weight, labels), rtol=1e-5, atol=1e-6)
