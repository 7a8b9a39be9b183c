"""Datasets and masked-image-modeling augmentation: one file per source, the augmentation, the labelled splits.

    source.py        which source a --data value names: idx files, an image folder, or shards
    idx.py           Fashion-MNIST / MNIST-format idx files (in memory)
    folder.py        a directory of image files (in memory as whole images, or decoded on access)
    shards.py        WebDataset shards, streamed (per rank and worker, shuffle buffer, exact resume)
    manifest.py      what a shard manifest must say to be read right (refused in one line otherwise)
    shard_writer.py  ``leanmim shard``: shards + manifest from a folder or Fashion-MNIST
    augment.py       RandomResizedCrop + flip + normalize: batched on the device (in memory), or a uint8 crop
                     in the loader worker + flip and normalize batched on the device (streamed)
    pretrain.py      MIMData / build_pretrain_data: what the engine trains on
    labelled.py      LabelledSplits / build_labelled_splits: what probing and fine-tuning read
    splits.py        train/validation/test carving (seeded, stratified), label-efficiency subsets
    sampler.py       GlobalBatchSampler: the shuffled batch order, identical on every process, resumable
    common.py        DataError, decoding one image (EXIF orientation applied), in-memory datasets, statistics
"""

from .augment import BatchEvalTransform, BatchFlipNormalize, BatchMIMAugment, WorkerCrop, denormalize
from .common import DataError, TensorImages, eval_box, load_image, resize_and_crop, stored_hw, stored_size
from .folder import ImageFileDataset, WholeImages
from .idx import (FASHION_MNIST_ALIASES, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_MEAN,
                  FASHION_MNIST_STD, read_idx)
from .labelled import LabelledSplits, build_labelled_splits
from .pretrain import MIMData, build_pretrain_data
from .sampler import GlobalBatchSampler, SampleIndex
from .shard_writer import write_shards
from .shards import ShardSource
from .source import default_channels, default_img_size

__all__ = [
    "DataError", "MIMData", "LabelledSplits", "BatchMIMAugment", "BatchEvalTransform",
    "build_pretrain_data", "build_labelled_splits", "default_channels", "default_img_size",
    "denormalize", "read_idx", "load_image", "stored_size", "stored_hw", "eval_box", "resize_and_crop", "FASHION_MNIST_DIR", "FASHION_MNIST_ALIASES",
    "FASHION_MNIST_CLASSES", "TensorImages", "ImageFileDataset", "WholeImages", "ShardSource", "write_shards",
    "GlobalBatchSampler", "SampleIndex", "BatchFlipNormalize", "WorkerCrop",
]
