"""The evaluation view as timm's ``crop_pct`` (crop / the box the image is resized to cover): what an export writes
in ``pretrained_cfg`` and what ``embed`` / ``predict`` resize by, for square and non-square input sizes."""

from __future__ import annotations

import math

from ..config import ConfigError, image_hw


def timm_crop_pct(img_size, crop_pct: float) -> float:
    """``crop_pct`` nudged so that timm's ``floor(img_size / crop_pct)`` gives leanmim's resized side exactly
    (16 / (16 / 18) is 17.999… in floating point). A non-square size: as it is (leanmim's box is timm's floor)."""
    height, width = image_hw(img_size)
    if height != width:
        return crop_pct
    target = round(height / crop_pct)
    while math.floor(height / crop_pct) < target:
        crop_pct = math.nextafter(crop_pct, 0.0)
    return crop_pct


def eval_crop_pct(splits, img_size) -> float:
    """The evaluation view as timm's ``crop_pct`` (crop side / resized shorter side): folders and folder shards are
    resized to stored_size(img_size) (8/7) and centre-cropped; idx data (and shards of it) only resized (1.0)."""
    transform = splits.batch_transform
    if transform is not None and getattr(transform, "crop_size", None) is None:
        return 1.0
    return folder_crop_pct(img_size)


def folder_crop_pct(img_size) -> float:
    """The folder evaluation view's ``crop_pct``: img_size / stored_size(img_size) for a square, 0.875 (the box
    timm computes, floor(side / 0.875)) for a non-square size."""
    from ..data import stored_size
    from ..data.common import STORED_CROP_PCT

    height, width = image_hw(img_size)
    return height / stored_size(height) if height == width else STORED_CROP_PCT


def pretraining_crop_pct(config) -> float:
    """The evaluation view of a pretraining run as ``crop_pct``, as its probe on the same kind of data sees images:
    1.0 (plain resize) when it was pretrained on idx data or shards of it, else the folder view (resize to
    stored_size(img_size), centre crop). A data path that no longer resolves counts as a folder."""
    from ..data import FASHION_MNIST_ALIASES, DataError, default_img_size

    img_size, path = config.model.img_size, str(config.data.path)
    if path.lower() in FASHION_MNIST_ALIASES:
        return 1.0
    try:
        native = default_img_size(path)
    except (DataError, ConfigError, OSError):
        native = None
    return 1.0 if native is not None else folder_crop_pct(img_size)

