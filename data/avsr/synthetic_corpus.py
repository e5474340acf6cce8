"""Build a small AVSR corpus in exactly the LRS3/auto_avsr layout, so the real loader is what runs.

    <out>/labels/{train,val,test}.csv            dataset,rel_path,input_length,text (no header)
    <out>/synthetic/<split>/<voice>/<index>.mp4  96x96 25 fps mouth video synthesised from the speech
    <out>/synthetic/<split>/<voice>/<index>.wav  16 kHz mono speech (flite / espeak-ng / built-in)
    <out>/librivox/test/<utterance>.{mp4,wav}    real LibriVox speech (pocketsphinx-testdata), if present
    <out>/corpus.json                            marker: build parameters, sources, counts, timing

Each clip depends only on (seed, split, index), so building with several processes gives the same files.
Audio is padded to whole video frames (640 samples), so video frames == samples / 640 == input_length.
"""

import logging
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.atomic_build import build_atomically, read_marker
from data.avsr.manifest import ManifestRow, write_manifest
from data.avsr.media_io import (
    AUDIO_SAMPLE_RATE,
    SAMPLES_PER_VIDEO_FRAME,
    read_audio,
    write_audio,
    write_video,
)
from data.avsr.mouth_video import render_mouth_video
from data.avsr.speech_synth import make_synthesizer, synthesizer_name
from data.avsr.text_sources import load_sentences, text_source_name

MARKER = "corpus.json"
FORMAT_VERSION = 2  # 2: train never cycles into the held-out sentences
SPLITS = ("train", "val", "test")
LIBRIVOX_DIR = Path("/usr/share/pocketsphinx/test/data/librivox")
CANDIDATES_PER_CLIP = 3

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusParams:
    """Everything that determines the corpus; a marker with other values triggers a rebuild."""

    num_train: int = 200
    num_val: int = 24
    num_test: int = 24
    seed: int = 0
    min_words: int = 3
    max_words: int = 10
    min_seconds: float = 1.0
    max_seconds: float = 4.0
    synthesizer: str = "auto"
    include_librivox: bool = True


@dataclass(frozen=True)
class ClipJob:
    out: str
    split: str
    index: int
    candidates: tuple[str, ...]  # sentences tried in order until one fits max_seconds
    voice: str
    synthesizer: str
    seed: int
    min_seconds: float
    max_seconds: float


