"""ASR study corpus: splits disjoint by sentence, audio only, voices dealt round-robin, parallel-safe."""

import json
import shutil
from pathlib import Path

import pytest

from data.avsr.asr_corpus import (
    AsrCorpusParams,
    build_asr_corpus,
    check_split_by_sentence,
    ensure_asr_corpus,
    plan_jobs,
    read_split_texts,
    sentence_pool,
)
from data.avsr.manifest import ManifestRow, read_manifest, resolve_clip_paths
from data.avsr.media_io import SAMPLES_PER_VIDEO_FRAME, read_audio
from data.avsr.synthetic_corpus import MARKER

# flite when installed (the real voices), else the built-in synthesiser: the logic under test is the same
VOICES = ["flite:slt", "flite:kal16"] if shutil.which("flite") else ["builtin:low", "builtin:high"]
TINY = dict(num_train=6, num_val=2, num_test=3, max_words=8, voices=VOICES, sources=["builtin"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("asr") / "asr_corpus"
    build_asr_corpus(out, workers=1, **TINY)
    return out


def test_plan_keeps_held_out_sentences_out_of_training():
    """Even when train must cycle through its pool (more clips than sentences), it never reaches val/test."""
    sentences = [f"SENTENCE NUMBER {i}" for i in range(40)]
    params = AsrCorpusParams(num_train=100, num_val=3, num_test=5, voices=VOICES, sources=["builtin"])
    jobs = plan_jobs(Path("/nonexistent"), params, sentences)
    candidates = {
        split: {t for j in jobs if j.split == split for t in j.candidates}
        for split in ("train", "val", "test")
    }
    assert len(jobs) == 108
    assert not candidates["train"] & candidates["test"] and not candidates["train"] & candidates["val"]
    assert not candidates["val"] & candidates["test"]
    assert len(candidates["train"]) == 40 - 2 * (3 + 5)  # train cycles over everything that is left
    assert {j.voice for j in jobs if j.split == "test"} == set(VOICES)


def test_train_sources_widen_training_only():
    """Extra sentences (train_sources) follow train's own slice; val and test are unchanged, and an extra
    sentence that is held out (or already in train) is not added again."""
    sentences = [f"SENTENCE NUMBER {i}" for i in range(40)]
    params = AsrCorpusParams(num_train=60, num_val=3, num_test=5, voices=VOICES, sources=["builtin"])
    plain = plan_jobs(Path("/nonexistent"), params, sentences)
    held_out = {t for j in plain if j.split != "train" for t in j.candidates}
    extra = [f"EXTRA LINE {i}" for i in range(50)] + sorted(held_out)[:4] + sentences[-3:]
    wide = plan_jobs(Path("/nonexistent"), params, sentences, extra)
    for split in ("val", "test"):
        assert [j.candidates for j in wide if j.split == split] == [
            j.candidates for j in plain if j.split == split
        ]
    train = [t for j in wide if j.split == "train" for t in j.candidates]
    assert not set(train) & held_out
    assert set(train) == (set(sentences) - held_out) | {
        f"EXTRA LINE {i}" for i in range(50)
    }  # 24 + 50 = 74 > 120/2
    assert (
        train[:24] == [t for j in plain if j.split == "train" for t in j.candidates][:24]
    )  # own slice first


def test_gcide_sentences_are_speakable(tmp_path):
    """The dict-gcide reader on a two-entry dictd file: sentences of the definitions, markup leftovers dropped."""
    import gzip

    from data.avsr.text_sources import gcide_sentences

    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    entries = [
        'Apple \\Ap"ple\\, n. [1913 Webster]\n\n   The fleshy fruit of a tree of the rose family. [1913 Webster]\n',
        "Crimination \\Crim`i*na'tion\\, n.\n\n"
        "   R crimination ll and more words here. The act of accusing someone of a crime.\n",
    ]
    data, index, offset = b"", [], 0
    for word, entry in zip(("apple", "crimination"), entries):
        raw = entry.encode()
        index.append(
            f"{word}\t{b64[offset // 64]}{b64[offset % 64]}\t{b64[len(raw) // 64]}{b64[len(raw) % 64]}"
        )
        data, offset = data + raw, offset + len(raw)
    (tmp_path / "gcide.dict.dz").write_bytes(gzip.compress(data))
    (tmp_path / "gcide.index").write_text("\n".join(index) + "\n")
    sentences = gcide_sentences(3, 12, tmp_path / "gcide.dict.dz")
    assert "THE FLESHY FRUIT OF A TREE OF THE ROSE FAMILY" in sentences
    assert "THE ACT OF ACCUSING SOMEONE OF A CRIME" in sentences
    assert not any(s.startswith("R ") for s in sentences)  # "R crimination ll ...": a lone letter


def test_plan_refuses_held_out_splits_that_eat_the_pool():
    params = AsrCorpusParams(num_train=1, num_val=10, num_test=10, voices=VOICES, sources=["builtin"])
    with pytest.raises(ValueError, match="lower num_val/num_test"):
        plan_jobs(Path("/nonexistent"), params, [f"S {i}" for i in range(40)])


def test_check_split_by_sentence_catches_a_leak():
    rows = {
        s: [ManifestRow("synthetic", f"{s}.wav", 50, f"{s.upper()} ONE")] for s in ("train", "val", "test")
    }
    check_split_by_sentence(rows)
    rows["train"].append(ManifestRow("synthetic", "x.wav", 50, "TEST ONE"))
    with pytest.raises(AssertionError, match="test sentences occur in train"):
        check_split_by_sentence(rows)


def test_built_corpus_is_split_by_sentence_and_audio_only(corpus):
    texts = read_split_texts(corpus)
    assert [len(texts[s]) for s in ("train", "val", "test")] == [6, 2, 3]
    assert not set(texts["test"]) & set(texts["train"]) and not set(texts["val"]) & set(texts["train"])
    marker = json.loads((corpus / MARKER).read_text())
    assert marker["params"]["voices"] == VOICES and marker["sentence_pool"]["size"] > 50
    assert not list(corpus.rglob("*.mp4"))
    assert all(text == text.lower() for split in texts.values() for text in split)
    for split in ("train", "test"):
        for row in read_manifest(corpus / "labels" / f"{split}.csv").rows:
            audio = read_audio(resolve_clip_paths(corpus, row).audio)
            assert audio.numel() == row.input_length * SAMPLES_PER_VIDEO_FRAME
            assert row.input_length / 25 <= AsrCorpusParams().max_seconds + 0.1


def test_ensure_reuses_a_matching_corpus_and_parallel_build_is_identical(corpus, tmp_path):
    stamp = (corpus / MARKER).stat().st_mtime_ns
    ensure_asr_corpus(corpus, workers=1, **TINY)
    assert (corpus / MARKER).stat().st_mtime_ns == stamp
    build_asr_corpus(tmp_path / "parallel", workers=2, **TINY)
    assert read_split_texts(tmp_path / "parallel") == read_split_texts(corpus)
    # a marker written before train_sources existed still matches (no rebuild of a built corpus) ...
    marker = json.loads((corpus / MARKER).read_text())
    del marker["params"]["train_sources"]
    (corpus / MARKER).write_text(json.dumps(marker))
    stamp = (corpus / MARKER).stat().st_mtime_ns
    ensure_asr_corpus(corpus, workers=1, **TINY)
    assert (corpus / MARKER).stat().st_mtime_ns == stamp
    # ... and asking for train sources rebuilds
    rebuilt = tmp_path / "copy"
    shutil.copytree(corpus, rebuilt)
    ensure_asr_corpus(rebuilt, workers=1, **{**TINY, "train_sources": ["builtin"]})
    assert json.loads((rebuilt / MARKER).read_text())["params"]["train_sources"] == ["builtin"]


def test_sentence_pool_reads_debian_text_under_a_root(tmp_path):
    """Packages unpacked with dpkg -x into a folder (the GPU machine) give the pool installed ones give."""
    fortunes = tmp_path / "usr/share/games/fortunes"
    fortunes.mkdir(parents=True)
    (fortunes / "demo").write_text("The cat sat on the mat.\n%\nA second plain sentence here.\n%\n")
    params = AsrCorpusParams(sources=["fortunes", "builtin"], voices=VOICES)
    pool = sentence_pool(params, tmp_path)
    assert pool[:2] == ["THE CAT SAT ON THE MAT", "A SECOND PLAIN SENTENCE HERE"] and len(pool) > 50
    with pytest.raises(FileNotFoundError, match="UNSINK_DEB_ROOT"):
        sentence_pool(AsrCorpusParams(sources=["devil"], voices=VOICES), tmp_path)
