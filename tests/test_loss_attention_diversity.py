"""attention_diversity_loss: reference ADL (non-causal), the causal variant, padding, and the tiny model."""

import pytest
import torch

from losses.attention_diversity import attention_diversity_loss
from models.attention_capture import QueryKeyCapture, sampled_attention_probs


def cosine(a, b):
    na, nb = max(a.norm().item(), 1e-8), max(b.norm().item(), 1e-8)
    return float(torch.dot(a, b)) / (na * nb)


def reference_adl(probs, threshold=2.0):
    """TAPADL for one layer, literally: Python loops, float64, fixed tau = threshold / N."""
    p = probs.double().mean(1)  # [B,N,N]
    batch, rows, keys = p.shape
    tau = threshold / keys
    total = 0.0
    for b in range(batch):
        mean_row = p[b].mean(0)
        mean_hat = mean_row * (mean_row > tau)
        for i in range(rows):
            total += cosine(mean_hat, p[b, i] * (p[b, i] > tau))
    return total / (batch * rows)


def reference_causal(probs, positions, threshold=2.0, key_padding_mask=None):
    """The documented causal variant, literally (loops, float64)."""
    p = probs.double().mean(1)
    batch, rows, keys = p.shape
    real = torch.ones(batch, keys, dtype=torch.bool) if key_padding_mask is None else key_padding_mask.bool()
    total, count = 0.0, 0
    for b in range(batch):
        visible = [[k for k in range(keys) if k <= positions[i] and real[b, k]] for i in range(rows)]
        valid = [
            i for i in range(rows) if real[b, positions[i]] and len(visible[i]) >= 2 and p[b, i].sum() > 0
        ]
        if not valid:
            continue
        mean_row = sum(p[b, i] for i in valid) / len(valid)
        for i in valid:
            idx = torch.tensor(visible[i])
            tau = threshold / len(idx)
            m = mean_row[idx] / mean_row[idx].sum()
            a = p[b, i, idx]
            if tau >= 1:  # no probability can pass: not counted
                continue
            total += cosine(m * (m > tau), a * (a > tau))
            count += 1
    return total / count if count else 0.0


def random_probs(batch=2, heads=3, rows=6, keys=6, causal=False, seed=0, sink=0.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, heads, rows, keys, generator=gen) * 2
    logits[..., 0] += sink
    if causal:
        hidden = torch.arange(keys)[None, :] > torch.arange(rows)[:, None]
        logits = logits.masked_fill(hidden, float("-inf"))
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("batch", [1, 3])
def test_non_causal_all_rows_equals_reference(batch):
    probs = random_probs(batch=batch, rows=8, keys=8)
    value = attention_diversity_loss(probs, causal=False)
    assert value.item() == pytest.approx(reference_adl(probs), rel=1e-5)


def test_causal_matches_loop_reference_with_padding_and_sampling():
    probs = random_probs(batch=3, rows=9, keys=9, causal=True, sink=2.0)
    pad = torch.ones(3, 9, dtype=torch.bool)
    pad[1, 6:] = False
    probs = probs * pad[:, None, None, :]
    probs = probs / probs.sum(-1, keepdim=True)
    assert attention_diversity_loss(probs).item() == pytest.approx(
        reference_causal(probs, list(range(9))), rel=1e-5
    )
    assert attention_diversity_loss(probs, key_padding_mask=pad).item() == pytest.approx(
        reference_causal(probs, list(range(9)), key_padding_mask=pad), rel=1e-5
    )
    positions = torch.tensor([7, 2, 5, 8])
    rows = probs[:, :, positions]
    assert attention_diversity_loss(
        rows, query_positions=positions, key_padding_mask=pad
    ).item() == pytest.approx(reference_causal(rows, positions.tolist(), key_padding_mask=pad), rel=1e-5)


def test_edges_empty_rows_single_key_and_identical_rows():
    empty = torch.zeros(1, 2, 3, 5)
    assert attention_diversity_loss(empty).item() == 0.0
    assert attention_diversity_loss(empty, causal=False).item() == 0.0
    only_first = random_probs(batch=1, rows=1, keys=4, causal=True)  # row 0 sees one key: skipped
    assert attention_diversity_loss(only_first).item() == 0.0
    same = torch.full((2, 2, 4, 4), 0.25)
    assert attention_diversity_loss(same, threshold=0.5, causal=False).item() == pytest.approx(1.0)
    assert attention_diversity_loss(same, causal=False).item() == 0.0  # uniform rows fall below 2/N


def test_sink_pattern_scores_higher_than_diverse_attention():
    sink = random_probs(rows=16, keys=16, causal=True, sink=8.0)
    diverse = random_probs(rows=16, keys=16, causal=True, sink=0.0, seed=3)
    assert attention_diversity_loss(sink) > attention_diversity_loss(diverse)


