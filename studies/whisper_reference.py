"""Whisper's own recogniser on a corpus split: the reference WER for study 2's frozen encoder.

Study 2 freezes Whisper's encoder and trains a projector + LoRA LLM to read it. How well Whisper itself
(encoder + its own decoder, greedy, the 30 s window it was trained on) transcribes the same clips bounds
what the frozen encoder is known to support; on the flite corpus Whisper tiny.en makes 18% val WER (300
clips, 2026-11-29), above study 2's 15% goal for the x4 arm. Same normaliser and WER as the recipes.

    python studies/whisper_reference.py --corpus artifacts/data/asr_corpus --split val \\
        --whisper artifacts/models/whisper-tiny.en --out artifacts/studies/asr_downsampling

Writes `<out>/whisper_reference_<split>.json`: the WER and its parts, the clip count, the model folder,
and every (reference, hypothesis) pair. Unreadable clips are skipped and counted, not fatal.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.avsr.manifest import read_manifest, resolve_clip_paths  # noqa: E402
from data.avsr.media_io import MediaError, read_audio  # noqa: E402
from metrics.wer import corpus_wer  # noqa: E402


def load_whisper(folder: str | Path, device: str = "cpu"):
    """(model, feature extractor, tokenizer, generate kwargs) of an HF Whisper folder; a multilingual model
    is told to transcribe English."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    model = WhisperForConditionalGeneration.from_pretrained(str(folder)).to(device).eval()
    tokenizer = WhisperTokenizer.from_pretrained(str(folder))
    extractor = WhisperFeatureExtractor.from_pretrained(str(folder))
    english_only = "<|en|>" not in tokenizer.get_vocab() or str(folder).rstrip("/").endswith(".en")
    kwargs = {} if english_only else {"language": "en", "task": "transcribe"}
    return model, extractor, tokenizer, kwargs


def transcribe(whisper, waveforms: list[torch.Tensor], batch_size: int = 16, max_new_tokens: int = 64):
    """Greedy transcripts of 16 kHz waveforms [S] (each padded to Whisper's 30 s window), in order."""
    model, extractor, tokenizer, kwargs = whisper
    texts = []
    for start in range(0, len(waveforms), batch_size):
        chunk = [w.numpy() for w in waveforms[start : start + batch_size]]
        features = extractor(chunk, sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            ids = model.generate(
                features.to(model.device, model.dtype), max_new_tokens=max_new_tokens, **kwargs
            )
        texts += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return [text.strip() for text in texts]


def reference_wer(
    corpus: str | Path, split: str, whisper_folder: str | Path, limit: int | None = None, batch_size: int = 16
) -> dict:
    """Whisper's WER on `<corpus>/labels/<split>.csv` (the first `limit` rows if given)."""
    corpus = Path(corpus)
    rows = read_manifest(corpus / "labels" / f"{split}.csv").rows[:limit]
    if not rows:
        raise ValueError(f"{corpus}/labels/{split}.csv has no rows")
    waveforms, kept, skipped = [], [], []
    for row in rows:
        try:
            waveforms.append(read_audio(resolve_clip_paths(corpus, row).audio))
            kept.append(row)
        except (MediaError, FileNotFoundError) as error:
            skipped.append(f"{row.rel_path}: {error}")
    if not kept:
        raise ValueError(f"no readable clip in {split}: {skipped[:3]}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hypotheses = transcribe(load_whisper(whisper_folder, device), waveforms, batch_size)
    references = [row.text for row in kept]
    return {
        "split": split,
        "whisper": str(whisper_folder),
        "clips": len(kept),
        "skipped": skipped,
        **corpus_wer(references, hypotheses),
        "pairs": [{"reference": r, "hypothesis": h} for r, h in zip(references, hypotheses)],
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpus", default="artifacts/data/asr_corpus", help="corpus root (labels/<split>.csv)"
    )
    parser.add_argument("--split", default="val", help="never tune on test: val is the default")
    parser.add_argument("--whisper", default="artifacts/models/whisper-tiny.en", help="HF Whisper folder")
    parser.add_argument("--out", default=".", help="folder for whisper_reference_<split>.json")
    parser.add_argument("--limit", type=int, default=None, help="first N clips only")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    result = reference_wer(args.corpus, args.split, args.whisper, args.limit, args.batch_size)
    out = Path(args.out) / f"whisper_reference_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(
        f"[whisper reference] {Path(args.whisper).name} on {result['clips']} {args.split} clips: "
        f"WER {result['wer']:.3f} (sub {result['substitutions']:.3f}, ins {result['insertions']:.3f}, "
        f"del {result['deletions']:.3f}); {len(result['skipped'])} skipped -> {out}"
    )
    return out


if __name__ == "__main__":
    main()
