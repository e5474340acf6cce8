"""Per-clip transforms of auto_avsr: video crop/grayscale/normalise/time-mask, audio time-mask/noise.

All randomness comes from torch's global generator, which the DataLoader seeds per worker from its own
seeded generator, so a run is reproducible for a fixed seed and number of workers.
"""

from collections.abc import Callable, Sequence

import torch
import torchaudio.functional as AF

LRS3_GRAY_MEAN = 0.421
LRS3_GRAY_STD = 0.165
RGB_TO_GRAY = (0.299, 0.587, 0.114)


def adaptive_time_mask(x: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Zero ceil(T / stride) random spans of 0..window-1 steps along dim 0 of x [T, ...] (a copy)."""
    length = x.shape[0]
    if window <= 0 or length == 0:
        return x
    masked = x.clone()
    for _ in range(-(-length // stride)):
        span = int(torch.randint(0, window, ()).item())
        if span == 0 or span >= length:
            continue
        start = int(torch.randint(0, length - span + 1, ()).item())
        masked[start : start + span] = 0
    return masked


def crop(frames: torch.Tensor, size: int, random: bool) -> torch.Tensor:
    """Square crop of frames [T, C, H, W] to [T, C, size, size]: random offset, or centred."""
    height, width = frames.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"frames of {height}x{width} are smaller than the {size}x{size} crop")
    if random:
        top = int(torch.randint(0, height - size + 1, ()).item())
        left = int(torch.randint(0, width - size + 1, ()).item())
    else:
        top, left = (height - size) // 2, (width - size) // 2
    return frames[..., top : top + size, left : left + size]


class VideoTransform:
    """uint8 RGB frames [T, 3, H, W] (or gray [T, 1, H, W]) -> float32 [T, 1, crop, crop].

    Crop (random for training, centred for evaluation), grayscale, scale to [0, 1], normalise with the
    LRS3 statistics, then zero random time spans (zero is the mean after normalising).
    """

    def __init__(
        self,
        crop_size: int = 88,
        random_crop: bool = False,
        time_mask_window: int = 0,
        time_mask_stride: int = 25,
        mean: float = LRS3_GRAY_MEAN,
        std: float = LRS3_GRAY_STD,
    ):
        self.crop_size, self.random_crop = crop_size, random_crop
        self.time_mask_window, self.time_mask_stride = time_mask_window, time_mask_stride
        self.mean, self.std = mean, std

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        frames = crop(frames, self.crop_size, self.random_crop).float() / 255.0
        if frames.shape[1] == 3:
            weights = torch.tensor(RGB_TO_GRAY).view(1, 3, 1, 1)
            frames = (frames * weights).sum(dim=1, keepdim=True)
        frames = (frames - self.mean) / self.std
        return adaptive_time_mask(frames, self.time_mask_window, self.time_mask_stride)


class AudioTransform:
    """float32 waveform [S] at 16 kHz -> [S]: additive noise at a target SNR, then time masking.

    With probability `noise_probability` a noise segment (a random excerpt of `noise` [N], tiled if
    short; `noise(n) -> [n]` when it is a callable such as `data.avsr.noise.BabbleNoise`; white noise
    when `noise` is None) is mixed in at an SNR drawn from `noise_snr_db` with
    torchaudio.functional.add_noise. Time masking zeroes ceil(S / stride) spans of < window samples.
    """

    def __init__(
        self,
        time_mask_window: int = 0,
        time_mask_stride: int = 16_000,
        noise_snr_db: Sequence[float] = (),
        noise_probability: float = 0.0,
        noise: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
    ):
        self.time_mask_window, self.time_mask_stride = time_mask_window, time_mask_stride
        self.noise_snr_db = [float(snr) for snr in noise_snr_db]
        self.noise_probability = noise_probability
        self.noise = noise

    def _noise_like(self, waveform: torch.Tensor) -> torch.Tensor:
        if self.noise is None:
            return torch.randn_like(waveform)
        if callable(self.noise):
            return self.noise(waveform.numel()).to(waveform.dtype)
        repeats = -(-waveform.numel() // self.noise.numel()) + 1
        tiled = self.noise.repeat(repeats)
        start = int(torch.randint(0, tiled.numel() - waveform.numel() + 1, ()).item())
        return tiled[start : start + waveform.numel()]

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        add_noise = self.noise_snr_db and float(torch.rand(())) < self.noise_probability
        if add_noise and waveform.abs().sum() > 0:
            snr = self.noise_snr_db[int(torch.randint(0, len(self.noise_snr_db), ()).item())]
            noise = self._noise_like(waveform)
            waveform = AF.add_noise(waveform[None], noise[None], torch.tensor([snr]))[0]
        return adaptive_time_mask(waveform, self.time_mask_window, self.time_mask_stride)
