"""A shuffling sampler whose order depends only on (seed, epoch): resumed runs see the same batches."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSeededSampler(Sampler[int]):
    """Random permutation of range(n) from seed + epoch; Lightning calls `set_epoch` every epoch.

    Under DDP Lightning wraps it in a DistributedSamplerWrapper, which shards this order across ranks.
    """

    def __init__(self, num_items: int, seed: int = 0):
        self.num_items, self.seed, self.epoch = num_items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())
