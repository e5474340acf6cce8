"""The auto_avsr CSV manifest: `dataset,rel_path,input_length,text`, one clip per row.

`input_length` is the clip's length in video frames at 25 fps; `rel_path` names the mp4 (with or
without its extension) and the wav shares its stem. Paths are relative to the data root; like auto_avsr,
`root/dataset/rel_path` is also accepted. A header row with exactly the column names is allowed, and so
are Llama-AVSR's five-column rows `dataset,rel_path,input_length,token_ids,text` (token ids ignored).
auto_avsr's own label files hold SentencePiece ids instead of text (`...,input_length,341 21 3049`): with
`spm_model` (config `data.spm_model`) they are decoded to text on reading; without it such a file is refused
with a message naming that key.
"""

import csv
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

MANIFEST_COLUMNS = ("dataset", "rel_path", "input_length", "text")
MEDIA_SUFFIXES = (".mp4", ".wav")
TOKEN_IDS = re.compile(r"^\d+( \d+)*$")

log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """A manifest row that cannot be parsed (raised in strict mode, with the file and row number)."""


@dataclass(frozen=True)
class ManifestRow:
    dataset: str
    rel_path: str
    input_length: int  # video frames at 25 fps
    text: str
    row_number: int = 0  # 1-based line in the CSV file


@dataclass
class Manifest:
    path: Path
    rows: list[ManifestRow]
    bad_rows: list[tuple[int, str]] = field(default_factory=list)  # (row number, why)


@dataclass(frozen=True)
class ClipPaths:
    video: Path
    audio: Path


def _parse_row(fields: list[str], row_number: int) -> ManifestRow:
    if len(fields) == len(MANIFEST_COLUMNS) + 1:  # Llama-AVSR: token ids before the text
        fields = fields[:3] + fields[4:]
    if len(fields) != len(MANIFEST_COLUMNS):
        raise ManifestError(f"expected {len(MANIFEST_COLUMNS)} fields {MANIFEST_COLUMNS}, got {len(fields)}")
    dataset, rel_path, input_length, text = (value.strip() for value in fields)
    if not dataset or not rel_path:
        raise ManifestError("empty dataset or rel_path")
    if PurePosixPath(rel_path).is_absolute() or ".." in PurePosixPath(rel_path).parts:
        raise ManifestError(f"rel_path must be relative to the data root, got {rel_path!r}")
    if not input_length.isdigit() or int(input_length) <= 0:
        raise ManifestError(f"input_length must be a positive integer, got {input_length!r}")
    return ManifestRow(dataset, rel_path, int(input_length), text, row_number)


class TokenIdDecoder:
    """SentencePiece ids ("341 21 3049") -> text with the user's model (auto_avsr: unigram5000.model)."""

    def __init__(self, model_file: str | Path):
        import sentencepiece

        model_file = Path(model_file).expanduser()
        if not model_file.exists():
            raise FileNotFoundError(f"data.spm_model: {model_file} does not exist")
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))

    def __call__(self, ids: str) -> str:
        if not TOKEN_IDS.match(ids):
            raise ManifestError(
                f"expected space-separated SentencePiece ids (data.spm_model is set), got {ids!r}"
            )
        values = [int(i) for i in ids.split()]
        if max(values) >= self.processor.get_piece_size():
            raise ManifestError(
                f"token id {max(values)} is outside the SentencePiece vocabulary (data.spm_model)"
            )
        return self.processor.decode(values)


def read_manifest(path: Path, strict: bool = True, spm_model: str | Path | None = None) -> Manifest:
    """Parse a manifest. Strict: the first bad row raises `ManifestError` naming it; else bad rows are
    skipped, kept in `Manifest.bad_rows` and listed in one warning. `spm_model`: decode token-id labels."""
    decode = TokenIdDecoder(spm_model) if spm_model else None
    manifest = Manifest(Path(path), rows=[])
    with open(path, newline="", encoding="utf-8") as stream:
        for row_number, fields in enumerate(csv.reader(stream), start=1):
            if not fields or (row_number == 1 and tuple(fields) == MANIFEST_COLUMNS):
                continue
            try:
                row = _parse_row(fields, row_number)
                if decode is not None:
                    row = replace(row, text=decode(row.text))
                manifest.rows.append(row)
            except ManifestError as error:
                if strict:
                    raise ManifestError(f"{path}: row {row_number}: {error}") from None
                manifest.bad_rows.append((row_number, str(error)))
    if decode is None and manifest.rows and all(TOKEN_IDS.match(row.text) for row in manifest.rows):
        raise ManifestError(
            f"{path}: every label is a list of token ids (auto_avsr's format): set data.spm_model=<the "
            "SentencePiece model they were made with> to decode them to text"
        )
    if manifest.bad_rows:
        listed = "; ".join(f"row {number}: {why}" for number, why in manifest.bad_rows[:20])
        log.warning("%s: skipped %d bad rows (%s)", path, len(manifest.bad_rows), listed)
    return manifest


def write_manifest(path: Path, rows: Iterable[ManifestRow]) -> None:
    """Write rows without a header, as auto_avsr does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        for row in rows:
            writer.writerow([row.dataset, row.rel_path, row.input_length, row.text])


def _media_stem(rel_path: str) -> str:
    return rel_path[:-4] if rel_path.lower().endswith(MEDIA_SUFFIXES) else rel_path


def resolve_clip_paths(root: Path, row: ManifestRow) -> ClipPaths:
    """The mp4 and wav of a row: under `root/rel_path`, else auto_avsr's `root/dataset/rel_path`."""
    stem = _media_stem(row.rel_path)
    candidates = [Path(root) / stem, Path(root) / row.dataset / stem]
    for base in candidates:
        paths = ClipPaths(base.with_name(base.name + ".mp4"), base.with_name(base.name + ".wav"))
        if paths.video.exists() or paths.audio.exists():
            return paths
    base = candidates[0]
    return ClipPaths(base.with_name(base.name + ".mp4"), base.with_name(base.name + ".wav"))
