"""AVSR loader: manifest parsing, skip counting, batch contract, transforms, frame-budget batching."""

import logging

import lightning as L
import numpy as np
import pytest
import torch

from data.avsr.batching import FrameBudgetBatchSampler, padded_frames
from data.avsr.datamodule import AVSRDataModule
from data.avsr.dataset import BadClipError
from data.avsr.manifest import ManifestError, ManifestRow, read_manifest, write_manifest
from data.avsr.media_io import SAMPLES_PER_VIDEO_FRAME, write_audio, write_video
from data.avsr.skip_report import ReportSkippedClips
from data.avsr.skipped_clips import SkipTally, skip_metrics
from data.avsr.transforms import LRS3_GRAY_MEAN, AudioTransform, VideoTransform, adaptive_time_mask

GOOD = {"clips/good_a.mp4": (10, "HELLO THERE"), "clips/good_b.mp4": (15, "GOOD MORNING TO YOU")}


def _write_clip(root, rel_path, frames, seed, audio_samples=None):
    rng = np.random.default_rng(seed)
    stem = root / rel_path[:-4]
    write_video(stem.with_suffix(".mp4"), rng.integers(0, 255, (frames, 96, 96, 3), dtype=np.uint8))
    samples = frames * SAMPLES_PER_VIDEO_FRAME if audio_samples is None else audio_samples
    write_audio(stem.with_suffix(".wav"), 0.3 * rng.standard_normal(samples).astype(np.float32))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A root with 2 good clips, one missing, one corrupt mp4, one empty wav, an empty transcript and a
    too-long clip (by its manifest length), listed in labels/val.csv."""
    root = tmp_path_factory.mktemp("lrs3")
    for seed, (rel_path, (frames, _)) in enumerate(GOOD.items()):
        _write_clip(root, rel_path, frames, seed)
    _write_clip(root, "clips/no_text.mp4", 8, 5)
    _write_clip(root, "clips/too_long.mp4", 8, 6)
    _write_clip(root, "clips/empty_audio.mp4", 8, 7, audio_samples=0)
    _write_clip(root, "clips/corrupt.mp4", 8, 8)
    (root / "clips/corrupt.mp4").write_bytes(b"\x00garbage, not an mp4" * 50)
    rows = [ManifestRow("lrs3", rel, frames, text) for rel, (frames, text) in GOOD.items()] + [
        ManifestRow("lrs3", "clips/missing.mp4", 10, "NOT HERE"),
        ManifestRow("lrs3", "clips/corrupt.mp4", 8, "BROKEN FILE"),
        ManifestRow("lrs3", "clips/empty_audio.mp4", 8, "SILENT"),
        ManifestRow("lrs3", "clips/no_text.mp4", 8, ""),
        ManifestRow("lrs3", "clips/too_long.mp4", 200, "FAR TOO LONG"),
    ]
    for split in ("train", "val", "test"):
        write_manifest(root / f"labels/{split}.csv", rows)
    return root


def _datamodule(root, **overrides):
    options = dict(root=str(root), max_frames=100, max_duration_s=2.0, num_workers=0, seed=3, strict=False)
    return AVSRDataModule(**{**options, **overrides})


def _all_batches(loader):
    return list(loader)


def test_batches_follow_the_contract_and_count_skipped_clips(corpus):
    datamodule = _datamodule(corpus)
    datamodule.setup("validate")
    batches = _all_batches(datamodule.val_dataloader())
    skipped = {reason: sum(batch["skipped"][reason] for batch in batches) for reason in batches[0]["skipped"]}
    assert skipped == {"missing": 1, "corrupt": 1, "truncated": 0, "empty": 2, "too_long": 1}
    clips = {clip_id: (batch, i) for batch in batches for i, clip_id in enumerate(batch["ids"])}
    assert set(clips) == set(GOOD)
    for clip_id, (batch, i) in clips.items():
        frames, text = GOOD[clip_id]
        assert batch["text"][i] == text
        assert batch["video_lengths"][i] == frames
        assert batch["audio_lengths"][i] == frames * SAMPLES_PER_VIDEO_FRAME
    for batch in batches:
        size = len(batch["ids"])
        assert batch["audio"].dtype == batch["video"].dtype == torch.float32
        assert batch["audio_lengths"].dtype == batch["video_lengths"].dtype == torch.long
        assert batch["audio"].shape == (size, max(batch["audio_lengths"].tolist(), default=0))
        assert batch["video"].shape == (size, max(batch["video_lengths"].tolist(), default=0), 1, 88, 88)
        for i in range(size):
            assert batch["video"][i, batch["video_lengths"][i] :].abs().sum() == 0
            assert batch["audio"][i, batch["audio_lengths"][i] :].abs().sum() == 0


def test_skip_counts_survive_worker_processes(corpus):
    datamodule = _datamodule(corpus, num_workers=1, noise_probability=0.5)
    datamodule.setup("fit")
    batches = _all_batches(datamodule.train_dataloader())
    assert sum(sum(batch["skipped"].values()) for batch in batches) == 5
    assert sorted(clip_id for batch in batches for clip_id in batch["ids"]) == sorted(GOOD)


@pytest.mark.parametrize(("modality", "absent"), [("audio", "video"), ("video", "audio")])
def test_single_modality_does_not_decode_the_other_stream(corpus, modality, absent):
    datamodule = _datamodule(corpus, modality=modality)
    datamodule.setup("test")
    batches = _all_batches(datamodule.test_dataloader())
    assert all(absent not in batch and f"{absent}_lengths" not in batch for batch in batches)
    # the corrupt mp4 only matters when video is decoded; the empty wav only when audio is
    corrupt = sum(batch["skipped"]["corrupt"] for batch in batches)
    empty = sum(batch["skipped"]["empty"] for batch in batches)
    assert (corrupt, empty) == ((0, 2) if modality == "audio" else (1, 1))


def test_strict_manifest_names_the_bad_row(tmp_path, caplog):
    manifest = tmp_path / "bad.csv"
    manifest.write_text("lrs3,a.mp4,10,HELLO\nlrs3,b.mp4,ten,WORLD\nlrs3,c.mp4\nlrs3,d.mp4,5,12 7,OK\n")
    with pytest.raises(ManifestError, match=r"row 2: input_length"):
        read_manifest(manifest, strict=True)
    with caplog.at_level(logging.WARNING):
        parsed = read_manifest(manifest, strict=False)
    assert [(row.rel_path, row.text) for row in parsed.rows] == [("a.mp4", "HELLO"), ("d.mp4", "OK")]
    assert [number for number, _ in parsed.bad_rows] == [2, 3]
    assert "row 2" in caplog.text and "row 3" in caplog.text


def test_manifest_accepts_header_quotes_and_auto_avsr_dataset_folder(tmp_path):
    _write_clip(tmp_path / "lrs3", "test/spk/00001.mp4", 5, 0)
    (tmp_path / "m.csv").write_text(
        'dataset,rel_path,input_length,text\nlrs3,test/spk/00001.mp4,5,"YES, SIR"\n'
    )
    datamodule = _datamodule(tmp_path, test_manifest="m.csv")
    datamodule.setup("test")
    (batch,) = _all_batches(datamodule.test_dataloader())
    assert batch["text"] == ["YES, SIR"] and batch["video_lengths"].tolist() == [5]


def test_missing_paths_name_the_config_key(tmp_path, corpus, caplog):
    with pytest.raises(FileNotFoundError, match="data.root"):
        _datamodule(tmp_path / "nowhere").setup("fit")
    with pytest.raises(FileNotFoundError, match="data.train_manifest"):
        _datamodule(corpus, train_manifest="labels/absent.csv").setup("fit")
    with caplog.at_level(logging.WARNING, logger="data.avsr.datamodule"):
        fitted = _datamodule(corpus, max_duration_s=10.0)  # 250 frames > the 100-frame budget
    assert fitted.max_duration_s == 4.0 and "data.max_frames" in caplog.text


class _CountingModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def validation_step(self, batch, batch_idx):
        self.log_dict(skip_metrics(batch["skipped"]), reduce_fx="sum", batch_size=1)


def test_datamodule_tallies_skips_in_a_lightning_run(corpus, caplog):
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[ReportSkippedClips()],
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="data.avsr.skipped_clips"):
        (metrics,) = trainer.validate(_CountingModule(), datamodule=_datamodule(corpus), verbose=False)
    assert metrics["data/skipped_missing"] == 1 and metrics["data/skipped_empty"] == 2
    assert "val epoch: 5 clips skipped" in caplog.text


def test_skip_tally_sums_batches_and_resets():
    tally = SkipTally()
    tally.add("train", {"missing": 1, "corrupt": 0, "empty": 2, "too_long": 0})
    tally.add("train", {"missing": 1, "corrupt": 1, "empty": 0, "too_long": 0})
    assert tally.report("train") == {"missing": 2, "corrupt": 1, "truncated": 0, "empty": 2, "too_long": 0}
    assert sum(tally.report("train").values()) == 0


def test_video_transform_shapes_and_statistics():
    torch.manual_seed(0)
    gray = torch.full((20, 3, 96, 96), round(LRS3_GRAY_MEAN * 255), dtype=torch.uint8)
    out = VideoTransform()(gray)
    assert out.shape == (20, 1, 88, 88) and out.dtype == torch.float32
    assert out.abs().max() < 0.02  # the LRS3 mean gray maps to ~0
    frames = torch.randint(0, 256, (50, 3, 96, 96), dtype=torch.uint8)
    frames[:, :, :4] = 0  # a border that only a shifted crop can include
    centre = VideoTransform()(frames)
    expected = (
        frames[:, :, 4:92, 4:92].float() / 255 * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    ).sum(1)
    assert torch.allclose(centre[:, 0], (expected - 0.421) / 0.165, atol=1e-5)
    crops = {tuple(VideoTransform(random_crop=True)(frames[:1])[0, 0, 0, :3].tolist()) for _ in range(20)}
    assert len(crops) > 1  # random crops move
    masked = VideoTransform(random_crop=True, time_mask_window=10, time_mask_stride=25)(frames)
    zero_frames = int((masked.flatten(1).abs().sum(1) == 0).sum())
    assert 0 < zero_frames <= 2 * 9


def test_audio_noise_reaches_the_target_snr_and_masks_zero_spans():
    torch.manual_seed(0)
    clean = torch.sin(torch.arange(32_000) * 0.05) * 0.5
    noisy = AudioTransform(noise_snr_db=[10.0], noise_probability=1.0)(clean)
    snr = 10 * torch.log10(clean.pow(2).sum() / (noisy - clean).pow(2).sum())
    assert snr.item() == pytest.approx(10.0, abs=0.3)
    assert torch.equal(AudioTransform(noise_snr_db=[10.0], noise_probability=0.0)(clean), clean)
    masked = adaptive_time_mask(torch.ones(32_000), window=6400, stride=16_000)
    assert masked.shape == (32_000,) and 0 < (masked == 0).sum() <= 2 * 6399


def test_frame_budget_batches_cover_each_clip_once_within_budget():
    lengths = np.random.default_rng(0).integers(5, 60, size=300).tolist()
    sampler = FrameBudgetBatchSampler(lengths, max_frames=200, shuffle=True, seed=7)
    epoch0, epoch1 = list(sampler), list(sampler)
    for batches in (epoch0, epoch1):
        assert all(padded_frames([lengths[i] for i in batch]) <= 200 for batch in batches)
        assert sorted(i for batch in batches for i in batch) == list(range(300))
        assert len(batches) == len(sampler)
    assert epoch0 != epoch1  # reshuffled per epoch
    again = FrameBudgetBatchSampler(lengths, max_frames=200, shuffle=True, seed=7)
    assert list(again) == epoch0  # reproducible from the seed
    again.set_epoch(1)
    assert list(again) == epoch1
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch0]
    assert np.mean(spread) < 5  # batches are length buckets


def test_frame_budget_batches_are_disjoint_across_two_ranks():
    lengths = np.random.default_rng(1).integers(5, 60, size=301).tolist()
    shares = [list(FrameBudgetBatchSampler(lengths, 200, seed=7, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1])
    clips = [{i for batch in share for i in batch} for share in shares]
    assert not clips[0] & clips[1]
    assert clips[0] | clips[1] == set(range(301))
    with pytest.raises(ValueError, match="exceeds max_frames"):
        FrameBudgetBatchSampler([10, 300], max_frames=200)


# ---- bad clips and bad text ------------------------------------------------------------------------


def _faststart(mp4: bytes) -> bytes:
    """Move the `moov` box before `mdat` (as `ffmpeg -movflags +faststart` does) and shift the chunk offsets,
    so that a file cut short keeps its header and still opens: the truncated files seen in real corpora."""
    boxes, i = [], 0
    while i < len(mp4):
        size = int.from_bytes(mp4[i : i + 4], "big")
        boxes.append((mp4[i + 4 : i + 8], mp4[i : i + size]))
        i += size
    moov = bytearray(next(box for kind, box in boxes if kind == b"moov"))
    at = moov.find(b"stco")
    while at >= 0:
        count = int.from_bytes(moov[at + 8 : at + 12], "big")
        for entry in range(count):
            start = at + 12 + 4 * entry
            offset = int.from_bytes(moov[start : start + 4], "big")
            moov[start : start + 4] = (offset + len(moov)).to_bytes(4, "big")
        at = moov.find(b"stco", at + 4)
    head = [box for kind, box in boxes if kind == b"ftyp"]
    rest = [box for kind, box in boxes if kind not in (b"ftyp", b"moov")]
    return b"".join(head) + bytes(moov) + b"".join(rest)


def _one_clip_root(tmp_path, frames=50, manifest_frames=None, text="A WHOLE SENTENCE"):
    _write_clip(tmp_path, "clips/a.mp4", frames, 0)
    mp4 = tmp_path / "clips/a.mp4"
    mp4.write_bytes(_faststart(mp4.read_bytes()))
    row = ManifestRow("lrs3", "clips/a.mp4", manifest_frames or frames, text)
    for split in ("train", "val", "test"):
        write_manifest(tmp_path / f"labels/{split}.csv", [row])
    return tmp_path


def _val_outcome(root, **overrides):
    datamodule = _datamodule(root, **overrides)
    datamodule.setup("validate")
    (batch,) = _all_batches(datamodule.val_dataloader())
    return batch["ids"], {reason: n for reason, n in batch["skipped"].items() if n}


def test_the_faststart_helper_keeps_a_whole_clip_good(tmp_path):
    assert _val_outcome(_one_clip_root(tmp_path)) == (["clips/a.mp4"], {})


def test_mp4_truncated_by_bytes_is_skipped_as_truncated(tmp_path):
    root = _one_clip_root(tmp_path)
    mp4 = root / "clips/a.mp4"
    data = mp4.read_bytes()
    mp4.write_bytes(data[: len(data) // 2])  # the header survives, half of the frames do not
    assert _val_outcome(root) == ([], {"truncated": 1})
    assert _val_outcome(root, modality="audio") == (["clips/a.mp4"], {})  # the wav is whole


def test_clip_shorter_than_its_manifest_is_skipped_as_truncated(tmp_path):
    root = _one_clip_root(tmp_path, frames=20, manifest_frames=50)  # header and decoder agree on 20
    assert _val_outcome(root) == ([], {"truncated": 1})
    assert _val_outcome(root, modality="audio") == ([], {"truncated": 1})
    assert _val_outcome(_one_clip_root(tmp_path / "close", frames=49, manifest_frames=50)) == (
        ["clips/a.mp4"],
        {},
    )  # a frame short is within the tolerance


def test_wav_truncated_by_bytes_is_skipped_as_truncated(tmp_path):
    root = _one_clip_root(tmp_path)
    wav = root / "clips/a.wav"
    data = wav.read_bytes()
    wav.write_bytes(data[: len(data) // 2])
    assert _val_outcome(root, modality="audio") == ([], {"truncated": 1})


@pytest.mark.parametrize("text", ["...", " ?! , ", "--"])
def test_punctuation_only_transcript_is_empty(tmp_path, text):
    assert _val_outcome(_one_clip_root(tmp_path, text=text)) == ([], {"empty": 1})


def test_strict_makes_bad_clips_fail_and_names_the_option(corpus, tmp_path):
    datamodule = _datamodule(corpus, strict=True)
    datamodule.setup("validate")
    with pytest.raises(BadClipError, match="data.strict=false"):
        _all_batches(datamodule.val_dataloader())
    root = _one_clip_root(tmp_path)
    mp4 = root / "clips/a.mp4"
    mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    with pytest.raises(BadClipError, match="truncated"):
        _val_outcome(root, strict=True)


def test_too_long_clips_are_filtered_not_failed_under_strict(tmp_path):
    root = _one_clip_root(tmp_path, frames=20, manifest_frames=80)  # 80 frames > max_duration_s=2.0
    assert _val_outcome(root, strict=True) == ([], {"too_long": 1})


def test_rejected_manifest_rows_appear_in_the_run_summary(corpus, tmp_path):
    manifest = tmp_path / "val.csv"
    good = (corpus / "labels/val.csv").read_text().splitlines()[0]
    manifest.write_text(f"{good}\nlrs3,b.mp4,ten,WORLD\nlrs3,c.mp4\n")
    datamodule = _datamodule(corpus, val_manifest=str(manifest))
    datamodule.setup("validate")
    lines = datamodule.summary_lines()
    assert "data: manifest rows rejected: val 2 (rows 2, 3)" in lines
