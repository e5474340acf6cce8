"""A map-style dataset of manifest rows that loads only the streams the modality needs.

A clip that cannot be used is returned as `ClipSkipped(reason, clip_id)` instead of raising, so one bad
file never kills an epoch; the collate function drops and counts it.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from data.avsr.manifest import ManifestRow, resolve_clip_paths
from data.avsr.media_io import (
    AUDIO_SAMPLE_RATE,
    SAMPLES_PER_VIDEO_FRAME,
    VIDEO_FPS,
    MediaError,
    MediaTruncated,
    read_audio,
    read_video,
)
from data.avsr.skipped_clips import ClipSkipped

MODALITIES = ("audio", "video", "audiovisual")

log = logging.getLogger(__name__)


@dataclass
class AVSRClip:
    """One transformed clip: audio float32 [S] at 16 kHz, video float32 [T, 1, 88, 88] at 25 fps."""

    clip_id: str
    text: str
    audio: torch.Tensor | None = None
    video: torch.Tensor | None = None


class BadClipError(RuntimeError):
    """A clip that cannot be used, raised instead of skipped when `data.strict=true`."""


def has_words(text: str) -> bool:
    """True when the transcript has a letter or digit (one of only punctuation or spaces is empty)."""
    return any(character.isalnum() for character in text)


def truncation_tolerance(frames: int) -> int:
    """Frames a decoded clip may fall short of its manifest length: max(2, 5%) (decoders differ by a frame
    or two; a clip cut short by a bad copy misses far more)."""
    return max(2, round(0.05 * frames))


def cut_or_pad(waveform: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Trim or zero-pad [S] to exactly num_samples."""
    if waveform.numel() >= num_samples:
        return waveform[:num_samples]
    return torch.nn.functional.pad(waveform, (0, num_samples - waveform.numel()))


class AVSRDataset(Dataset):
    """Clips of `rows` under `root`; `modality` is "audio", "video" or "audiovisual".

    In "audiovisual" mode the audio is cut or padded to 640 samples per video frame (as auto_avsr does),
    so audio_lengths == 640 * video_lengths. Clips longer than `max_duration_s` (by the manifest or
    after decoding) are skipped as "too_long". A clip whose decoded video or audio falls short of its
    container header or of the manifest's `input_length` (more than `truncation_tolerance`) is skipped as
    "truncated": training on half a clip with the whole transcript would teach the wrong alignment.
    strict: a bad clip (missing, corrupt, truncated, empty) raises `BadClipError` instead of being skipped;
    "too_long" is a length filter, never an error.
    """

    def __init__(
        self,
        root: Path,
        rows: Sequence[ManifestRow],
        modality: str,
        video_transform: Callable[[torch.Tensor], torch.Tensor],
        audio_transform: Callable[[torch.Tensor], torch.Tensor],
        max_duration_s: float,
        strict: bool = False,
    ):
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        self.root, self.rows, self.modality = Path(root), list(rows), modality
        self.video_transform, self.audio_transform = video_transform, audio_transform
        self.max_frames = int(max_duration_s * VIDEO_FPS)
        self.max_samples = int(max_duration_s * AUDIO_SAMPLE_RATE)
        self.uses_audio = modality in ("audio", "audiovisual")
        self.uses_video = modality in ("video", "audiovisual")
        self.strict = strict

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> list[int]:
        """Manifest lengths in video frames, for frame-budget batching."""
        return [row.input_length for row in self.rows]

    def _skip(self, row: ManifestRow, reason: str, detail: str = "") -> ClipSkipped:
        if self.strict and reason != "too_long":
            raise BadClipError(
                f"{row.rel_path} (manifest row {row.row_number}) is {reason}: {detail}. "
                "Set data.strict=false to skip and count bad clips instead."
            )
        level = logging.WARNING if reason in ("missing", "corrupt") else logging.DEBUG
        log.log(level, "skipping %s (manifest row %d): %s %s", row.rel_path, row.row_number, reason, detail)
        return ClipSkipped(reason, row.rel_path)

    @staticmethod
    def _shorter_than_manifest(
        row: ManifestRow, audio: torch.Tensor | None, video: torch.Tensor | None
    ) -> str:
        """Why the decoded streams fall short of the manifest's length, or "" when they do not."""
        least = row.input_length - truncation_tolerance(row.input_length)
        if video is not None and video.shape[0] < least:
            return f"decoded {video.shape[0]} video frames, the manifest says {row.input_length}"
        if audio is not None and audio.numel() < least * SAMPLES_PER_VIDEO_FRAME:
            return (
                f"decoded {audio.numel() / SAMPLES_PER_VIDEO_FRAME:.1f} frames of audio, "
                f"the manifest says {row.input_length}"
            )
        return ""

    def __getitem__(self, index: int) -> AVSRClip | ClipSkipped:
        row = self.rows[index]
        if not has_words(row.text):
            return self._skip(row, "empty", f"transcript {row.text!r}")
        if row.input_length > self.max_frames:
            return self._skip(row, "too_long", f"{row.input_length} frames in the manifest")
        paths = resolve_clip_paths(self.root, row)
        needed = [
            path for path, used in ((paths.audio, self.uses_audio), (paths.video, self.uses_video)) if used
        ]
        missing = [str(path) for path in needed if not path.is_file()]
        if missing:
            return self._skip(row, "missing", ", ".join(missing))
        try:
            audio = read_audio(paths.audio) if self.uses_audio else None
            video = read_video(paths.video) if self.uses_video else None
        except MediaTruncated as error:
            return self._skip(row, "truncated", str(error))
        except MediaError as error:
            return self._skip(row, "corrupt", str(error))
        if (audio is not None and audio.numel() == 0) or (video is not None and video.shape[0] == 0):
            return self._skip(row, "empty", "no samples or frames")
        if (audio is not None and audio.numel() > self.max_samples) or (
            video is not None and video.shape[0] > self.max_frames
        ):
            return self._skip(row, "too_long", "after decoding")
        short = self._shorter_than_manifest(row, audio, video)
        if short:
            return self._skip(row, "truncated", short)
        clip = AVSRClip(row.rel_path, row.text)
        if video is not None:
            try:
                clip.video = self.video_transform(video)
            except ValueError as error:  # frames smaller than the crop
                return self._skip(row, "corrupt", str(error))
        if audio is not None:
            if video is not None:
                audio = cut_or_pad(audio, video.shape[0] * SAMPLES_PER_VIDEO_FRAME)
            clip.audio = self.audio_transform(audio)
        return clip