def pad_to_video_frames(waveform: np.ndarray, lead_s: float, min_seconds: float) -> np.ndarray:
    """Add `lead_s` of silence before and after, pad to min_seconds, then to a multiple of 640 samples."""
    lead = np.zeros(int(lead_s * AUDIO_SAMPLE_RATE), dtype=np.float32)
    waveform = np.concatenate([lead, waveform, lead])
    target = max(len(waveform), int(min_seconds * AUDIO_SAMPLE_RATE))
    target = -(-target // SAMPLES_PER_VIDEO_FRAME) * SAMPLES_PER_VIDEO_FRAME
    return np.pad(waveform, (0, target - len(waveform)))


def write_clip(out: Path, dataset: str, rel_path: str, text: str, speech: np.ndarray, rng) -> ManifestRow:
    """Write the wav and its mouth video under out/rel_path; return the manifest row."""
    stem = out / rel_path[:-4]
    write_audio(stem.with_suffix(".wav"), speech)
    video = render_mouth_video(speech, rng)
    write_video(stem.with_suffix(".mp4"), video)
    return ManifestRow(dataset, rel_path, len(video), text)


def build_clip(job: ClipJob) -> ManifestRow:
    rng = np.random.default_rng([job.seed, SPLITS.index(job.split), job.index])
    synthesizer = make_synthesizer(job.synthesizer)
    lead_s = rng.uniform(0.08, 0.25)
    too_long = []
    for text in job.candidates:
        speech = synthesizer.synthesize(text, job.voice)
        if len(speech) / AUDIO_SAMPLE_RATE + 2 * lead_s <= job.max_seconds:
            break
        too_long.append((text, speech))
    else:  # no candidate fits: keep the shortest
        text, speech = min(too_long, key=lambda item: len(item[1]))
    speech = pad_to_video_frames(speech, lead_s, job.min_seconds)
    rel_path = f"synthetic/{job.split}/{job.voice}/{job.index:05d}.mp4"
    return write_clip(Path(job.out), "synthetic", rel_path, text, speech, rng)


def librivox_utterances(directory: Path = LIBRIVOX_DIR) -> list[tuple[Path, str]]:
    """(wav, uppercase transcript) of the real LibriVox test utterances, [] when not installed."""
    transcription = directory / "transcription"
    if not transcription.is_file():
        return []
    utterances = []
    for line in transcription.read_text().splitlines():
        words, _, name = line.rpartition("(")
        text = " ".join(word for word in words.split() if word not in ("<s>", "</s>")).upper()
        wav = directory / f"{name.strip().rstrip(')')}.wav"
        if text and wav.is_file():
            utterances.append((wav, text))
    return utterances


def _jobs(out: Path, params: CorpusParams, sentences: list[str], synthesizer: str) -> list[ClipJob]:
    """One job per clip. Test and val take the first sentences of the shuffled pool; train cycles over the
    rest, so no held-out sentence is trained on however many clips train asks for (when the pool is too small
    to leave any, as with the built-in list, train cycles over all of it: `_report_train_sentences` warns)."""
    rng = np.random.default_rng(params.seed)
    order = rng.permutation(len(sentences))
    voices = make_synthesizer(synthesizer).voices
    held_out = (params.num_test + params.num_val) * CANDIDATES_PER_CLIP
    train_pool, train_start = (order[held_out:], 0) if held_out < len(order) else (order, held_out)
    plan = (
        ("test", params.num_test, order, 0),
        ("val", params.num_val, order, params.num_test * CANDIDATES_PER_CLIP),
        ("train", params.num_train, train_pool, train_start),
    )
    jobs = []
    for split, count, pool, start in plan:
        for index in range(count):
            first = start + index * CANDIDATES_PER_CLIP
            picks = [sentences[pool[(first + k) % len(pool)]] for k in range(CANDIDATES_PER_CLIP)]
            voice = voices[int(rng.integers(len(voices)))]
            jobs.append(
                ClipJob(str(out), split, index, tuple(picks), voice, synthesizer, params.seed,
                        params.min_seconds, params.max_seconds)
            )  # fmt: skip
    return jobs


def _single_threaded() -> None:
    """Build processes run one clip each at a time; like DataLoader workers, keep torch to one thread."""
    torch.set_num_threads(1)


def _build_into(folder: Path, params: CorpusParams, workers: int, progress: bool) -> dict:
    started = time.perf_counter()
    sentences, text_source = load_sentences(params.min_words, params.max_words)
    synthesizer = synthesizer_name(params.synthesizer)
    jobs = _jobs(folder, params, sentences, synthesizer)
    bar = tqdm(total=len(jobs), desc="synthetic AVSR corpus", unit="clip", disable=not progress)
    built = []
    pool_or_none = (
        ProcessPoolExecutor(workers, initializer=_single_threaded) if workers > 1 else nullcontext()
    )
    with pool_or_none as pool:
        for row in pool.map(build_clip, jobs, chunksize=4) if pool else map(build_clip, jobs):
            built.append(row)
            bar.update()
    bar.close()
    rows = {split: [row for job, row in zip(jobs, built) if job.split == split] for split in SPLITS}
    librivox = librivox_utterances() if params.include_librivox else []
    for index, (wav, text) in enumerate(librivox):
        speech = pad_to_video_frames(read_audio(wav).numpy(), 0.0, 0.0)
        rng = np.random.default_rng([params.seed, len(SPLITS), index])
        rows["test"].append(
            write_clip(folder, "librivox", f"librivox/test/{wav.stem}.mp4", text, speech, rng)
        )
    for split in SPLITS:
        write_manifest(folder / "labels" / f"{split}.csv", rows[split])
    train_sentences = _report_train_sentences(rows["train"], text_source)
    return {
        "format_version": FORMAT_VERSION,
        "params": asdict(params),
        "synthesizer": synthesizer,
        "text_source": text_source,
        "clips": {split: len(rows[split]) for split in SPLITS},
        "distinct_train_sentences": train_sentences,
        "librivox_test_clips": len(librivox),
        "seconds": {split: sum(r.input_length for r in rows[split]) / 25 for split in SPLITS},
        "build_seconds": round(time.perf_counter() - started, 2),
    }


def _report_train_sentences(train_rows: list[ManifestRow], text_source: str) -> int:
    """Log how many distinct sentences the training clips speak; warn when clips repeat a small pool
    (the built-in list): a model then memorises those sentences and cannot learn to read unseen ones."""
    distinct = len({row.text for row in train_rows})
    log.info("synthetic corpus: %d training clips speak %d distinct sentences (text source %s)",
             len(train_rows), distinct, text_source)  # fmt: skip
    if text_source == "builtin" and len(train_rows) > distinct:
        log.warning(
            "synthetic corpus: %d training clips repeat %d built-in sentences, so a model trained on them "
            "memorises those sentences and will not transcribe unseen ones (val WER stays near 100%%). "
            "Install Debian fortunes and dict-devil (about 14,800 sentences), or unpack them with "
            "studies/gpu_debs.sh and set UNSINK_DEB_ROOT.",
            len(train_rows), distinct,
        )  # fmt: skip
    return distinct


def _marker_matches(out: Path, params: CorpusParams) -> bool:
    marker = read_marker(out, MARKER)
    if marker is None:
        return False
    return (
        marker.get("format_version") == FORMAT_VERSION
        and marker.get("params") == asdict(params)
        and marker.get("synthesizer") == synthesizer_name(params.synthesizer)
        and marker.get("text_source") == text_source_name()
    )


def build_synthetic_corpus(out: str | Path, workers: int = 1, progress: bool = True, **params) -> dict:
    """Build the corpus under `out` (replacing what is there) and return the marker's contents.

    Built in a temporary sibling folder and renamed into place, so readers never see half a corpus and
    concurrent builders of the same parameters do not clash. `params` are CorpusParams fields.
    """
    out, spec = Path(out), CorpusParams(**params)
    return build_atomically(
        out,
        MARKER,
        lambda staging: _build_into(staging, spec, workers, progress),
        lambda folder: _marker_matches(folder, spec),
    )


def ensure_synthetic_corpus(out: str | Path, workers: int = 1, progress: bool = True, **params) -> Path:
    """Build the corpus unless `out` already holds one with the same parameters and sources."""
    out = Path(out)
    if not _marker_matches(out, CorpusParams(**params)):
        build_synthetic_corpus(out, workers=workers, progress=progress, **params)
    return out
