"""What a fine-tuning reads: the labelled splits (validation carved from training), the per-image augmentation before
the batched crop, and the data module serving them in :class:`~leanmim.data.sampler.GlobalBatchSampler` order.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..config import FinetuneConfig, ModelConfig
from ..data import BatchMIMAugment, DataError, build_labelled_splits
from ..data.common import worker_start_method
from ..data.sampler import GlobalBatchSampler
from ..data.splits import TrainValTest, carve_splits, folder_val_split
from .precision import pin_memory


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch (CPU), NumPy and Python's ``random`` inside the block and restore them after: timm's Mixup,
    RandomErasing and torchvision's policies draw from these global generators."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class TrainAugment(nn.Module):
    """The training view of a batch: (images uint8 (B, C, H, W), labels (B,)) -> (normalized (B, C, S, S),
    targets): labels (B,) int64, or soft targets (B, K) float under mixup/cutmix (label smoothing folded in).

    Order: auto-augment policy (per image, uint8) → crop + flip + normalize → random erasing → mixup/cutmix.
    ``forward(..., seed=s)`` makes every draw a function of ``s``.
    """

    def __init__(self, crop: BatchMIMAugment, num_classes: int, auto_augment: str = "none",
                 random_erasing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing
        from torchvision.transforms import v2

        self.crop = crop
        self.policy = {"none": None, "randaugment": v2.RandAugment(), "trivialaugment": v2.TrivialAugmentWide()}[
            auto_augment]
        self.erasing = RandomErasing(random_erasing, mode="pixel", device="cpu") if random_erasing > 0 else None
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                               num_classes=num_classes)

    def forward(self, images: Tensor, labels: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(seed)
        with seeded(seed + 1):
            if self.policy is not None:
                images = torch.stack([self.policy(image) for image in images])
            images = self.crop(images, generator=generator)
            if self.erasing is not None:
                images = self.erasing(images)
            if self.mixup is not None:
                images, labels = self.mixup(images, labels)
        return images, labels


class FinetuneData(L.LightningDataModule):
    """Labelled train split in :class:`GlobalBatchSampler` order; the whole validation split for validation."""

    def __init__(self, splits: TrainValTest, settings: FinetuneConfig, in_memory: bool):
        super().__init__()
        self.splits, self.settings = splits, settings
        self.workers = 0 if in_memory else min(4, os.cpu_count() or 1)

    def train_dataloader(self) -> DataLoader:
        sampler = GlobalBatchSampler(len(self.splits.train), self.settings.batch_size, self.settings.seed,
                                     self.trainer.global_rank, self.trainer.world_size)
        sampler.resume_at = getattr(self.trainer.lightning_module, "resume_at", None)  # resumed: skip what was trained
        if sampler.resume_at is not None:  # the first iterator is made before Lightning sets the epoch
            sampler.set_epoch(sampler.resume_at[0])
        return DataLoader(self.splits.train, batch_sampler=sampler, num_workers=self.workers,
                          persistent_workers=self.workers > 0, multiprocessing_context=worker_start_method(self.workers),
                          pin_memory=pin_memory(self.trainer))

    def evaluation_loader(self, dataset) -> DataLoader:
        # Every process evaluates the whole split: exact, and the split is small next to training.
        return DataLoader(dataset, batch_size=self.settings.batch_size, shuffle=False, num_workers=self.workers,
                          persistent_workers=False, multiprocessing_context=worker_start_method(self.workers),
                          pin_memory=pin_memory(self.trainer))

    def val_dataloader(self) -> DataLoader:
        return self.evaluation_loader(self.splits.val)


def labelled_data(data: str, img_size: int, in_chans: int, val_fraction: float, split_seed: int,
                  labels_per_class: int | None = None, label_fraction: float | None = None):
    """(labelled splits as built, train/val/test subsets): the validation split is the folder's val/ when it has
    train/, val/ and test/, else ``val_fraction`` of each class of train (0: none); then the label subset."""
    splits = build_labelled_splits(data, img_size, in_chans)
    val = folder_val_split(data, img_size, in_chans)
    if val is not None and type(val) is not type(splits.test):
        raise DataError(f"'{data}/val' and '{data}/test' were loaded differently (one in memory, one streamed): "
                        f"pass data whose splits fit in memory together, or drop val/ (--val-fraction carves one)")
    subsets = carve_splits(splits.train, splits.test, val_fraction, split_seed, labels_per_class, label_fraction, val)
    return splits, subsets


def finetune_splits(settings: FinetuneConfig, data: str, model: ModelConfig):
    """The labelled splits a fine-tuning with ``settings`` uses on ``data`` for ``model`` (a ModelConfig): see
    :func:`labelled_data`."""
    return labelled_data(data, model.img_size, model.in_chans, settings.val_fraction, settings.split_seed,
                         settings.labels_per_class, settings.label_fraction)
