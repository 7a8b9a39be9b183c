"""Which source a ``--data`` value names (idx files, an image folder, or shards) and its native geometry."""

from __future__ import annotations

import os

from . import idx
from .common import GRAY_MODES, DataError, image_mode
from .folder import iter_image_files
from .shards import first_image_mode, is_shard_dir, looks_like_shards, open_shards


def resolve(data: str) -> tuple[str, str, str]:
    """--data value -> (kind "idx", "folder" or "shards", path or pattern, display name)."""
    if data.lower() in idx.FASHION_MNIST_ALIASES:
        if "train_images" not in idx.idx_paths(idx.FASHION_MNIST_DIR):
            raise DataError(f"Fashion-MNIST not found in {idx.FASHION_MNIST_DIR}: install it with: "
                            "sudo apt-get install dataset-fashion-mnist (or pass --data DIR)")
        return "idx", idx.FASHION_MNIST_DIR, "fashion-mnist"
    path = os.path.expanduser(data)
    if os.path.isdir(path) and is_shard_dir(path):
        return "shards", path, data
    if not os.path.exists(path) and looks_like_shards(data):
        return "shards", data, data
    if not os.path.exists(path):
        raise DataError(f"data path '{data}' does not exist: pass --data fashion-mnist, a directory of images or "
                        "a shard pattern such as 'DIR/train-{000000..000009}.tar'")
    if not os.path.isdir(path):
        if looks_like_shards(data):
            return "shards", data, data
        raise DataError(f"data path '{data}' is a file, not a directory: pass --data fashion-mnist "
                        "or a directory of images")
    if "train_images" in idx.idx_paths(path):
        fashion = os.path.realpath(path) == os.path.realpath(idx.FASHION_MNIST_DIR)
        return "idx", path, "fashion-mnist" if fashion else path
    return "folder", path, path


def default_channels(data: str) -> int:
    """1 for MNIST-format data and folders (or shards) whose first few images are grayscale, else 3."""
    kind, path, _ = resolve(data)
    if kind == "idx":
        return 1
    if kind == "shards":
        spec = open_shards(path)
        if spec.manifest is not None:
            return int(spec.manifest["channels"])
        mode = first_image_mode(spec.splits["train"])
        return 1 if mode in GRAY_MODES else 3
    modes = []
    for file in iter_image_files(path):
        try:
            modes.append(image_mode(file))
        except Exception:
            continue
        if len(modes) == 8:
            break
    return 1 if modes and all(m in GRAY_MODES for m in modes) else 3


def default_img_size(data: str) -> int | None:
    """Native side of MNIST-format images (28 for Fashion-MNIST, also in shards written from them); None for
    image folders and other shards."""
    kind, path, _ = resolve(data)
    if kind == "folder":
        return None
    if kind == "shards":
        manifest = open_shards(path).manifest
        return manifest.get("img_size") if manifest else None
    return idx.idx_native_size(path)
