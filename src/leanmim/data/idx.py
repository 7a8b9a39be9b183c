"""Source: Fashion-MNIST, or any MNIST-format directory, read from its idx files (always held in memory)."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np
import torch

from .common import DataError, channel_stats, one_line

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ALIASES = {"fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Pixel mean/std of the 60000 training images scaled to [0, 1], in float64 over all pixels
# (population std): x = frombuffer(train-images, uint8) / 255; x.mean(), x.std().
FASHION_MNIST_MEAN = 0.2860406
FASHION_MNIST_STD = 0.3530242


def read_idx(path: str) -> np.ndarray:
    """Parse an idx file (optionally .gz): the array with the shape from its header."""
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    fix = "re-download it (sudo apt-get install --reinstall dataset-fashion-mnist) or pass --data DIR"
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read idx file '{path}' ({one_line(e)}): {fix}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in dtypes:
        raise DataError(f"'{path}' is not an idx file (bad magic number 0x{raw[:4].hex()}): {fix}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"idx file '{path}' is truncated (incomplete header): {fix}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(dtypes[raw[2]])
    count = math.prod(dims)
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(f"idx file '{path}' holds {len(raw) - header} data bytes but its header "
                        f"{list(dims)} needs {count * dtype.itemsize}: {fix}")
    return np.frombuffer(raw, dtype, count=count, offset=header).reshape(dims)


def idx_paths(directory: str) -> dict[str, str]:
    """Existing idx files in ``directory``: keys train_images, train_labels, test_images, test_labels."""
    found = {}
    for key, split, kind, n in [("train_images", "train", "images", 3), ("train_labels", "train", "labels", 1),
                                ("test_images", "t10k", "images", 3), ("test_labels", "t10k", "labels", 1)]:
        for sep in "-.":
            for gz in (".gz", ""):
                path = os.path.join(directory, f"{split}-{kind}{sep}idx{n}-ubyte{gz}")
                if key not in found and os.path.isfile(path):
                    found[key] = path
    return found


def idx_images(path: str) -> torch.Tensor:
    """idx image file -> uint8 (N, 1, H, W)."""
    arr = read_idx(path)
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise DataError(f"'{path}' holds {arr.dtype} data of shape {list(arr.shape)}, expected uint8 "
                        "(N, H, W) images: pass an MNIST-format directory or a directory of images")
    return torch.from_numpy(arr.copy()).unsqueeze(1)


def idx_stats(name: str, images: torch.Tensor, in_chans: int):
    if name == "fashion-mnist":
        mean, std = (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)
    else:
        mean, std = channel_stats(images)
    return mean * in_chans, std * in_chans


def idx_labelled(path: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(train uint8 (N, 1, H, W), int64 labels (N,)), (test images, test labels)] of an MNIST-format directory."""
    found = idx_paths(path)
    missing = [k for k in ("train_images", "train_labels", "test_images", "test_labels") if k not in found]
    if missing:
        raise DataError(f"'{path}' lacks the idx files for {', '.join(missing)}: probing needs "
                        "train-/t10k-images-idx3-ubyte and train-/t10k-labels-idx1-ubyte (.gz or plain)")
    parts = []
    for split in ("train", "test"):
        images = idx_images(found[f"{split}_images"])
        labels = torch.from_numpy(read_idx(found[f"{split}_labels"]).astype(np.int64))
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"'{found[f'{split}_labels']}' has {len(labels)} labels for {len(images)} images: "
                            "re-download the dataset or pass another --data directory")
        parts.append((images, labels))
    return parts


def idx_class_names(name: str, num_classes: int) -> list[str]:
    return list(FASHION_MNIST_CLASSES) if name == "fashion-mnist" else [str(i) for i in range(num_classes)]


def idx_native_size(path: str) -> int:
    """Side of the images in an MNIST-format directory, from the training images' header."""
    f = idx_paths(path)["train_images"]
    with (gzip.open if f.endswith(".gz") else open)(f, "rb") as fh:
        header = fh.read(16)
    if len(header) < 16 or header[:4] != b"\x00\x00\x08\x03":
        raise DataError(f"'{f}' is not an idx image file (bad magic number): re-download it or pass --data DIR")
    return struct.unpack(">I", header[8:12])[0]
