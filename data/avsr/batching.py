"""Frame-budget batching: batches of similar-length clips whose padded size stays within `max_frames`.

The padded size of a batch is (number of clips) x (longest clip), in video frames at 25 fps. Clips are
sorted by length (ties broken randomly per epoch), so each batch is a run of similar lengths (a length
bucket), packed greedily; the batch order is shuffled per epoch. Because packing depends only on the
sorted lengths, the number of batches is the same every epoch, which Lightning needs for `len()`.

DDP: every rank builds the same global list from (seed, epoch), batches are split until their count is a
multiple of the world size (a split batch stays within budget), and rank r takes batches r, r+W, ...
So ranks get disjoint clips and equal batch counts. Lightning must not wrap this sampler:
set `trainer.use_distributed_sampler=false` (AVSRDataModule checks it).
"""

from collections.abc import Iterator, Sequence

import numpy as np


def padded_frames(batch_lengths: Sequence[int]) -> int:
    """Frames a batch occupies once zero-padded: clips x longest clip."""
    return len(batch_lengths) * max(batch_lengths, default=0)


def pack_by_budget(order: Sequence[int], lengths: Sequence[int], max_frames: int) -> list[list[int]]:
    """Greedily cut `order` (indices sorted by length) into batches of padded size <= max_frames."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        candidate_longest = max(longest, lengths[index])
        if current and (len(current) + 1) * candidate_longest > max_frames:
            batches.append(current)
            current, candidate_longest = [], lengths[index]
        current.append(int(index))
        longest = candidate_longest
    if current:
        batches.append(current)
    return batches


def split_to_multiple(batches: list[list[int]], multiple: int) -> list[list[int]]:
    """Halve the largest batches until the count is a multiple of `multiple`. Only if every batch has a
    single clip does it repeat batches from the start instead (then a few clips are seen twice)."""
    batches = [list(batch) for batch in batches]
    while batches and len(batches) % multiple:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[largest]) < 2:
            shortfall = multiple - len(batches) % multiple
            return batches + [list(batches[i % len(batches)]) for i in range(shortfall)]
        batch = batches[largest]
        batches[largest : largest + 1] = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
    return batches


class _EpochSetter:
    """Lightning calls `dataloader.batch_sampler.sampler.set_epoch(epoch)`; this forwards it."""

    def __init__(self, owner: "FrameBudgetBatchSampler"):
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class FrameBudgetBatchSampler:
    """Batch sampler yielding lists of dataset indices; see the module docstring.

    lengths: clip lengths in video frames (each must be <= max_frames).
    shuffle: random tie-breaks and batch order per epoch (training); else sorted by length.
    The epoch advances by itself after each pass and can be set with `set_epoch` (resumption).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_frames: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) and self.lengths.max() > max_frames:
            raise ValueError(
                f"a clip of {self.lengths.max()} frames exceeds max_frames={max_frames}; "
                "lower max_duration_s or raise max_frames"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.max_frames, self.shuffle, self.seed = max_frames, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.sampler = _EpochSetter(self)
        self._num_batches: int | None = None  # the same for every epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches for an epoch, in the order they are dealt out."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.shuffle:
            order = np.lexsort((rng.permutation(len(self.lengths)), self.lengths))
        else:
            order = np.argsort(self.lengths, kind="stable")
        batches = split_to_multiple(pack_by_budget(order, self.lengths, self.max_frames), self.world_size)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)
        self.epoch += 1
        yield from batches[self.rank :: self.world_size]

    def __len__(self) -> int:
        if self._num_batches is None:
            self._num_batches = len(self.global_batches(self.epoch)) // self.world_size
        return self._num_batches
