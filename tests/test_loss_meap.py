"""meap_mask: exact counts, eligibility, SFT labels, reproducibility, no in-place edits."""

import pytest
import torch

from losses.meap import meap_mask

MASK = 999


def expected_mask_count(n_eligible: int, ratio: float) -> int:
    """The documented count, written independently of the code: max(1, floor(ratio * n)), 0 when n = 0."""
    return 0 if n_eligible == 0 else min(n_eligible, max(1, int(n_eligible * ratio)))


def batch():
    ids = torch.arange(1, 41).reshape(2, 20)
    labels = ids.clone()
    labels[0, :6] = -100  # prompt
    labels[1, 15:] = -100  # padding
    return ids, labels


@pytest.mark.parametrize("ratio", [0.0, 0.15, 0.5, 1.0])
def test_pretrain_exact_count_and_eligibility(ratio):
    ids, labels = batch()
    ids0, labels0 = ids.clone(), labels.clone()
    out_ids, out_labels = meap_mask(ids, labels, MASK, ratio, "pretrain", torch.Generator().manual_seed(0))
    assert torch.equal(ids, ids0) and torch.equal(labels, labels0)  # not in place
    assert torch.equal(out_labels, labels)
    masked = out_ids == MASK
    for b in range(2):
        eligible = [t for t in range(1, 20) if labels[b, t] != -100]
        assert masked[b].sum().item() == expected_mask_count(len(eligible), ratio)
        assert all(t in eligible for t in masked[b].nonzero().flatten().tolist())
    assert torch.equal(out_ids[~masked], ids[~masked])


def test_sft_labels_only_at_masked_positions():
    ids, labels = batch()
    out_ids, out_labels = meap_mask(ids, labels, MASK, 0.3, "sft", torch.Generator().manual_seed(1))
    masked = out_ids == MASK
    assert masked[0, :6].sum() == 0  # the prompt is never masked
    assert masked[0].sum() == 4  # floor(0.3 * 14)
    assert torch.equal(out_labels[masked], ids[masked])
    assert (out_labels[~masked] == -100).all()


def test_reproducible_and_fresh_draws():
    ids, labels = batch()
    a = meap_mask(ids, labels, MASK, 0.3, "pretrain", torch.Generator().manual_seed(5))[0]
    b = meap_mask(ids, labels, MASK, 0.3, "pretrain", torch.Generator().manual_seed(5))[0]
    gen = torch.Generator().manual_seed(5)
    first = meap_mask(ids, labels, MASK, 0.3, "pretrain", gen)[0]
    second = meap_mask(ids, labels, MASK, 0.3, "pretrain", gen)[0]
    assert torch.equal(a, b) and torch.equal(a, first)
    assert not torch.equal(first, second)


def test_rows_without_eligible_positions_are_left_alone_and_min_one():
    ids = torch.arange(10).reshape(2, 5)
    labels = torch.full_like(ids, -100)
    labels[1, 3] = 7
    for mode in ("pretrain", "sft"):
        out_ids, out_labels = meap_mask(ids, labels, MASK, 0.1, mode)
        assert torch.equal(out_ids[0], ids[0]) and (out_labels[0] == -100).all()
        assert out_ids[1, 3] == MASK and (out_ids[1] == MASK).sum() == 1  # max(1, floor(0.1 * 1))
    assert meap_mask(ids, labels, MASK, 0.1, "sft")[1][1, 3] == 7


def test_position_zero_and_batch_of_one():
    ids = torch.arange(1, 6)[None]
    out_ids, _ = meap_mask(ids, ids.clone(), MASK, 1.0, "pretrain")
    assert out_ids[0, 0] == 1 and (out_ids[0, 1:] == MASK).all()


def test_uniform_over_positions():
    ids = torch.zeros(4000, 6, dtype=torch.long)
    out_ids, _ = meap_mask(ids, ids.clone(), MASK, 0.2, "pretrain", torch.Generator().manual_seed(0))
    freq = (out_ids == MASK).float().mean(0)  # one of 5 eligible positions per row
    assert freq[0] == 0
    assert torch.allclose(freq[1:], torch.full((5,), 0.2), atol=0.03)


def test_bad_arguments():
    ids, labels = batch()
    with pytest.raises(ValueError, match="mode"):
        meap_mask(ids, labels, MASK, 0.1, "finetune")
    with pytest.raises(ValueError, match="ratio"):
        meap_mask(ids, labels, MASK, 1.5, "sft")
