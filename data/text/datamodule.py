"""LightningDataModule for text: SFT (JSONL) or language modelling (plain text)."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from data.text.collate import PadCollator
from data.text.datasets import SFTDataset, TextCorpusDataset
from data.text.packing import PackingCollator, check_pack_length
from data.text.sampler import EpochSeededSampler

log = logging.getLogger(__name__)

FORMATS = {"sft": SFTDataset, "lm": TextCorpusDataset}


class TextDataModule(L.LightningDataModule):
    """Args:
    train_file: JSONL (format=sft) or plain text (format=lm).
    val_file: optional; otherwise `val_fraction` of the training rows is held out (seeded).
    prepare: optional callable run once before reading (e.g. the demo corpus builder).
    packing: pack each training batch's examples into rows of `pack_length` tokens (default `max_length`;
        data/text/packing.py: position ids restart per document, no attention across documents); validation
        stays padded. For short documents a short row (a few documents) saves attention: see packing.py.
    pad_to_multiple_of: round every batch's length up to a multiple of this (1: the longest row). With
        the compiled fast path a few fixed lengths mean a few compiled graphs (and CUDA graphs) instead
        of one per length.
    full_blocks_only (format=lm): drop the corpus's last, shorter block (counted in the summary), so
        every batch has one shape and no padding.
    drop_last: the training loader drops each epoch's last, smaller batch (its rows are counted in the
        summary); with full blocks, every training batch then has one shape [batch_size, max_length]: a
        compiled, CUDA-graphed step never meets a second batch size. Validation keeps every row.
    The tokenizer comes from the recipe through `connect_tokenizer` (train.py calls it).
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        format: str = "sft",
        max_length: int = 512,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        strict: bool = False,
        seed: int = 0,
        prepare=None,
        packing: bool = False,
        pack_length: int | None = None,
        pad_to_multiple_of: int = 1,
        full_blocks_only: bool = False,
        drop_last: bool = False,
    ):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"data.format must be one of {sorted(FORMATS)}, got {format!r}")
        self.train_file, self.val_file, self.format = train_file, val_file, format
        self.max_length, self.batch_size = max_length, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction, self.num_workers, self.strict, self.seed = val_fraction, num_workers, strict, seed
        self.prepare, self.packing, self.pack_length = prepare, packing, pack_length
        check_pack_length(pack_length, max_length)  # a bad value fails here, not when the loader is made
        if pad_to_multiple_of < 1:
            raise ValueError(f"data.pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_to_multiple_of = pad_to_multiple_of
        if full_blocks_only and format != "lm":
            raise ValueError("data.full_blocks_only applies to format=lm (plain-text blocks) only")
        self.full_blocks_only, self.drop_last = full_blocks_only, drop_last
        self.tokenizer = None
        self.train_set = self.val_set = None

    def connect_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.tokenizer is None:
            raise RuntimeError("TextDataModule needs a tokenizer: call connect_tokenizer(tokenizer) first")
        dataset_cls = FORMATS[self.format]
        kwargs = {"max_length": self.max_length, "strict": self.strict}
        if self.full_blocks_only:
            kwargs["full_blocks_only"] = True
        train = dataset_cls(self.train_file, self.tokenizer, config_key="data.train_file", **kwargs)
        self.skip_reports = [train.report]
        if self.val_file:
            self.train_set = train
            self.val_set = dataset_cls(self.val_file, self.tokenizer, config_key="data.val_file", **kwargs)
            self.skip_reports.append(self.val_set.report)
        else:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = max(1, int(len(train) * self.val_fraction))
            self.train_set, self.val_set = Subset(train, order[n_val:]), Subset(train, order[:n_val])
        self.num_truncated = train.num_truncated
        self.num_skipped = sum(len(r) for r in self.skip_reports)

    def summary_lines(self) -> list[str]:
        """Data problems for the end-of-run summary: nothing is dropped silently."""
        if self.train_set is None:
            return []
        lines = [
            f"data: {self.num_skipped} unusable line(s) skipped, {self.num_truncated} example(s) truncated "
            f"to {self.max_length} tokens"
        ]
        lines += [f"  {report.summary()}" for report in self.skip_reports if len(report)]
        dropped = sum(getattr(d, "dropped_tokens", 0) for d in self._datasets())
        if dropped:
            lines.append(f"  {dropped} token(s) of a last, shorter block dropped (data.full_blocks_only)")
        if self._drops_last_batch() and len(self.train_set) % self.batch_size:
            lines.append(
                f"  {len(self.train_set) % self.batch_size} training row(s) per epoch left out of the last, "
                "smaller batch (data.drop_last; a reshuffled epoch trains on them)"
            )
        return lines

    def _datasets(self) -> list:
        """The underlying datasets of the train and validation sets (Subsets unwrapped, deduplicated)."""
        found = [getattr(d, "dataset", d) for d in (self.train_set, self.val_set) if d is not None]
        return list({id(d): d for d in found}.values())

    def _loader(self, dataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        sampler = EpochSeededSampler(len(dataset), self.seed) if shuffle else None
        pad = self.tokenizer.pad_token_id
        multiple = self.pad_to_multiple_of
        if shuffle and self.packing:
            collate = PackingCollator(pad, self.max_length, multiple, row_length=self.pack_length)
        else:
            collate = PadCollator(pad, multiple)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            drop_last=drop_last,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True, drop_last=self._drops_last_batch())

    def _drops_last_batch(self) -> bool:
        """data.drop_last, unless the training set is smaller than one batch (never an empty epoch)."""
        return self.drop_last and len(self.train_set) >= self.batch_size

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
