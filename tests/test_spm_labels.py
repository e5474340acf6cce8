"""auto_avsr label files with SentencePiece token ids, decoded to text with `data.spm_model`."""

from pathlib import Path

import pytest
import sentencepiece

from data.avsr.manifest import ManifestError, read_manifest

SENTENCES = Path(__file__).resolve().parents[1] / "data" / "avsr" / "builtin_sentences.txt"


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A small unigram model trained here on the repo's own sentences (auto_avsr uses unigram5000)."""
    prefix = tmp_path_factory.mktemp("spm") / "unigram"
    sentencepiece.SentencePieceTrainer.train(
        input=str(SENTENCES),
        model_prefix=str(prefix),
        vocab_size=200,
        model_type="unigram",
        character_coverage=1.0,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def write_ids_manifest(path, spm_model, texts):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    lines = [
        f"lrs3,test/clip{i}.mp4,50,{' '.join(map(str, processor.encode(t)))}" for i, t in enumerate(texts)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_token_id_labels_decode_to_the_original_text(tmp_path, spm_model):
    texts = [line.strip() for line in SENTENCES.read_text().splitlines() if not line.startswith("#")][:3]
    assert texts[0] == "THE MORNING TRAIN WAS LATE AGAIN"  # LRS3-style uppercase transcripts
    manifest = read_manifest(write_ids_manifest(tmp_path / "test.csv", spm_model, texts), spm_model=spm_model)
    assert [row.text for row in manifest.rows] == texts
    assert all(row.input_length == 50 for row in manifest.rows)


def test_token_id_labels_without_a_model_are_refused_naming_the_key(tmp_path, spm_model):
    path = write_ids_manifest(tmp_path / "test.csv", spm_model, ["THE MORNING TRAIN", "AGAIN"])
    with pytest.raises(ManifestError, match="data.spm_model"):
        read_manifest(path)


def test_a_text_label_with_a_model_set_is_a_bad_row_named_by_number(tmp_path, spm_model):
    path = tmp_path / "mixed.csv"
    path.write_text("lrs3,a.mp4,10,5 7\nlrs3,b.mp4,10,HELLO THERE\n")
    with pytest.raises(ManifestError, match="row 2"):
        read_manifest(path, spm_model=spm_model)
    assert len(read_manifest(path, strict=False, spm_model=spm_model).rows) == 1