def test_gradcheck_both_modes():
    logits = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([1, 2, 3, 3])
    causal_mask = torch.arange(4)[None, :] > positions[:, None]

    def causal_loss(x):
        return attention_diversity_loss(
            torch.softmax(x.masked_fill(causal_mask, -1e9), -1), 0.5, query_positions=positions
        ).double()

    assert torch.autograd.gradcheck(
        lambda x: attention_diversity_loss(torch.softmax(x, -1), 1.0, False).double(), (logits,)
    )
    assert torch.autograd.gradcheck(causal_loss, (logits,))


def test_sampled_probs_equal_eager_probs_on_tiny_model(tiny_lm_factory):
    model, _ = tiny_lm_factory(attn_implementation="sdpa")
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    positions = torch.tensor([3, 11, 6, 1, 8])
    with torch.no_grad(), QueryKeyCapture(model) as captured:
        model(input_ids=ids, attention_mask=mask)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(captured) == len(eager) == 2
    real_rows = mask.bool()  # [B,T]: eager's rows of padded queries are not defined the same way
    for layer, probs in enumerate(eager):
        all_rows = sampled_attention_probs(captured[layer], torch.arange(12), mask)
        sampled = sampled_attention_probs(captured[layer], positions, mask)
        # the recomputed probabilities themselves equal eager attention's, row by row
        for b in range(2):
            torch.testing.assert_close(
                all_rows[b][:, real_rows[b]], probs[b][:, real_rows[b]], atol=1e-5, rtol=1e-4
            )
        torch.testing.assert_close(sampled[0], probs[0][:, positions], atol=1e-5, rtol=1e-4)
        kwargs = {"key_padding_mask": mask}
        expected = attention_diversity_loss(probs, **kwargs)
        assert attention_diversity_loss(all_rows, **kwargs).item() == pytest.approx(expected.item(), rel=1e-4)
        expected_rows = attention_diversity_loss(probs[:, :, positions], query_positions=positions, **kwargs)
        got_rows = attention_diversity_loss(sampled, query_positions=positions, **kwargs)
        assert got_rows.item() == pytest.approx(expected_rows.item(), rel=1e-4)


def test_rows_that_cannot_pass_their_threshold_do_not_dilute_the_mean():
    """Threshold 2: the row at position 1 sees 2 keys, tau = 1, and no probability can exceed 1."""
    probs = torch.zeros(1, 1, 2, 8)
    probs[0, 0, 0, :2] = 0.5  # row at position 1
    probs[0, 0, 1, 0], probs[0, 0, 1, 1:] = 0.9, 0.1 / 7  # row at position 7, a BOS sink
    positions = torch.tensor([1, 7])
    mean_row = probs[0, 0].mean(0)  # both rows make the mean row; row 7 sees every key (sum 1)
    tau = 2.0 / 8
    by_hand = cosine(mean_row * (mean_row > tau), probs[0, 0, 1] * (probs[0, 0, 1] > tau))
    value = attention_diversity_loss(probs, query_positions=positions)
    assert value.item() == pytest.approx(by_hand, rel=1e-6)  # not by_hand / 2
    assert attention_diversity_loss(probs[:, :, :1], query_positions=positions[:1]).item() == 0.0


@pytest.mark.parametrize("compiled", [False, True])
def test_head_mean_probs_give_the_same_loss_and_gradients(tiny_lm_factory, compiled):
    """ADL reads the mean over heads (models/attention_capture.sampled_head_mean_probs); compiled (Inductor
    fuses the fp32 [B,H,S,K] passes, `objective.adl.compile=true`) or not, the loss and the gradients of the
    captured queries and keys equal those through the per-head probabilities."""
    from models.attention_capture import sampled_head_mean_probs

    model, _ = tiny_lm_factory(attn_implementation="sdpa")
    with torch.no_grad():  # peaked attention, so entries pass ADL's threshold and gradients are non-zero
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(8)
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    positions = torch.tensor([1, 3, 6, 8, 11])
    with QueryKeyCapture(model) as captured:
        model(input_ids=ids, attention_mask=mask)
    grads = []
    for head_mean in (False, True):
        model.zero_grad()
        loss = 0
        for layer in sorted(captured):
            if head_mean:
                probs = sampled_head_mean_probs(captured[layer], positions, mask, compiled=compiled)
                assert probs.shape == (2, 1, 5, 12)
            else:
                probs = sampled_attention_probs(captured[layer], positions, mask)
            loss = loss + attention_diversity_loss(probs, query_positions=positions, key_padding_mask=mask)
        params = [p for p in model.parameters() if p.requires_grad]
        # the first pass keeps the shared forward for the second (a compiled backward cannot retain its graph)
        grad = torch.autograd.grad(loss, params, retain_graph=not head_mean, allow_unused=True)
        grads.append((loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grad)]))
    (ref_loss, ref_grads), (loss, got_grads) = grads
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in got_grads)
    for got, ref in zip(got_grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
