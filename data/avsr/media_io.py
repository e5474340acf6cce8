"""Reading and writing the two streams of a clip: 16 kHz mono wav (soundfile) and 25 fps mp4 (OpenCV).

torchaudio 2.9+ has no file I/O, so audio goes through `soundfile`; video through `cv2`, which needs no
FFmpeg Python bindings. Decoding failures raise `MediaError` so the dataset can count the clip corrupt.
OpenCV is imported on first video use, so audio-only runs (ASR) work where it is not installed.
"""

from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio.functional as AF

AUDIO_SAMPLE_RATE = 16_000
VIDEO_FPS = 25
SAMPLES_PER_VIDEO_FRAME = AUDIO_SAMPLE_RATE // VIDEO_FPS  # 640 samples = 40 ms


def _cv2():
    """OpenCV, imported on first video use."""
    import cv2

    cv2.setNumThreads(1)  # DataLoader workers already parallelise; OpenCV's own pool oversubscribes cores
    return cv2


class MediaError(RuntimeError):
    """A file exists but cannot be decoded."""


class MediaTruncated(MediaError):
    """A file decodes, but to fewer frames than its container header declares (e.g. cut short by a copy)."""


def read_audio(path: Path) -> torch.Tensor:
    """Waveform as float32 [S] in [-1, 1] at 16 kHz (other rates resampled, channels averaged)."""
    try:
        samples, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError) as error:
        raise MediaError(f"cannot decode audio {path}: {error}") from error
    waveform = torch.from_numpy(samples).mean(dim=1)
    if sample_rate != AUDIO_SAMPLE_RATE and waveform.numel() > 0:
        waveform = AF.resample(waveform, sample_rate, AUDIO_SAMPLE_RATE)
    return waveform


def read_video(path: Path) -> torch.Tensor:
    """Frames as uint8 [T, 3, H, W] RGB (T may be 0 for a container without frames).

    Raises `MediaTruncated` when decoding stops more than one frame before the frame count of the
    container header (OpenCV stops without an error at the end of the data that is there).
    """
    cv2 = _cv2()
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise MediaError(f"cannot open video {path}")
    declared = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))  # 0 or -1 when the container does not say
    frames = []
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    if declared > 0 and len(frames) + 1 < declared:
        raise MediaTruncated(
            f"video {path}: decoded {len(frames)} of the {declared} frames its header declares"
        )
    if not frames:
        return torch.zeros(0, 3, 0, 0, dtype=torch.uint8)
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def write_audio(path: Path, waveform: np.ndarray, sample_rate: int = AUDIO_SAMPLE_RATE) -> None:
    """Write float waveform [S] as 16-bit PCM wav."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), np.clip(waveform, -1.0, 1.0), sample_rate, subtype="PCM_16")


def write_video(path: Path, frames: np.ndarray, fps: int = VIDEO_FPS) -> None:
    """Write uint8 frames [T, H, W] (grayscale) or [T, H, W, 3] (RGB) as an mp4 ('mp4v' codec)."""
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames.shape[1:3]
    cv2 = _cv2()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height), True)
    if not writer.isOpened():
        raise MediaError(f"cannot open video writer for {path}")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
