"""Word error rate against hand-computed alignments, the normaliser, and a 2-process gloo sync."""

import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from metrics.text_normalizer import normalize_text, number_to_words
from metrics.wer import CorpusWER, EditCounts, align_words, corpus_wer, transcript_edit_counts


@pytest.mark.parametrize(
    ("reference", "hypothesis", "expected"),
    [
        ("the cat sat on the mat", "the cat sit on mat", EditCounts(1, 0, 1, 6)),
        ("a b c", "a x b c", EditCounts(0, 1, 0, 3)),
        ("a b c", "", EditCounts(0, 0, 3, 3)),
        ("", "hello there", EditCounts(0, 2, 0, 0)),
        ("", "", EditCounts(0, 0, 0, 0)),
        ("one two three four", "four three two one", EditCounts(4, 0, 0, 4)),
        ("a b c d e", "x a b d e y", EditCounts(0, 2, 1, 5)),
    ],
)
def test_alignment_counts_each_operation(reference, hypothesis, expected):
    counts = transcript_edit_counts(reference, hypothesis)
    assert counts == expected


def test_alignment_prefers_substitution_to_a_deletion_insertion_pair():
    assert align_words(["a", "b"], ["a", "c"]) == EditCounts(1, 0, 0, 2)


def test_normaliser_lowercases_strips_punctuation_and_collapses_spaces():
    assert normalize_text("  Hello,   World -- it's   2 PM! ") == "hello world it's 2 pm"
    assert normalize_text("Well-known \u201cquotes\u201d; 'single'") == "well known quotes single"
    assert normalize_text("DON\u2019T stop") == "don't stop"
    assert normalize_text("Call 911 at 10", numbers_as_words=True) == "call nine hundred eleven at ten"
    assert number_to_words(1984) == "one thousand nine hundred eighty four"
    assert number_to_words(2_000_017) == "two million seventeen"


def test_normaliser_removes_case_and_punctuation_errors_only():
    assert transcript_edit_counts("Hello, World!", "hello world").errors == 0
    assert transcript_edit_counts("IT'S HERE", "its here") == EditCounts(1, 0, 0, 2)


def test_corpus_wer_sums_edits_over_summed_reference_words():
    result = corpus_wer(["a", "a b c d"], ["b", "a b c d"])
    assert result["wer"] == pytest.approx(1 / 5)  # not the mean of per-utterance WERs (0.5)
    assert result["substitutions"] == pytest.approx(1 / 5)
    assert result["insertions"] == result["deletions"] == 0


def test_empty_hypotheses_and_empty_references():
    assert corpus_wer(["a b", "c"], ["", ""])["deletions"] == pytest.approx(1.0)
    assert corpus_wer(["a b", ""], ["a b", "x"])["wer"] == pytest.approx(1 / 2)
    assert corpus_wer([""], ["x y"])["wer"] == pytest.approx(2.0)  # no reference words: divide by 1
    assert corpus_wer([""], [""])["wer"] == 0.0
    with pytest.raises(ValueError, match="2 references but 1"):
        corpus_wer(["a", "b"], ["a"])


def test_metric_accumulates_and_resets():
    metric = CorpusWER()
    metric.update(["the cat sit on mat"], ["the cat sat on the mat"])
    metric.update(["hello"], ["Hello!"])
    result = metric.compute()
    assert set(result) == {"wer", "substitutions", "insertions", "deletions"}
    assert result["wer"].item() == pytest.approx(2 / 7)
    total = result["substitutions"] + result["insertions"] + result["deletions"]
    assert total.item() == pytest.approx(result["wer"].item())
    metric.reset()
    metric.update(["a"], ["a"])
    assert metric.compute()["wer"].item() == 0.0


REFERENCES = ["the cat sat on the mat", "a b c", "hello world", "one two"]
HYPOTHESES = ["the cat sit on mat", "a x b c", "", "one two"]


def _sync_worker(rank: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    metric = CorpusWER()
    metric.update(HYPOTHESES[rank::2], REFERENCES[rank::2])
    queue.put((rank, {name: value.item() for name, value in metric.compute().items()}))
    dist.destroy_process_group()


def test_two_process_gloo_sync_equals_single_process():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.get_context("fork")  # children inherit the imports: about 1 s instead of 20 s with spawn
    queue = context.SimpleQueue()
    workers = [context.Process(target=_sync_worker, args=(rank, port, queue)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    results = dict(queue.get() for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    expected = corpus_wer(REFERENCES, HYPOTHESES)
    for rank in (0, 1):
        for name, value in expected.items():
            assert results[rank][name] == pytest.approx(value)
    assert expected["wer"] == pytest.approx(5 / 13)
