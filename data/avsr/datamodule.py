"""LightningDataModule for LRS3-layout AVSR data (real LRS3 prepared by auto_avsr, or the synthetic corpus).

Batches follow the contract in `data/avsr/collate.py`. Training batches come from a frame-budget,
DDP-aware batch sampler, so the Trainer needs `use_distributed_sampler=False` (checked here).
Skipped clips are counted per batch in `batch["skipped"]`, summed here as batches reach the main process,
and reported by `report_skipped(stage)` (the `ReportSkippedClips` callback calls it at epoch ends).
"""

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from data.avsr.batching import FrameBudgetBatchSampler
from data.avsr.collate import AVSRCollate
from data.avsr.dataset import MODALITIES, AVSRDataset
from data.avsr.manifest import read_manifest
from data.avsr.media_io import VIDEO_FPS, read_audio
from data.avsr.noise import BabbleNoise, load_babble_sources
from data.avsr.skipped_clips import SkipTally
from data.avsr.transforms import AudioTransform, VideoTransform

SPLITS = ("train", "val", "test")
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}

log = logging.getLogger(__name__)


class AVSRDataModule(L.LightningDataModule):
    """Train/val/test loaders over CSV manifests under `root` (manifest paths relative to root or absolute).

    modality: "audio" | "video" | "audiovisual"; the unused stream is never decoded.
    max_frames: padded-frame budget per batch (video frames at 25 fps, also for audio-only).
    max_duration_s: longer clips are skipped ("too_long"). A limit that does not fit the budget
        (25 * s > max_frames) is lowered to max_frames / 25 with a warning: the batch budget wins.
    strict: a bad manifest row raises with its row number and a bad clip (missing, corrupt, truncated,
        empty) raises naming it; otherwise both are skipped, counted, warned about and listed in the summary.
    spm_model: SentencePiece model that decodes auto_avsr's token-id labels to text (null: labels are text).
    Augmentation (training only): random crop, video/audio time masks (window 0 disables), noise at an SNR
    from `noise_snr_db` with probability `noise_probability` (white noise, or excerpts of `noise_file`, or
    with `noise_kind="babble"` the sum of `noise_babble_talkers` other training clips, data/avsr/noise.py).
    eval_noise_snr_db: mix noise into val/test audio at this SNR (robustness evaluation); None for clean.
    prepare: called without arguments in `prepare_data` (e.g. the synthetic corpus builder, a partial).
    """

    def __init__(
        self,
        root: str,
        train_manifest: str = "labels/train.csv",
        val_manifest: str = "labels/val.csv",
        test_manifest: str = "labels/test.csv",
        modality: str = "audiovisual",
        max_frames: int = 1800,
        num_workers: int = 2,
        strict: bool = True,
        spm_model: str | None = None,
        max_duration_s: float = 24.0,
        crop_size: int = 88,
        video_time_mask_window: int = 10,
        video_time_mask_stride: int = 25,
        audio_time_mask_window: int = 6400,
        audio_time_mask_stride: int = 16_000,
        noise_snr_db: Sequence[float] = (-5, 0, 5, 10, 15, 20),
        noise_probability: float = 0.0,
        noise_file: str | None = None,
        noise_kind: str | None = None,
        noise_babble_talkers: int = 6,
        noise_babble_pool: int = 64,
        eval_noise_snr_db: float | None = None,
        pin_memory: bool = False,
        seed: int = 0,
        prepare: Callable[[], object] | None = None,
    ):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"data.modality must be one of {MODALITIES}, got {modality!r}")
        if max_duration_s * VIDEO_FPS > max_frames:
            # An experiment's batch budget (e.g. avsr_decorr's 400 frames for CPU) composed with a data group's
            # clip limit (lrs3: 24 s = 600 frames): the budget, set later, wins and the limit follows it.
            fitted = max_frames / VIDEO_FPS
            log.warning(
                "data.max_duration_s=%s (%.0f frames) does not fit data.max_frames=%d: clips longer than %.2f s "
                "are skipped (too_long). Raise data.max_frames to at least %.0f to keep them.",
                max_duration_s,
                max_duration_s * VIDEO_FPS,
                max_frames,
                fitted,
                max_duration_s * VIDEO_FPS,
            )
            max_duration_s = fitted
        self.root = Path(root)
        self.manifests = {"train": train_manifest, "val": val_manifest, "test": test_manifest}
        self.modality, self.max_frames, self.num_workers = modality, max_frames, num_workers
        self.strict, self.max_duration_s, self.crop_size = strict, max_duration_s, crop_size
        self.spm_model = spm_model
        self.video_time_mask = (video_time_mask_window, video_time_mask_stride)
        self.audio_time_mask = (audio_time_mask_window, audio_time_mask_stride)
        self.noise_snr_db, self.noise_probability = list(noise_snr_db), noise_probability
        self.noise_file, self.eval_noise_snr_db = noise_file, eval_noise_snr_db
        if noise_kind not in (None, "white", "babble"):
            raise ValueError(f"data.noise_kind must be null, white or babble, got {noise_kind!r}")
        self.noise_kind, self.babble = noise_kind, (noise_babble_talkers, noise_babble_pool)
        self.pin_memory, self.seed, self.prepare = pin_memory, seed, prepare
        self.datasets: dict[str, AVSRDataset] = {}
        self.bad_rows: dict[str, list[tuple[int, str]]] = {}
        self.skip_tally = SkipTally()

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def manifest_path(self, split: str) -> Path:
        path = Path(self.manifests[split])
        return path if path.is_absolute() else self.root / path

    def _transforms(self, split: str) -> tuple[VideoTransform, AudioTransform]:
        if split == "train":
            noise = read_audio(Path(self.noise_file)) if self.noise_file else None
            if self.noise_kind == "babble" and self.noise_probability > 0:
                noise = self._babble(split)
            return (
                VideoTransform(self.crop_size, True, *self.video_time_mask),
                AudioTransform(*self.audio_time_mask, self.noise_snr_db, self.noise_probability, noise),
            )
        eval_snr = [] if self.eval_noise_snr_db is None else [self.eval_noise_snr_db]
        noise = read_audio(Path(self.noise_file)) if self.noise_file and eval_snr else None
        return VideoTransform(self.crop_size), AudioTransform(0, 16_000, eval_snr, 1.0, noise)

    def _babble(self, split: str) -> BabbleNoise:
        """Babble made of other clips of the split's manifest (training augmentation)."""
        talkers, pool = self.babble
        rows = read_manifest(self.manifest_path(split), strict=False).rows
        sources = [audio for _, audio in load_babble_sources(self.root, rows, pool, self.seed)]
        return BabbleNoise(sources, talkers)

    def setup(self, stage: str | None = None) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root: directory {self.root} does not exist")
        for split in STAGE_SPLITS.get(stage or "", SPLITS):
            path = self.manifest_path(split)
            if not path.is_file():
                raise FileNotFoundError(
                    f"data.{split}_manifest: {path} does not exist (relative paths are under data.root)"
                )
            manifest = read_manifest(path, strict=self.strict, spm_model=self.spm_model)
            self.bad_rows[split] = manifest.bad_rows
            video_transform, audio_transform = self._transforms(split)
            self.datasets[split] = AVSRDataset(
                self.root,
                manifest.rows,
                self.modality,
                video_transform,
                audio_transform,
                self.max_duration_s,
                strict=self.strict,
            )
            log.info("%s: %d clips from %s", split, len(manifest.rows), path)

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _check_trainer_keeps_sampler(self) -> None:
        connector = getattr(self.trainer, "_accelerator_connector", None)
        if (
            self.trainer is not None
            and self.trainer.world_size > 1
            and getattr(connector, "use_distributed_sampler", False)
        ):
            raise ValueError(
                "AVSRDataModule shards its frame-budget batches over ranks itself: "
                "set trainer.use_distributed_sampler=false"
            )

    def _loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        self._check_trainer_keeps_sampler()
        dataset = self.datasets[split]
        rank, world_size = self._rank_and_world()
        budget = int(self.max_duration_s * VIDEO_FPS)
        sampler = FrameBudgetBatchSampler(
            [min(length, budget) for length in dataset.lengths],  # longer clips are skipped, not packed
            self.max_frames,
            shuffle=split == "train",
            seed=self.seed,
            rank=rank,
            world_size=world_size,
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=AVSRCollate(self.modality, self.crop_size),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0 and split == "train",
            generator=torch.Generator().manual_seed(self.seed + rank),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def _current_stage(self) -> str | None:
        trainer = self.trainer
        if trainer is None or trainer.sanity_checking:
            return None
        if trainer.training:
            return "train"
        if trainer.validating:
            return "val"
        return "test" if trainer.testing else None

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Runs in the main process for every batch: add its skip counts to the stage's running total."""
        stage = self._current_stage()
        if stage is not None and isinstance(batch, dict) and "skipped" in batch:
            self.skip_tally.add(stage, batch["skipped"])
        return batch

    def summary_lines(self) -> list[str]:
        """Skipped clips of this process over the whole run, per stage, and manifest rows rejected at parse
        time (strict=false), for the end-of-run summary."""
        if not self.skip_tally.run_totals:
            lines = ["data: no clip skipped"]
        else:
            parts = [
                f"{stage} {sum(c.values())} ({', '.join(f'{r} {n}' for r, n in c.items() if n) or 'none'})"
                for stage, c in sorted(self.skip_tally.run_totals.items())
            ]
            lines = ["data: clips skipped: " + "; ".join(parts)]
        rejected = {split: rows for split, rows in sorted(self.bad_rows.items()) if rows}
        if rejected:
            parts = [
                f"{split} {len(rows)} (rows {', '.join(str(n) for n, _ in rows[:10])}{', ...' if len(rows) > 10 else ''})"
                for split, rows in rejected.items()
            ]
            lines.append("data: manifest rows rejected: " + "; ".join(parts))
        return lines

    def report_skipped(self, stage: str) -> dict[str, int]:
        """Log and return the skipped-clip totals of `stage` since the last report (all ranks summed when a
        process group is up: call it on every rank), then reset them."""
        return self.skip_tally.report(stage)
