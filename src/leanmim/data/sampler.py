"""The order of training batches: shuffled per epoch, the same on every process, resumable mid-epoch."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from ..config import ConfigError
from .common import sample_draw_seed


class SampleIndex(int):
    """A dataset index that also carries the seed of the sample's random draws in this epoch (``draw_seed``).

    It is an int everywhere (tensor indexing, ``Subset``, lists), so datasets that ignore the seed take it
    as a plain index; a streamed folder (``ImageFileDataset``) seeds the sample's crop with it."""

    draw_seed: int

    def __new__(cls, index: int, draw_seed: int) -> "SampleIndex":
        value = super().__new__(cls, index)
        value.draw_seed = draw_seed
        return value

    def __reduce__(self):  # sent to loader workers by pickle: keep the seed
        return SampleIndex, (int(self), self.draw_seed)


class GlobalBatchSampler(Sampler[list[int]]):
    """Shuffled batches, identical on every process; each process takes its contiguous slice.

    The order depends only on (seed, epoch), so resuming at an epoch boundary repeats the
    uninterrupted order, and process r of W sees images [r·B, (r+1)·B) of each global batch of W·B.
    Each index is a :class:`SampleIndex` whose ``draw_seed`` is ``sample_draw_seed(seed, epoch, index)``:
    a streamed sample's crop depends on (seed, epoch, index) only, not on its batch, process or worker.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches already trained in it)
        if len(self) == 0:
            raise ConfigError(f"the dataset has {num_items} images, fewer than one global batch of "
                              f"{batch_size * world_size}: lower --batch-size")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> "GlobalBatchSampler":
        # Lightning calls set_epoch on ``batch_sampler.sampler`` (never on the batch sampler itself): point it here,
        # otherwise every epoch would repeat epoch 0's order
        return self

    def __len__(self) -> int:
        return self.num_items // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + 7919 * self.epoch))
        global_batch = self.batch_size * self.world_size
        first = 0
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            first = self.resume_at[1]  # resumed mid-epoch: the same order, without the batches already trained
            self.resume_at = None
        for step in range(first, len(self)):
            start = step * global_batch + self.rank * self.batch_size
            yield [SampleIndex(index, sample_draw_seed(self.seed, self.epoch, index))
                   for index in order[start:start + self.batch_size].tolist()]
