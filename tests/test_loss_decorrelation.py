"""bos_decorrelation_loss against a Python-loop float64 reference, gradients and edge cases."""

import pytest
import torch

from losses.decorrelation import bos_cosines, bos_decorrelation_loss


def reference(hidden_states, token_mask, layers=None, margin=0.0):
    layers = list(range(1, len(hidden_states) - 1)) if layers is None else list(layers)
    per_layer = []
    for index in layers:
        h = hidden_states[index].double()
        total, count = 0.0, 0
        for b in range(h.shape[0]):
            for t in range(1, h.shape[1]):
                if token_mask[b, t]:
                    cos = torch.dot(h[b, 0], h[b, t]) / (h[b, 0].norm() * h[b, t].norm())
                    total += max(float(cos) ** 2 - margin, 0.0)
                    count += 1
        per_layer.append(total / count if count else 0.0)
    return sum(per_layer) / len(per_layer)


def random_states(layers=4, batch=3, length=7, dim=5, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, length, dim, generator=gen).to(dtype) for _ in range(layers + 1))


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_matches_reference_with_padding(margin):
    states = random_states()
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False  # padding
    mask[2, :3] = False
    value = bos_decorrelation_loss(states, mask, margin=margin)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference(states, mask, margin=margin), rel=1e-5)


def test_position_zero_never_counts_and_layer_subset():
    states = random_states()
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[:, 0] = True
    mask[0, 2] = True
    value = bos_decorrelation_loss(states, mask, layers=[2])
    h = states[2][0].double()
    expected = (torch.dot(h[0], h[2]) / (h[0].norm() * h[2].norm())) ** 2
    assert value.item() == pytest.approx(float(expected), rel=1e-5)


def test_default_layers_exclude_embeddings_and_final_state():
    states = list(random_states(layers=3))
    mask = torch.ones(3, 7, dtype=torch.bool)
    base = bos_decorrelation_loss(states, mask)
    states[0] = states[0] * 0 + 1.0  # changing excluded layers changes nothing
    states[3] = torch.randn_like(states[3])
    assert bos_decorrelation_loss(states, mask).item() == pytest.approx(base.item())


def test_batch_of_one_single_layer():
    states = random_states(layers=2, batch=1)
    mask = torch.ones(1, 7, dtype=torch.bool)
    assert bos_decorrelation_loss(states, mask).item() == pytest.approx(reference(states, mask), rel=1e-5)


def test_everything_masked_is_zero_with_gradient():
    states = tuple(s.requires_grad_() for s in random_states())
    value = bos_decorrelation_loss(states, torch.zeros(3, 7, dtype=torch.bool))
    assert value.item() == 0.0 and not torch.isnan(value)
    value.backward()
    assert all(torch.isfinite(s.grad).all() for s in states[1:3])


def test_orthogonal_is_zero_and_parallel_is_one():
    h = torch.zeros(1, 3, 4)
    h[0, 0, 0] = 2.0
    h[0, 1, 1] = 1.0  # orthogonal to BOS
    h[0, 2, 0] = -3.0  # anti-parallel: cos^2 = 1 (squared cosine, not anti-alignment)
    states = (h, h, h)
    assert bos_decorrelation_loss(states, torch.tensor([[True, True, False]])).item() == pytest.approx(0.0)
    assert bos_decorrelation_loss(states, torch.tensor([[True, False, True]])).item() == pytest.approx(1.0)


def test_gradcheck_flows_into_bos_and_tokens():
    states = tuple(s.double().requires_grad_() for s in random_states(layers=2, batch=2, length=4, dim=3))
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda *h: bos_decorrelation_loss(h, mask, margin=0.05), states)
    bos_decorrelation_loss(states, mask).backward()
    assert states[1].grad[:, 0].abs().sum() > 0  # BOS is not detached


def test_bf16_inputs_close_to_fp32():
    states = random_states(dim=64, length=16)
    mask = torch.ones(3, 16, dtype=torch.bool)
    full = bos_decorrelation_loss(states, mask)
    half = bos_decorrelation_loss(tuple(s.bfloat16() for s in states), mask)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=3e-2)
    assert bos_cosines(states).shape == (3, 3, 16)


def test_fp16_massive_bos_does_not_overflow():
    """SmolLM2-like states in fp16: BOS feature near 24,500 and tokens sharing it, so |h0|.|ht| >> 65504."""
    torch.manual_seed(0)
    b, t, d = 2, 6, 64
    states = torch.randn(3, b, t, d, dtype=torch.float64)
    states[:, :, :, 7] += torch.linspace(300.0, 24500.0, t, dtype=torch.float64)  # massive feature 7
    reference = bos_cosines([s for s in states])  # float64, layer 1 only (tuple of 3 -> layers 1..1)
    half = [s.half().requires_grad_() for s in states]
    cos = bos_cosines(half)
    assert cos.dtype == torch.float32 and torch.isfinite(cos).all()
    torch.testing.assert_close(cos.double(), reference, atol=2e-3, rtol=0)
    loss = bos_decorrelation_loss(half, torch.ones(b, t, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(half[1].grad).all()


def test_compiled_loss_equals_eager_loss_and_gradients_at_two_lengths():
    """objective.decorr.compile: torch.compile (CPU Inductor here, dynamic shapes) gives the eager loss and
    gradients, with padding and a margin, for two batch shapes (the second reuses the dynamic graph)."""
    from models.compiled import compile_once

    for length, seed in ((7, 0), (11, 1)):
        states = random_states(length=length, seed=seed)
        mask = torch.ones(3, length, dtype=torch.bool)
        mask[1, length - 3 :] = False  # padding
        results = []
        for loss_fn in (bos_decorrelation_loss, compile_once(bos_decorrelation_loss, dynamic=True)):
            leaves = tuple(h.clone().requires_grad_(True) for h in states)
            loss = loss_fn(leaves, mask, [1, 2, 3], 0.05)
            loss.backward()
            results.append((loss.detach(), [h.grad for h in leaves[1:4]]))
        (eager, eager_grads), (compiled, compiled_grads) = results
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-7)
        assert float(eager) > 0
        for got, want in zip(compiled_grads, eager_grads):
            assert want.abs().sum() > 0
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
