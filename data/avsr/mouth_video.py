"""Mouth-region video synthesised from speech, so the picture carries information about what is said.

Per 40 ms video frame (640 samples at 16 kHz) two features drive a drawn mouth:
- openness in [0, 1] from the RMS envelope (loud vowels open the jaw, silence closes it);
- spread in [0, 1] from the spectral centroid (bright sounds such as "ee"/"s" stretch the lips wide,
  dark ones such as "oo"/"w" round them).
The mouth is an outer lip ellipse with a dark inner opening and teeth, on a skin-toned face crop
(96x96, like auto_avsr's mouth ROIs), with slow head jitter, brightness flicker and pixel noise.
"""

import cv2
import numpy as np

from data.avsr.media_io import AUDIO_SAMPLE_RATE, SAMPLES_PER_VIDEO_FRAME

FRAME_SIZE = 96
SKIN_RGB = np.array([196, 150, 128], dtype=np.float32)
LIP_RGB = (150, 70, 75)
MOUTH_RGB = (40, 18, 22)
TEETH_RGB = (225, 220, 205)


def mouth_features(waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Openness and spread per video frame, each float32 [F] in [0, 1], F = ceil(S / 640)."""
    num_frames = max(1, -(-len(waveform) // SAMPLES_PER_VIDEO_FRAME))
    padded = np.zeros(num_frames * SAMPLES_PER_VIDEO_FRAME, dtype=np.float32)
    padded[: len(waveform)] = waveform
    frames = padded.reshape(num_frames, SAMPLES_PER_VIDEO_FRAME)
    rms = np.sqrt((frames**2).mean(axis=1))
    reference = np.percentile(rms, 95) + 1e-8
    openness = np.clip(np.sqrt(rms / reference), 0.0, 1.0)
    openness = np.convolve(openness, [0.25, 0.5, 0.25], mode="same")  # the jaw moves smoothly
    spectrum = np.abs(np.fft.rfft(frames * np.hanning(SAMPLES_PER_VIDEO_FRAME), axis=1))
    bins = np.fft.rfftfreq(SAMPLES_PER_VIDEO_FRAME, 1 / AUDIO_SAMPLE_RATE)
    centroid = (spectrum * bins).sum(axis=1) / (spectrum.sum(axis=1) + 1e-8)
    spread = np.clip((centroid - 400.0) / 2600.0, 0.0, 1.0)
    spread = np.where(openness > 0.15, spread, 0.5)  # neutral lips when silent
    return openness.astype(np.float32), spread.astype(np.float32)


_FACE = np.ascontiguousarray(
    np.broadcast_to(SKIN_RGB * np.linspace(0.9, 1.1, FRAME_SIZE)[:, None, None], (FRAME_SIZE, FRAME_SIZE, 3))
).astype(np.uint8)  # skin, lit from below a little


def draw_mouth(openness: float, spread: float, offset: tuple[float, float]) -> np.ndarray:
    """One uint8 RGB frame [96, 96, 3] of a mouth with the given opening and lip spread."""
    frame = _FACE.copy()
    centre = (int(round(48 + offset[0])), int(round(54 + offset[1])))
    half_width = 16 + 12 * spread - 3 * openness * (1 - spread)
    inner_height = 13 * openness
    outer = (int(round(half_width)), int(round(5 + inner_height)))
    cv2.ellipse(frame, centre, outer, 0, 0, 360, LIP_RGB, -1, cv2.LINE_AA)
    if inner_height >= 1:
        inner = (int(round(half_width - 4)), int(round(inner_height)))
        cv2.ellipse(frame, centre, inner, 0, 0, 360, MOUTH_RGB, -1, cv2.LINE_AA)
        if inner_height >= 3:
            teeth_centre = (centre[0], centre[1] - inner[1] + 2)
            cv2.ellipse(frame, teeth_centre, (max(inner[0] - 4, 1), 2), 0, 0, 360, TEETH_RGB, -1, cv2.LINE_AA)
    else:
        cv2.line(
            frame, (centre[0] - outer[0] + 3, centre[1]), (centre[0] + outer[0] - 3, centre[1]), MOUTH_RGB, 1
        )
    return np.clip(frame, 0, 255).astype(np.uint8)


def render_mouth_video(waveform: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB video [F, 96, 96, 3] at 25 fps for a 16 kHz waveform [S], F = ceil(S / 640)."""
    openness, spread = mouth_features(waveform)
    steps = rng.normal(0, 0.4, size=(len(openness), 2))
    offsets = np.clip(np.cumsum(steps, axis=0) * 0.5, -3, 3)  # slow head motion, +-3 px
    brightness = 1 + 0.03 * np.sin(np.arange(len(openness)) / 7 + rng.uniform(0, 6.28))
    frames = np.stack([draw_mouth(o, s, tuple(offset)) for o, s, offset in zip(openness, spread, offsets)])
    video = frames.astype(np.float32) * brightness.astype(np.float32)[:, None, None, None]
    video += rng.standard_normal((*frames.shape[:3], 1), dtype=np.float32) * 3.0  # luminance sensor noise
    return np.clip(video, 0, 255, out=video).astype(np.uint8)
