"""LeaF pure functions: confounder scores and spans, distillation KL against loop references."""

import math

import pytest
import torch

from losses.leaf import confounder_scores, confounder_spans, distillation_loss, min_max


def reference_minmax(values):
    low, high = min(values), max(values)
    return [0.0 if high == low else (v - low) / (high - low) for v in values]


def test_confounder_scores_match_reference_1d_and_2d():
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.rand(2, 7, generator=gen), torch.rand(2, 7, generator=gen)
    scores = confounder_scores(teacher, student)
    for b in range(2):
        diff = [
            t - s
            for t, s in zip(reference_minmax(teacher[b].tolist()), reference_minmax(student[b].tolist()))
        ]
        assert scores[b].tolist() == pytest.approx(reference_minmax(diff), abs=1e-6)
    assert torch.allclose(confounder_scores(teacher[1], student[1]), scores[1])
    assert scores.min() == 0 and scores.max() == 1


def test_constant_rows_do_not_divide_by_zero():
    assert torch.equal(min_max(torch.ones(4)), torch.zeros(4))
    assert torch.isfinite(confounder_scores(torch.ones(5), torch.ones(5))).all()
    with pytest.raises(ValueError, match="shape"):
        confounder_scores(torch.ones(3), torch.ones(4))


@pytest.mark.parametrize(
    "teacher, student",
    [
        ([0.3, 1.2, 0.7, 2.0], [0.3, 1.2, 0.7, 2.0]),  # identical gradients
        ([0.3, 1.2, 0.7, 2.0], [0.6, 2.4, 1.4, 4.0]),  # the same up to scale: min-max makes them tie
        ([1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]),  # both flat
    ],
)
def test_tied_teacher_and_student_mark_no_confounder(teacher, student):
    scores = confounder_scores(torch.tensor(teacher), torch.tensor(student))
    assert confounder_spans(scores, 0.1) == []  # not [(0, 4)], the whole prompt


def test_spans_threshold_cap_and_protection():
    scores = torch.tensor([0.9, 0.0, 0.1, 0.8, 0.05, 0.7, 0.02, 0.03, 1.0, 0.6])
    # n=10, quantile 0.4 -> sorted[4] = 0.1; tokens <= 0.1: 1,2,4,6,7
    assert confounder_spans(scores, 0.4) == [(1, 3), (4, 5), (6, 8)]
    protected = torch.zeros(10, dtype=torch.bool)
    protected[2] = protected[6] = True
    assert confounder_spans(scores, 0.4, protected=protected) == [(1, 2), (4, 5), (7, 8)]
    assert confounder_spans(scores, 0.4, cap=0.04) == [(1, 2), (6, 8)]  # cap below the quantile
    assert confounder_spans(scores, 1.0, cap=1.0) == [(0, 10)]  # index clamped to n-1
    assert confounder_spans(torch.tensor([0.0]), 0.1) == []  # one token singles nothing out
    assert confounder_spans(torch.tensor([]), 0.1) == []


def reference_kl(student, teacher, labels, temperature):
    total, count = 0.0, 0
    vocab = student.shape[-1]
    for b in range(student.shape[0]):
        for t in range(student.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            p = torch.softmax(teacher[b, t, :vocab].double() / temperature, -1)
            q = torch.softmax(student[b, t].double() / temperature, -1)
            total += float((p * (p.log() - q.log())).sum()) * temperature**2
            count += 1
    return total, count


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_matches_reference_with_shift_and_vocab_cut(temperature):
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(3, 6, 11, generator=gen)
    teacher = torch.randn(3, 6, 13, generator=gen)  # larger teacher vocabulary
    labels = torch.randint(0, 11, (3, 6), generator=gen)
    labels[0, :3] = -100
    labels[2, 4:] = -100
    total, count = reference_kl(student, teacher, labels, temperature)
    assert count == 5 + 3 + 3
    assert distillation_loss(student, teacher, labels, temperature).item() == pytest.approx(
        total / count, rel=1e-5
    )
    assert distillation_loss(student, teacher, labels, temperature, "sum").item() == pytest.approx(
        total, rel=1e-5
    )


def test_distillation_edges_and_gradient():
    student = torch.randn(1, 4, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(1, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 1, -100]])
    assert torch.autograd.gradcheck(lambda s: distillation_loss(s, teacher, labels, 2.0).double(), (student,))
    nothing = distillation_loss(student, teacher, torch.full((1, 4), -100))
    assert nothing.item() == 0.0 and not math.isnan(nothing.item())
    nothing.backward()
    same = distillation_loss(teacher.float(), teacher.float(), labels)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="smaller"):
        distillation_loss(torch.randn(1, 4, 6), torch.randn(1, 4, 5), labels)
    with pytest.raises(ValueError, match="reduction"):
        distillation_loss(student, teacher, labels, reduction="none")
