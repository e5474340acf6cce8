"""Collate clips into the AVSR batch contract, dropping and counting skipped clips.

batch = {
  "audio": float32 [B, S_max] 16 kHz waveform, zero-padded      (absent for modality "video")
  "audio_lengths": long [B] samples                              (absent for modality "video")
  "video": float32 [B, F_max, 1, 88, 88] normalised, zero-padded (absent for modality "audio")
  "video_lengths": long [B] frames at 25 fps                     (absent for modality "audio")
  "text": list[str] transcripts as in the manifest,
  "ids": list[str] manifest rel_paths,
  "skipped": dict[str, int] clips of this batch left out, by reason (all reasons present),
}
B is 0 when every clip of a batch was skipped.
"""

from collections.abc import Sequence

import torch

from data.avsr.dataset import MODALITIES, AVSRClip
from data.avsr.skipped_clips import ClipSkipped, zero_counts


def pad_stack(tensors: Sequence[torch.Tensor], trailing_shape: tuple[int, ...]) -> torch.Tensor:
    """Stack tensors [L_i, *trailing] into [B, max L_i, *trailing], zero-padded at the end of dim 1."""
    longest = max((tensor.shape[0] for tensor in tensors), default=0)
    out = torch.zeros(len(tensors), longest, *trailing_shape, dtype=torch.float32)
    for index, tensor in enumerate(tensors):
        out[index, : tensor.shape[0]] = tensor
    return out


class AVSRCollate:
    """Picklable collate_fn for DataLoader workers; `crop_size` fixes the video shape of empty batches."""

    def __init__(self, modality: str, crop_size: int = 88):
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        self.modality, self.crop_size = modality, crop_size

    def __call__(self, items: Sequence[AVSRClip | ClipSkipped]) -> dict:
        skipped = zero_counts()
        clips = []
        for item in items:
            if isinstance(item, ClipSkipped):
                skipped[item.reason] += 1
            else:
                clips.append(item)
        batch: dict = {"text": [clip.text for clip in clips], "ids": [clip.clip_id for clip in clips]}
        if self.modality in ("audio", "audiovisual"):
            batch["audio"] = pad_stack([clip.audio for clip in clips], ())
            batch["audio_lengths"] = torch.tensor([clip.audio.shape[0] for clip in clips], dtype=torch.long)
        if self.modality in ("video", "audiovisual"):
            batch["video"] = pad_stack([clip.video for clip in clips], (1, self.crop_size, self.crop_size))
            batch["video_lengths"] = torch.tensor([clip.video.shape[0] for clip in clips], dtype=torch.long)
        batch["skipped"] = skipped
        return batch
