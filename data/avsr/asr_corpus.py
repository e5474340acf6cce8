"""A larger speech corpus for ASR studies: thousands of clips, several voices, splits disjoint BY SENTENCE.

Same LRS3/auto_avsr layout as `synthetic_corpus` (so the same `AVSRDataModule` loads it):

    <out>/labels/{train,val,test}.csv          dataset,rel_path,input_length,text (no header)
    <out>/asr/<split>/<voice>/<index>.wav      16 kHz mono speech (flite voices; espeak-ng ones if asked)
    <out>/asr/<split>/<voice>/<index>.mp4      mouth video, only with `with_video` (slow: off by default)
    <out>/corpus.json                          marker: parameters, sentence-pool hash, counts, timing

Sentences are real public-domain / BSD text (Debian `fortunes`, `dict-devil`), pooled, de-duplicated and
shuffled by `seed`, then cut into three disjoint pools: test takes the first `num_test * CANDIDATES`
sentences, val the next, train the rest. So no test or val sentence can occur in training; the build
asserts it on the written manifests. `train_sources` (e.g. Debian `dict-gcide`) add sentences to the train
split only, after its own slice: more distinct training sentences, the same val and test. Each clip tries
its own CANDIDATES sentences in order until one fits `max_seconds`. Voices are dealt round-robin, so every
voice speaks in every split. Transcripts are lowercased unless `lowercase=False`: SmolLM2 reads "the cat
sat" in about half the tokens of "THE CAT SAT", as text it saw in pretraining, and WER ignores case.

Audio is padded to whole video frames (640 samples), so `input_length` (25 fps frames) = samples / 640.
Each clip depends only on (seed, split, index), so any number of build processes writes the same files.
`text_root` (default `$UNSINK_DEB_ROOT`, else / or /tmp/debroot) prefixes the Debian text paths: packages
unpacked with `dpkg -x` into a folder (studies/gpu_debs.sh) serve as well as installed ones: same pool.

    python -m data.avsr.asr_corpus --out artifacts/data/asr_corpus --workers 16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from data.atomic_build import build_atomically, read_marker
from data.avsr.manifest import ManifestRow, read_manifest, write_manifest
from data.avsr.media_io import AUDIO_SAMPLE_RATE, write_audio
from data.avsr.speech_synth import SYNTHESIZERS, synthesizer_name
from data.avsr.synthetic_corpus import MARKER, SPLITS, pad_to_video_frames
from data.avsr.text_sources import (
    DEVIL_DICT,
    FORTUNES_DIR,
    GCIDE_DICT,
    builtin_sentences,
    default_text_root,
    devil_dictionary_sentences,
    fortune_sentences,
    gcide_sentences,
    under_root,
)

FORMAT_VERSION = 1
CANDIDATES = 2  # sentences a clip may try before keeping the shortest
FLITE_VOICES = ("flite:slt", "flite:rms", "flite:awb", "flite:kal16")
TEXT_SOURCES = ("fortunes", "devil", "gcide", "builtin")  # builtin: the repo's 81 sentences (tests)


@dataclass(frozen=True)
class AsrCorpusParams:
    """Everything that determines the corpus; a marker with other values triggers a rebuild.

    voices: "engine:voice" (flite, espeak-ng, e.g. "espeak-ng:en-gb+m3"; builtin:low|mid|high for tests).
    sources: sentence sources pooled in the given order (fortunes, devil; builtin for tests).
    train_sources: more sources for the train split only (e.g. gcide, about 244,000 sentences): training
        gets more distinct sentences while val and test stay as they are; their sentences never enter it.
    """

    num_train: int = 6000
    num_val: int = 300
    num_test: int = 500
    seed: int = 0
    min_words: int = 3
    max_words: int = 12
    min_seconds: float = 1.0
    max_seconds: float = 6.0
    voices: tuple[str, ...] = FLITE_VOICES
    sources: tuple[str, ...] = ("fortunes", "devil")
    train_sources: tuple[str, ...] = ()
    with_video: bool = False
    lowercase: bool = True  # transcripts as the LLM read them in pretraining (WER is case-blind)

    def __post_init__(self):  # lists from Hydra or argparse become tuples (hashable, marker-comparable)
        object.__setattr__(self, "voices", tuple(self.voices))
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "train_sources", tuple(self.train_sources))
        for voice in self.voices:
            engine, _, name = voice.partition(":")
            if engine not in SYNTHESIZERS or not name:
                raise ValueError(
                    f"data.prepare.voices: {voice!r} is not <engine>:<voice> ({list(SYNTHESIZERS)})"
                )
        unknown = set(self.sources) - set(TEXT_SOURCES)
        if unknown or not self.sources:
            raise ValueError(f"data.prepare.sources: choose among {TEXT_SOURCES}, got {list(self.sources)}")
        if set(self.train_sources) - set(TEXT_SOURCES):
            raise ValueError(
                f"data.prepare.train_sources: choose among {TEXT_SOURCES}, got {list(self.train_sources)}"
            )


@dataclass(frozen=True)
class AsrClipJob:
    out: str
    split: str
    index: int
    candidates: tuple[str, ...]
    voice: str  # engine:voice
    seed: int
    min_seconds: float
    max_seconds: float
    with_video: bool
    lowercase: bool


def sentence_pool(
    params: AsrCorpusParams, text_root: str | Path = "/", sources: tuple[str, ...] | None = None
) -> list[str]:
    """Unique cleaned sentences of the chosen sources (`params.sources` unless given), in source order,
    before shuffling."""
    root = Path(text_root)
    readers = {
        "fortunes": (fortune_sentences, FORTUNES_DIR),
        "devil": (devil_dictionary_sentences, DEVIL_DICT),
        "gcide": (gcide_sentences, GCIDE_DICT),
    }
    sentences: list[str] = []
    for source in params.sources if sources is None else sources:
        if source == "builtin":
            sentences += builtin_sentences(params.min_words, params.max_words)
            continue
        read, system_path = readers[source]
        path = under_root(root, system_path)
        if not path.exists():
            raise FileNotFoundError(
                f"text source {source!r}: {path} is missing (install Debian fortunes / dict-devil / dict-gcide, "
                "or unpack them with studies/gpu_debs.sh and set UNSINK_DEB_ROOT; data.prepare.sources or "
                "train_sources to drop it)"
            )
        sentences += read(params.min_words, params.max_words, path)
    return list(dict.fromkeys(sentences))


def pool_digest(sentences: list[str]) -> str:
    return hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:16]


def plan_jobs(
    out: Path, params: AsrCorpusParams, sentences: list[str], train_extra: list[str] = ()
) -> list[AsrClipJob]:
    """One job per clip; test, val and train draw candidates from disjoint slices of the shuffled pool.

    Train cycles through its slice when it has fewer than num_train * CANDIDATES sentences (a sentence
    may then be heard in several voices), but never reaches into the held-out slices. `train_extra`
    (the train_sources' sentences) follows train's slice, shuffled, less any held-out sentence.
    """
    order = np.random.default_rng(params.seed).permutation(len(sentences))
    shuffled = [sentences[i] for i in order]
    held_out = (params.num_test + params.num_val) * CANDIDATES
    if len(shuffled) - held_out < CANDIDATES:
        raise ValueError(
            f"{len(shuffled)} sentences cannot give {params.num_test} test + {params.num_val} val clips "
            f"({CANDIDATES} candidates each) and leave any for training: lower num_val/num_test"
        )
    starts = {"test": 0, "val": params.num_test * CANDIDATES, "train": held_out}
    ends = {"test": starts["val"], "val": held_out, "train": len(shuffled)}
    counts = {"train": params.num_train, "val": params.num_val, "test": params.num_test}
    pools = {split: shuffled[starts[split] : ends[split]] for split in SPLITS}
    if train_extra:
        known = set(shuffled)  # held out, or already in train's slice
        extra = [s for s in dict.fromkeys(train_extra) if s not in known]
        order = np.random.default_rng([params.seed, 1]).permutation(len(extra))
        pools["train"] = pools["train"] + [extra[i] for i in order]
    jobs = []
    for split in SPLITS:
        pool = pools[split]
        for index in range(counts[split]):
            picks = tuple(pool[(index * CANDIDATES + k) % len(pool)] for k in range(CANDIDATES))
            voice = params.voices[index % len(params.voices)]
            jobs.append(
                AsrClipJob(str(out), split, index, picks, voice, params.seed, params.min_seconds,
                           params.max_seconds, params.with_video, params.lowercase)
            )  # fmt: skip
    return jobs


def build_clip(job: AsrClipJob) -> ManifestRow:
    rng = np.random.default_rng([job.seed, SPLITS.index(job.split), job.index])
    engine, _, voice = job.voice.partition(":")
    synthesizer = SYNTHESIZERS[engine]()
    lead_s = rng.uniform(0.08, 0.25)
    too_long = []
    for text in job.candidates:
        speech = synthesizer.synthesize(text, voice)
        if len(speech) / AUDIO_SAMPLE_RATE + 2 * lead_s <= job.max_seconds:
            break
        too_long.append((text, speech))
    else:  # no candidate fits: keep the shortest
        text, speech = min(too_long, key=lambda item: len(item[1]))
    speech = pad_to_video_frames(speech, lead_s, job.min_seconds)
    text = text.lower() if job.lowercase else text
    stem = f"asr/{job.split}/{voice.replace('+', '_')}/{job.index:05d}"
    if job.with_video:
        from data.avsr.synthetic_corpus import write_clip  # OpenCV only when video is asked for

        return write_clip(Path(job.out), "synthetic", f"{stem}.mp4", text, speech, rng)
    write_audio(Path(job.out) / f"{stem}.wav", speech)
    return ManifestRow("synthetic", f"{stem}.wav", len(speech) // (AUDIO_SAMPLE_RATE // 25), text)


def check_split_by_sentence(rows: dict[str, list[ManifestRow]]) -> None:
    """Raise if any val or test transcript also occurs in train (or any test one in val)."""
    texts = {split: {row.text for row in rows[split]} for split in SPLITS}
    for held_out, other in (("test", "train"), ("val", "train"), ("test", "val")):
        shared = texts[held_out] & texts[other]
        if shared:
            raise AssertionError(f"{len(shared)} {held_out} sentences occur in {other}: {sorted(shared)[:3]}")


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _build_into(folder: Path, params: AsrCorpusParams, workers: int, text_root: str | Path) -> dict:
    started = time.perf_counter()
    for voice in params.voices:
        synthesizer_name(voice.partition(":")[0])  # raises early when an engine is not installed
    sentences = sentence_pool(params, text_root)
    train_extra = sentence_pool(params, text_root, params.train_sources) if params.train_sources else []
    jobs = plan_jobs(folder, params, sentences, train_extra)
    pool_or_none = ProcessPoolExecutor(workers, initializer=_init_worker) if workers > 1 else nullcontext()
    with pool_or_none as pool:
        built = list(pool.map(build_clip, jobs, chunksize=8) if pool else map(build_clip, jobs))
    rows = {split: [row for job, row in zip(jobs, built) if job.split == split] for split in SPLITS}
    check_split_by_sentence(rows)
    for split in SPLITS:
        write_manifest(folder / "labels" / f"{split}.csv", rows[split])
    return {
        "format_version": FORMAT_VERSION,
        "params": _params_json(params),
        "sentence_pool": {"size": len(sentences), "sha256_16": pool_digest(sentences)},
        "train_extra_pool": {"size": len(train_extra), "sha256_16": pool_digest(train_extra)},
        "clips": {split: len(rows[split]) for split in SPLITS},
        "unique_sentences": {split: len({row.text for row in rows[split]}) for split in SPLITS},
        "hours": {split: round(sum(r.input_length for r in rows[split]) / 25 / 3600, 3) for split in SPLITS},
        "workers": workers,
        "build_seconds": round(time.perf_counter() - started, 2),
    }


def _params_json(params: AsrCorpusParams) -> dict:
    return json.loads(json.dumps(asdict(params)))  # tuples -> lists, as read back from the marker


def _marker_matches(out: Path, params: AsrCorpusParams) -> bool:
    marker = read_marker(out, MARKER)
    if marker is None:
        return False
    stored = {"train_sources": [], **(marker.get("params") or {})}  # markers older than train_sources
    return marker.get("format_version") == FORMAT_VERSION and stored == _params_json(params)


def build_asr_corpus(
    out: str | Path, workers: int = 1, text_root: str | Path | None = None, **params
) -> dict:
    """Build the corpus under `out` (replacing what is there); return the marker. `params`: AsrCorpusParams.

    Built in a temporary sibling folder renamed into place, so readers never see half a corpus.
    """
    out, spec = Path(out), AsrCorpusParams(**params)
    text_root = default_text_root() if text_root is None else text_root
    return build_atomically(
        out,
        MARKER,
        lambda staging: _build_into(staging, spec, max(1, workers), text_root),
        lambda folder: _marker_matches(folder, spec),
    )


def ensure_asr_corpus(
    out: str | Path, workers: int = 1, text_root: str | Path | None = None, **params
) -> Path:
    """Build the corpus unless `out` already holds one of the same parameters. workers <= 0: all cores."""
    out = Path(out)
    workers = workers if workers > 0 else os.cpu_count() or 1
    if not _marker_matches(out, AsrCorpusParams(**params)):
        build_asr_corpus(out, workers=workers, text_root=text_root, **params)
    return out


def read_split_texts(out: str | Path) -> dict[str, list[str]]:
    """Transcripts of each split of a built corpus (tests and reports)."""
    return {s: [r.text for r in read_manifest(Path(out) / "labels" / f"{s}.csv").rows] for s in SPLITS}


def main(argv: list[str] | None = None) -> None:
    defaults = AsrCorpusParams()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="artifacts/data/asr_corpus")
    for spec in fields(AsrCorpusParams):
        flag, default = "--" + spec.name.replace("_", "-"), getattr(defaults, spec.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag, nargs="+", default=list(default))
        else:
            parser.add_argument(flag, type=type(default), default=default)
    parser.add_argument("--workers", type=int, default=0, help="build processes (0: all cores)")
    parser.add_argument(
        "--text-root", default=None, help="prefix of the Debian text paths ($UNSINK_DEB_ROOT)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the marker matches")
    args = vars(parser.parse_args(argv))
    out, workers, text_root, force = (args.pop(k) for k in ("out", "workers", "text_root", "force"))
    if force:
        build_asr_corpus(
            out, workers=workers if workers > 0 else os.cpu_count() or 1, text_root=text_root, **args
        )
    else:
        ensure_asr_corpus(out, workers=workers, text_root=text_root, **args)
    print((Path(out) / MARKER).read_text())


if __name__ == "__main__":
    main()
