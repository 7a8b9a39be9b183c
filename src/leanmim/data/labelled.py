"""Labelled train/test splits for probing and fine-tuning, from idx files, a labelled folder or labelled shards.

Stored as the evaluation view needs them: idx images as they are; folder and shard images as their
centre S × S square (S = stored_size(img_size); a non-square img_size: the centre Hs × Ws box of the image
resized to cover it, ``stored_hw``), in memory when they fit, else (folders) decoded on access.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from . import idx
from .augment import BatchEvalTransform, sample_eval_transform
from .common import SkipLog, TensorImages, channel_stats, check_args, resize_and_crop, stored_hw
from .folder import ImageFileDataset, decode_folder, labelled_files
from .pretrain import live_skipped_files
from .shards import open_shards, read_split
from .source import resolve


@dataclass
class LabelledSplits:
    """Labelled train/test splits for probing: ``split[i]`` -> (image, int label), image uint8
    (C, S, S) with ``batch_transform`` a BatchEvalTransform, or a normalized float (C, img_size,
    img_size) with ``batch_transform`` None."""
    train: Dataset
    test: Dataset
    batch_transform: nn.Module | None
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped_files: list[str]


LabelledSplits.skipped_files = live_skipped_files("train", "test")


def build_labelled_splits(data: str, img_size: int, in_chans: int,
                          max_memory_bytes: int = 4 << 30) -> LabelledSplits:
    """Labelled train/test splits: Fashion-MNIST / MNIST-format idx files, a directory laid out as
    DIR/train/<class>/* and DIR/test/<class>/* (or DIR/val/), or labelled shards (a directory written by
    ``leanmim shard`` from one of those)."""
    check_args(img_size, in_chans)
    kind, path, name = resolve(data)
    if kind == "idx":
        parts = idx.idx_labelled(path)
        mean, std = idx.idx_stats(name, parts[0][0], in_chans)
        num_classes = int(max(p[1].max() for p in parts)) + 1
        train, test = (TensorImages(images.expand(-1, in_chans, -1, -1), labels) for images, labels in parts)
        return LabelledSplits(train, test, BatchEvalTransform(img_size, mean, std), num_classes,
                              idx.idx_class_names(name, num_classes), mean, std, [])
    if kind == "shards":
        return _shard_splits(path, img_size, in_chans, max_memory_bytes)
    classes, listed = labelled_files(path)
    box = stored_hw(img_size)
    in_memory = sum(len(files) for _, files, _ in listed) * in_chans * box[0] * box[1] <= max_memory_bytes
    splits, skipped_all = [], []
    for split_dir, files, labels in listed:
        images, files, labels, skipped = decode_folder(files, split_dir, in_chans, box, in_memory, labels)
        splits.append((images, files, labels))
        skipped_all += skipped
    mean, std = channel_stats(splits[0][0])
    if in_memory:
        train, test = (TensorImages(images, torch.tensor(labels)) for images, _, labels in splits)
        transform = BatchEvalTransform(img_size, mean, std, crop_size=img_size)
    else:
        eval_tf = sample_eval_transform(img_size, mean, std)
        train, test = (ImageFileDataset(files, in_chans, eval_tf, labels) for _, files, labels in splits)
        transform = None
    return LabelledSplits(train, test, transform, len(classes), classes, mean, std, skipped_all)


def _shard_splits(path: str, img_size: int, in_chans: int, max_memory_bytes: int) -> LabelledSplits:
    """Labelled shards read into memory: every sample decoded once to its centre S × S square."""
    from .common import DataError

    spec = open_shards(path)
    if spec.classes is None or "test" not in spec.splits:
        raise DataError(f"'{path}' names no labelled shards with a test split: probing and fine-tuning need a directory "
                        "written by leanmim shard from fashion-mnist or a DIR/train/<class>/ + DIR/test/<class>/ folder")
    box = stored_hw(img_size)
    native = (spec.manifest or {}).get("img_size")

    def to_stored(image: torch.Tensor) -> torch.Tensor:
        if native is not None:  # idx-like data: kept as it is, resized by the evaluation transform
            return image
        return resize_and_crop(image, box, box)

    log = SkipLog()
    parts = [read_split(spec.splits[split], in_chans, to_stored, log, max_memory_bytes, box, len(spec.classes))
             for split in ("train", "test")]
    stats = (spec.manifest or {}).get("stats", {}).get(str(in_chans))
    mean, std = (tuple(stats["mean"]), tuple(stats["std"])) if stats else channel_stats(parts[0][0])
    train, test = (TensorImages(images, labels) for images, labels in parts)
    crop = None if native is not None else img_size
    return LabelledSplits(train, test, BatchEvalTransform(img_size, mean, std, crop_size=crop),
                          len(spec.classes), list(spec.classes), mean, std, log.names)
