"""Unlabelled pretraining images from any source: what the engine trains on (:class:`MIMData`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from . import idx
from .augment import BatchEvalTransform, BatchFlipNormalize, BatchMIMAugment, WorkerCrop, worker_eval_view
from .common import DataError, SkipLog, TensorImages, channel_stats, check_args, stored_hw, stored_size
from .folder import (ImageFileDataset, WholeImages, canvas_shape, decode_folder, decode_whole, labelled_layout,
                     list_images)
from .shards import ShardSource, open_shards
from .source import resolve

SHUFFLE_BUFFER = 5000


@dataclass
class MIMData:
    """What the pretraining engine needs.

    ``dataset`` is one of:
      * in memory, uint8 (C, S, S) per item (idx data, and the evaluation view of folders), or whole
        images ``(canvas uint8 (C, Hc, Wc), size (2,))`` (folders with augmentation); ``batch_transform``
        is then a BatchMIMAugment, or a BatchEvalTransform without augmentation, that the engine applies per
        batch as ``batch_transform(images, generator=..., rank=..., world_size=...)``;
      * streamed files (a folder larger than the memory budget): uint8 (C, img_size, img_size) per item, the
        sample's RandomResizedCrop already cut and resized by the loader worker (``WorkerCrop``, seeded by
        (seed, epoch, index) through GlobalBatchSampler's indices), or the evaluation view without
        augmentation; ``batch_transform`` is a BatchFlipNormalize (flip + normalize), or a
        BatchEvalTransform (normalize), applied per batch like the in-memory ones;
      * streamed shards: a :class:`ShardSource` (``len()`` = samples per epoch) whose ``loader(...)`` the
        engine asks for this process's batches, uint8 (B, C, img_size, img_size) each, cropped the same way
        (seeded by each sample's position in its stream); ``batch_transform`` as for streamed files.
    Every item is uint8; the float work (flip, normalisation, and in memory the crop) is the batch_transform's,
    on the training device.
    ``skipped_files`` also picks up samples a streaming dataset finds unreadable later (in workers too).
    """
    dataset: Dataset | ShardSource
    batch_transform: nn.Module | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_images: int
    skipped_files: list[str]
    name: str
    in_memory: bool


def live_skipped_files(*dataset_fields: str) -> property:
    """``skipped_files`` = the files given at construction + those the datasets record later."""
    def get(self) -> list[str]:
        found = [f for name in dataset_fields for f in getattr(getattr(self, name), "skipped_files", [])]
        return list(dict.fromkeys(self._skipped_files + found))

    def set(self, value: list[str]) -> None:
        self._skipped_files = list(value)
    return property(get, set)


MIMData.skipped_files = live_skipped_files("dataset")


def build_pretrain_data(data: str, img_size: int, in_chans: int, crop_min_scale: float = 0.2,
                        hflip: bool = True, max_memory_bytes: int = 4 << 30, augment: bool = True,
                        samples_per_epoch: int = 0, shuffle_buffer: int = SHUFFLE_BUFFER) -> MIMData:
    """Unlabelled pretraining images from "fashion-mnist" (train split), an MNIST-format directory, an image
    directory (its train/ split if it has the labelled layout) or shards (their train split).

    ``augment=False`` swaps RandomResizedCrop + flip for the deterministic evaluation view
    (BatchEvalTransform in memory; resize + centre crop in the loader workers, then BatchEvalTransform, when
    streaming). ``samples_per_epoch`` (shards):
    the epoch length, default the shards' sample count from their manifest.
    """
    check_args(img_size, in_chans)
    kind, path, name = resolve(data)

    def batch_transform(mean, std, crop_size=None) -> nn.Module:
        if augment:
            return BatchMIMAugment(img_size, mean, std, scale=(crop_min_scale, 1.0), hflip=hflip)
        return BatchEvalTransform(img_size, mean, std, crop_size=crop_size)

    def streamed(mean, std) -> tuple[nn.Module, nn.Module]:
        """(the loader workers' uint8 transform, the batch transform) for streamed data."""
        if augment:
            return WorkerCrop(img_size, scale=(crop_min_scale, 1.0)), BatchFlipNormalize(mean, std, hflip=hflip)
        return worker_eval_view(img_size), BatchEvalTransform(img_size, mean, std)

    if kind == "idx":  # always in memory: the idx file is the decoded array already
        images = idx.idx_images(idx.idx_paths(path)["train_images"])
        mean, std = idx.idx_stats(name, images, in_chans)
        return MIMData(TensorImages(images.expand(-1, in_chans, -1, -1)), batch_transform(mean, std),
                       mean, std, len(images), [], name, True)
    if kind == "shards":
        return _shard_data(path, name, in_chans, streamed, samples_per_epoch, shuffle_buffer)
    layout = labelled_layout(path)
    files = list_images(layout[0] if layout else path)
    size, box = stored_size(img_size), stored_hw(img_size)   # whole images' shorter side; the evaluation box
    in_memory = len(files) * in_chans * size * size <= max_memory_bytes
    canvas = canvas_shape(files, size) if in_memory and augment else None
    if canvas is not None and len(files) * in_chans * canvas[0] * canvas[1] > max_memory_bytes:
        in_memory = False
    if in_memory and canvas is not None:  # whole images: crops sample each image's full area
        images, sizes, kept, skipped = decode_whole(files, in_chans, size, canvas)
        if not kept:
            raise DataError(f"none of the {len(files)} image files under '{path}' could be read "
                            f"(e.g. '{files[0]}'): check the files or pass another --data directory")
        mean, std = channel_stats(images[:, :, :size, :size])  # the top-left S x S lies inside every image
        return MIMData(WholeImages(images, sizes), batch_transform(mean, std), mean, std, len(kept), skipped,
                       name, True)
    images, files, _, skipped = decode_folder(files, path, in_chans, box, in_memory)
    mean, std = channel_stats(images)
    if in_memory:
        return MIMData(TensorImages(images), batch_transform(mean, std, crop_size=img_size), mean, std,
                       len(files), skipped, name, True)
    worker_transform, device_transform = streamed(mean, std)
    dataset = ImageFileDataset(files, in_chans, worker_transform, skipped=skipped)
    return MIMData(dataset, device_transform, mean, std, len(files), skipped, name, False)


def _shard_data(path: str, name: str, in_chans: int, streamed, samples_per_epoch: int,
                shuffle_buffer: int) -> MIMData:
    spec = open_shards(path)
    urls, count = spec.splits["train"], spec.counts.get("train")
    if samples_per_epoch <= 0:
        if count is None:
            raise DataError(f"the shards '{name}' have no manifest giving their sample count: pass "
                            "--samples-per-epoch N (or write them with leanmim shard)")
        samples_per_epoch = count
    stats = (spec.manifest or {}).get("stats", {}).get(str(in_chans))
    if stats is not None:
        mean, std = tuple(stats["mean"]), tuple(stats["std"])
    else:
        mean, std = _stream_stats(urls, in_chans)
    log = SkipLog()
    worker_transform, device_transform = streamed(mean, std)
    source = ShardSource(urls, in_chans, worker_transform, samples_per_epoch, shuffle_buffer, log)
    return MIMData(source, device_transform, mean, std, count if count is not None else samples_per_epoch, [], name,
                   False)


def _stream_stats(urls: list[str], in_chans: int, limit: int = 512):
    """Mean/std of the first ``limit`` readable samples (64-px centre squares) when no manifest gives them."""
    import itertools

    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    from .shards import decode_sample, raw_samples

    squares = []
    for sample in itertools.islice(raw_samples(urls, SkipLog()), limit * 2):
        try:
            image = decode_sample(sample, in_chans)[0]
        except Exception:  # noqa: BLE001 - counted when streamed
            continue
        image = TF.resize(image, [64], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        squares.append(TF.center_crop(image, [64, 64]))
        if len(squares) == limit:
            break
    if not squares:
        raise DataError(f"no readable image in the first shards of '{urls[0]}': check the shards")
    return channel_stats(torch.stack(squares))

