"""Datasets and masked-image-modeling augmentation.

Two sources:

* Fashion-MNIST (or any MNIST-format directory) read from its idx files; always held in memory.
* A directory of images (recursive, any common format). Decoded once into memory as uint8
  (N, C, S, S) when that fits under ``max_memory_bytes``, else streamed from disk with
  per-sample torchvision transforms (meant for DataLoader workers).

Stored size for folders: the shorter side is resized to S = round(img_size * 8 / 7) and the
centre S x S kept (224 -> 256, 32 -> 37: the classic 0.875 crop ratio). RandomResizedCrop then
samples from that square and evaluation centre-crops img_size without resampling.

In-memory data is augmented on whole batches (``BatchMIMAugment``, ``BatchEvalTransform``):
the engine applies ``batch_transform`` to each uint8 batch after loading it.

Decoding uses Pillow: torchvision 0.29 deprecates its image decoders (a DeprecationWarning on
every call) and ``decode_image`` returns palette indices for palette PNGs.

Unreadable files are skipped with one warning each and listed in ``skipped_files``.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import tempfile
import uuid
import warnings
import weakref
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "DataError", "MIMData", "LabelledSplits", "BatchMIMAugment", "BatchEvalTransform",
    "build_pretrain_data", "build_labelled_splits", "default_channels", "default_img_size",
    "denormalize", "read_idx", "load_image", "stored_size", "FASHION_MNIST_DIR",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ALIASES = {"fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Pixel mean/std of the 60000 training images scaled to [0, 1], in float64 over all pixels
# (population std): x = frombuffer(train-images, uint8) / 255; x.mean(), x.std().
FASHION_MNIST_MEAN = 0.2860406
FASHION_MNIST_STD = 0.3530242

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif",
                              ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"})
STATS_SAMPLE = 2000               # images used to estimate a folder's mean/std
PARALLEL_DECODE_MIN_FILES = 256   # decode with DataLoader workers from this many files on

_RRC_RATIO = (3 / 4, 4 / 3)
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class DataError(ValueError):
    """A data problem; ``str(err)`` is one self-contained line saying what is wrong and how to fix it."""


# ----------------------------------------------------------------------------- decoding

def read_idx(path: str) -> np.ndarray:
    """Parse an idx file (optionally .gz): the array with the shape from its header."""
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    fix = "re-download it (sudo apt-get install --reinstall dataset-fashion-mnist) or pass --data DIR"
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read idx file '{path}' ({_one_line(e)}): {fix}") from None
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


def load_image(path: str, channels: int, draft_size: int | None = None) -> torch.Tensor:
    """Decode one image file to uint8 (channels, H, W); raises on unreadable/truncated files.

    Alpha is composited on black, 16-bit samples are scaled to 8 bits (round(v / 257)),
    RGB -> 1 channel uses ITU-R 601 luma. ``draft_size`` lets JPEGs decode at a reduced
    scale whose both sides stay >= draft_size (for the decode-once cache).
    """
    with Image.open(path) as im:
        if draft_size is not None and im.format == "JPEG":
            im.draft(im.mode, (draft_size, draft_size))
        im.load()
        if im.mode.startswith("I"):  # 16-bit (or 32-bit int) grayscale
            wide = np.asarray(im).astype(np.int64).clip(0, 65535)
            arr = ((wide + 128) // 257).astype(np.uint8)
        else:
            has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
            arr = np.asarray(im.convert("RGBA" if has_alpha else "L" if im.mode in _GRAY_MODES else "RGB"))
    img = torch.from_numpy(arr.copy())
    img = img[None] if img.ndim == 2 else img.permute(2, 0, 1)
    if img.shape[0] == 4:
        img = (img[:3].float() * (img[3:].float() / 255)).round_().to(torch.uint8)
    if channels == 1 and img.shape[0] == 3:
        img = TF.rgb_to_grayscale(img)
    elif channels == 3 and img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.contiguous()


def stored_size(img_size: int) -> int:
    """Side S of the square stored per image for folder datasets: round(img_size * 8 / 7)."""
    return round(img_size * 8 / 7)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _warn_skip(path: str, reason: str) -> None:
    warnings.warn(f"skipping unreadable image '{path}' ({reason})", stacklevel=2)


# ----------------------------------------------------------------------------- datasets

class TensorImages(Dataset):
    """In-memory images: uint8 (N, C, S, S) [+ int64 labels (N,)] -> image or (image, label).

    ``__getitems__`` lets a DataLoader fetch a whole batch with one tensor index.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        if self.labels is None:
            return self.images[index]
        return self.images[index], int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> list:
        idx = torch.as_tensor(indices, dtype=torch.long)
        images = list(self.images[idx].unbind(0))
        return images if self.labels is None else list(zip(images, self.labels[idx].tolist()))


class ImageFileDataset(Dataset):
    """Images decoded from disk on access -> transform(uint8 (C, H, W)) [, label].

    A file that fails to decode is warned about once, recorded in ``skipped_files`` and replaced
    by the next readable file (with that file's label). Failures inside DataLoader worker
    processes are appended to a small log file so the main process's ``skipped_files`` sees them.
    """

    def __init__(self, files: list[str], channels: int, transform: nn.Module,
                 labels: list[int] | None = None, skipped: list[str] | None = None):
        self.files, self.channels, self.transform, self.labels = files, channels, transform, labels
        self._skipped = list(skipped or [])
        self._bad: set[int] = set()
        self._log = os.path.join(tempfile.gettempdir(), f"leanmim-skipped-{uuid.uuid4().hex}.log")
        weakref.finalize(self, _remove_owned, self._log, os.getpid())

    def __len__(self) -> int:
        return len(self.files)

    @property
    def skipped_files(self) -> list[str]:
        logged = []
        if os.path.exists(self._log):
            with open(self._log) as f:
                logged = f.read().splitlines()
        return list(dict.fromkeys(self._skipped + logged))

    def __getitem__(self, index: int):
        n = len(self.files)
        for i in ((index + k) % n for k in range(n)):
            if i in self._bad:
                continue
            try:
                img = load_image(self.files[i], self.channels)
            except Exception as e:  # any decoder error: skip the file, never the epoch
                self._record(i, _one_line(e))
                continue
            out = self.transform(img)
            return out if self.labels is None else (out, self.labels[i])
        raise DataError(f"none of the {n} image files could be read (e.g. '{self.files[0]}'): "
                        "check the files or pass another --data directory")

    def _record(self, i: int, reason: str) -> None:
        self._bad.add(i)
        path = self.files[i]
        if path in self.skipped_files:
            return
        _warn_skip(path, reason)
        self._skipped.append(path)
        if get_worker_info() is not None:
            with open(self._log, "a") as f:
                f.write(path + "\n")


def _remove_owned(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid and os.path.exists(path):
        os.remove(path)


class _ResizedFiles(Dataset):
    """Decode-once helper: file i -> (uint8 (C, S, S) or None, error reason)."""

    def __init__(self, files: list[str], channels: int, size: int):
        self.files, self.channels, self.size = files, channels, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            img = load_image(self.files[i], self.channels, draft_size=self.size)
        except Exception as e:
            return None, _one_line(e)
        img = TF.resize(img, [self.size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(img, [self.size, self.size]), ""


def _decode_files(files: list[str], channels: int, size: int) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode and resize ``files`` -> (uint8 (n_ok, C, S, S), indices of the readable files, skipped)."""
    workers = min(len(os.sched_getaffinity(0)), 8) if len(files) >= PARALLEL_DECODE_MIN_FILES else 0
    loader = DataLoader(_ResizedFiles(files, channels, size), batch_size=None, num_workers=workers)
    images = torch.empty((len(files), channels, size, size), dtype=torch.uint8)
    kept, skipped = [], []
    for i, (img, reason) in enumerate(loader):
        if img is None:
            _warn_skip(files[i], reason)
            skipped.append(files[i])
        else:
            images[len(kept)] = img
            kept.append(i)
    return images[: len(kept)], kept, skipped


# ----------------------------------------------------------------------------- batch transforms

def _unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is taken to be in [0, 1] already."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def _channel_buffer(values: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


class BatchMIMAugment(nn.Module):
    """RandomResizedCrop + horizontal flip + normalize on a whole batch.

    (B, C, H, W) uint8 or float in [0, 1] -> float32 (B, C, img_size, img_size) normalized.
    Crops follow torchvision's RandomResizedCrop sampling (area fraction ~ U(scale), aspect
    ratio log-uniform, integer box, ``tries`` attempts then the central fallback), vectorised
    over the batch; crop, resize and flip are one ``affine_grid`` + ``grid_sample`` (no
    antialiasing: crops are at most S/img_size = 8/7 larger than the output for folders).
    ``generator`` must be a CPU generator; the batch may live on any device.
    """

    def __init__(self, img_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = _RRC_RATIO,
                 hflip: bool = True, interpolation: str = "bicubic", tries: int = 10):
        super().__init__()
        self.img_size, self.scale, self.ratio = img_size, scale, ratio
        self.hflip, self.interpolation, self.tries = hflip, interpolation, tries
        self.register_buffer("mean", _channel_buffer(mean), persistent=False)
        self.register_buffer("std", _channel_buffer(std), persistent=False)

    def sample_crops(self, batch: int, height: int, width: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Crop boxes (batch, 4) float64 as (top, left, h, w) in pixels."""
        u = torch.rand(batch, self.tries, 4, dtype=torch.float64, generator=generator)
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[..., 0])
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[..., 1])
        w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.int().argmax(1, keepdim=True)  # first valid try (0 when none is valid)
        w, h, u = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], u[torch.arange(batch), first[:, 0]]
        top = torch.floor(u[:, 2] * (height - h + 1))
        left = torch.floor(u[:, 3] * (width - w + 1))
        # Fallback when no try fits: the largest central crop with an allowed aspect ratio.
        fw, fh = float(width), float(height)
        if width / height < min(self.ratio):
            fh = float(round(width / min(self.ratio)))
        elif width / height > max(self.ratio):
            fw = float(round(height * max(self.ratio)))
        fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float64)
        boxes = torch.stack([top, left, h, w], dim=1)
        return torch.where(ok.any(1, keepdim=True), boxes, fallback)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = _unit_float(images)
        b, c, height, width = x.shape
        top, left, h, w = self.sample_crops(b, height, width, generator).unbind(1)
        sx = w / width
        if self.hflip:
            sx = torch.where(torch.rand(b, generator=generator) < 0.5, -sx, sx)
        zero = torch.zeros_like(sx)
        # Output pixel centres (normalized, align_corners=False) -> input coordinates of the box.
        theta = torch.stack([torch.stack([sx, zero, (2 * left + w) / width - 1], 1),
                             torch.stack([zero, h / height, (2 * top + h) / height - 1], 1)], 1)
        theta = theta.to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, [b, c, self.img_size, self.img_size], align_corners=False)
        x = F.grid_sample(x, grid, mode=self.interpolation, padding_mode="border", align_corners=False)
        return x.clamp_(0, 1).sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


class BatchEvalTransform(nn.Module):
    """Deterministic: optional centre crop to ``crop_size``, resize to img_size (antialiased),
    normalize. (B, C, H, W) uint8 or float in [0, 1] -> float32 (B, C, img_size, img_size)."""

    def __init__(self, img_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 crop_size: int | None = None, interpolation: str = "bicubic"):
        super().__init__()
        self.img_size, self.crop_size, self.interpolation = img_size, crop_size, interpolation
        self.register_buffer("mean", _channel_buffer(mean), persistent=False)
        self.register_buffer("std", _channel_buffer(std), persistent=False)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``generator`` is unused; it lets callers treat this and BatchMIMAugment alike."""
        x = _unit_float(images)
        if self.crop_size is not None and self.crop_size < min(x.shape[-2:]):
            x = TF.center_crop(x, [self.crop_size, self.crop_size])
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode=self.interpolation,
                              align_corners=False, antialias=True).clamp_(0, 1)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def denormalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Undo normalization for display: (..., C, H, W) -> float in [0, 1]."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images * s + m).clamp(0, 1)


def _stream_transform(img_size: int, mean, std, crop_min_scale: float, hflip: bool) -> nn.Module:
    """Per-sample equivalent of BatchMIMAugment, for streamed files."""
    steps = [v2.RandomResizedCrop(img_size, scale=(crop_min_scale, 1.0), ratio=_RRC_RATIO,
                                  interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    steps += [v2.RandomHorizontalFlip()] if hflip else []
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def _stream_eval_transform(img_size: int, mean, std) -> nn.Module:
    """Per-sample equivalent of the in-memory path: shorter side to S, centre crop img_size."""
    return v2.Compose([v2.Resize(stored_size(img_size), interpolation=v2.InterpolationMode.BICUBIC,
                                 antialias=True),
                       v2.CenterCrop(img_size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(mean, std)])


# ----------------------------------------------------------------------------- source resolution

def _idx_paths(directory: str) -> dict[str, str]:
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


def _resolve(data: str) -> tuple[str, str, str]:
    """--data value -> (kind "idx" or "folder", directory, display name)."""
    if data.lower() in FASHION_MNIST_ALIASES:
        if "train_images" not in _idx_paths(FASHION_MNIST_DIR):
            raise DataError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: install it with: "
                            "sudo apt-get install dataset-fashion-mnist (or pass --data DIR)")
        return "idx", FASHION_MNIST_DIR, "fashion-mnist"
    path = os.path.expanduser(data)
    if not os.path.exists(path):
        raise DataError(f"data path '{data}' does not exist: pass --data fashion-mnist or a directory of images")
    if not os.path.isdir(path):
        raise DataError(f"data path '{data}' is a file, not a directory: pass --data fashion-mnist "
                        "or a directory of images")
    if "train_images" in _idx_paths(path):
        fashion = os.path.realpath(path) == os.path.realpath(FASHION_MNIST_DIR)
        return "idx", path, "fashion-mnist" if fashion else path
    return "folder", path, path


def _iter_image_files(root: str):
    """Image files under ``root`` in sorted order (recursive, follows links, skips hidden entries)."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # symlink cycle
            dirnames.clear()
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(dirpath, name)


def _list_images(root: str) -> list[str]:
    files = list(_iter_image_files(root))
    if not files:
        raise DataError(f"no image files found under '{root}' (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}): "
                        "pass a directory of images or --data fashion-mnist")
    return files


def _labelled_layout(root: str) -> tuple[str, str] | None:
    """(train dir, test dir) when ``root`` has train/ and test/ (or val/) with class subfolders."""
    def class_dirs(d):
        return os.path.isdir(d) and any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(d))
    train = os.path.join(root, "train")
    tests = [os.path.join(root, s) for s in ("test", "val") if class_dirs(os.path.join(root, s))]
    return (train, tests[0]) if class_dirs(train) and tests else None


def _check_args(img_size: int, in_chans: int) -> None:
    if in_chans not in (1, 3):
        raise DataError(f"in_chans={in_chans} is not supported: use 1 (grayscale) or 3 (RGB)")
    if img_size < 1:
        raise DataError(f"img_size={img_size} must be a positive number of pixels")


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] units of up to STATS_SAMPLE evenly spaced uint8 (N, C, H, W) images."""
    idx = torch.tensor(_spread(images.shape[0], STATS_SAMPLE))
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in idx.split(256):
        x = images[chunk].double().div_(255)
        total += x.sum((0, 2, 3))
        total_sq += x.square().sum((0, 2, 3))
    count = len(idx) * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _idx_images(path: str) -> torch.Tensor:
    """idx image file -> uint8 (N, 1, H, W)."""
    arr = read_idx(path)
    if arr.ndim != 3 or arr.dtype != np.uint8:
        raise DataError(f"'{path}' holds {arr.dtype} data of shape {list(arr.shape)}, expected uint8 "
                        "(N, H, W) images: pass an MNIST-format directory or a directory of images")
    return torch.from_numpy(arr.copy()).unsqueeze(1)


def _idx_stats(name: str, images: torch.Tensor, in_chans: int):
    if name == "fashion-mnist":
        mean, std = (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)
    else:
        mean, std = _channel_stats(images)
    return mean * in_chans, std * in_chans


def _spread(n: int, k: int) -> list[int]:
    """Up to k evenly spaced indices in range(n)."""
    return torch.linspace(0, n - 1, min(n, k)).round().long().unique().tolist()


def _folder_images(files: list[str], root: str, in_chans: int, size: int, in_memory: bool,
                   labels: list[int] | None = None):
    """Decode all ``files`` (in memory) or an evenly spread sample of STATS_SAMPLE (streaming).

    Returns (uint8 (n, C, S, S) decoded images, files not found unreadable, their labels, skipped).
    """
    probe = files if in_memory else [files[i] for i in _spread(len(files), STATS_SAMPLE)]
    images, kept, skipped = _decode_files(probe, in_chans, size)
    if not kept:
        raise DataError(f"none of the {len(probe)} image files checked under '{root}' could be read "
                        f"(e.g. '{probe[0]}'): check the files or pass another --data directory")
    bad = set(skipped)
    keep = [i for i, f in enumerate(files) if f not in bad]
    return images, [files[i] for i in keep], None if labels is None else [labels[i] for i in keep], skipped


# ----------------------------------------------------------------------------- public API

@dataclass
class MIMData:
    """What the pretraining engine needs.

    ``dataset[i]`` is uint8 (C, S, S) when ``in_memory`` (then ``batch_transform`` is a
    BatchMIMAugment, or a BatchEvalTransform without augmentation, that the engine applies
    per batch as ``batch_transform(images, generator=...)``), else a normalized float
    (C, img_size, img_size) and ``batch_transform`` is None. ``skipped_files`` also picks up
    files a streaming dataset finds unreadable later (including in DataLoader workers).
    """
    dataset: Dataset
    batch_transform: nn.Module | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_images: int
    skipped_files: list[str]
    name: str
    in_memory: bool


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


def _live_skipped_files(*dataset_fields: str) -> property:
    """``skipped_files`` = the files given at construction + those the datasets record later."""
    def get(self) -> list[str]:
        found = [f for name in dataset_fields for f in getattr(getattr(self, name), "skipped_files", [])]
        return list(dict.fromkeys(self._skipped_files + found))

    def set(self, value: list[str]) -> None:
        self._skipped_files = list(value)
    return property(get, set)


MIMData.skipped_files = _live_skipped_files("dataset")
LabelledSplits.skipped_files = _live_skipped_files("train", "test")


def build_pretrain_data(data: str, img_size: int, in_chans: int, crop_min_scale: float = 0.2,
                        hflip: bool = True, max_memory_bytes: int = 4 << 30, augment: bool = True) -> MIMData:
    """Unlabelled pretraining images from "fashion-mnist" (train split), an MNIST-format
    directory, or an image directory (its train/ split if it has the labelled layout).

    ``augment=False`` swaps RandomResizedCrop + flip for the deterministic evaluation view
    (BatchEvalTransform in memory; resize + centre crop when streaming).
    """
    _check_args(img_size, in_chans)
    kind, path, name = _resolve(data)

    def batch_transform(mean, std, crop_size=None) -> nn.Module:
        if augment:
            return BatchMIMAugment(img_size, mean, std, scale=(crop_min_scale, 1.0), hflip=hflip)
        return BatchEvalTransform(img_size, mean, std, crop_size=crop_size)

    if kind == "idx":  # always in memory: the idx file is the decoded array already
        images = _idx_images(_idx_paths(path)["train_images"])
        mean, std = _idx_stats(name, images, in_chans)
        return MIMData(TensorImages(images.expand(-1, in_chans, -1, -1)), batch_transform(mean, std),
                       mean, std, len(images), [], name, True)
    layout = _labelled_layout(path)
    files = _list_images(layout[0] if layout else path)
    size = stored_size(img_size)
    in_memory = len(files) * in_chans * size * size <= max_memory_bytes
    images, files, _, skipped = _folder_images(files, path, in_chans, size, in_memory)
    mean, std = _channel_stats(images)
    if in_memory:
        dataset, transform = TensorImages(images), batch_transform(mean, std, crop_size=img_size)
    else:
        per_sample = (_stream_transform(img_size, mean, std, crop_min_scale, hflip) if augment
                      else _stream_eval_transform(img_size, mean, std))
        dataset, transform = ImageFileDataset(files, in_chans, per_sample, skipped=skipped), None
    return MIMData(dataset, transform, mean, std, len(files), skipped, name, in_memory)


def build_labelled_splits(data: str, img_size: int, in_chans: int,
                          max_memory_bytes: int = 4 << 30) -> LabelledSplits:
    """Labelled train/test splits for probing: Fashion-MNIST / MNIST-format idx files, or a
    directory laid out as DIR/train/<class>/* and DIR/test/<class>/* (or DIR/val/)."""
    _check_args(img_size, in_chans)
    kind, path, name = _resolve(data)
    if kind == "idx":
        return _idx_splits(path, name, img_size, in_chans)
    layout = _labelled_layout(path)
    if layout is None:
        raise DataError(f"'{path}' has no labelled splits: probing expects {path}/train/<class>/* and "
                        f"{path}/test/<class>/* (or val/); an unlabelled folder can only be used for pretraining")
    train_dir, test_dir = layout
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith("."))
    extra = sorted(e.name for e in os.scandir(test_dir) if e.is_dir() and e.name not in classes
                   and not e.name.startswith("."))
    if extra:
        raise DataError(f"class folder(s) {extra} in '{test_dir}' have no counterpart in '{train_dir}': "
                        "use the same class subfolder names in both splits")
    listed = []
    for split_dir in layout:
        files, labels = [], []
        for label, cls in enumerate(classes):
            found = list(_iter_image_files(os.path.join(split_dir, cls)))
            files.extend(found)
            labels.extend([label] * len(found))
        if not files:
            raise DataError(f"no image files found in the class folders of '{split_dir}': put images "
                            "in <split>/<class>/ subfolders")
        listed.append((split_dir, files, labels))
    size = stored_size(img_size)
    in_memory = sum(len(files) for _, files, _ in listed) * in_chans * size * size <= max_memory_bytes
    splits, skipped_all = [], []
    for split_dir, files, labels in listed:
        images, files, labels, skipped = _folder_images(files, split_dir, in_chans, size, in_memory, labels)
        splits.append((images, files, labels))
        skipped_all += skipped
    mean, std = _channel_stats(splits[0][0])
    if in_memory:
        train, test = (TensorImages(images, torch.tensor(labels)) for images, _, labels in splits)
        transform = BatchEvalTransform(img_size, mean, std, crop_size=img_size)
    else:
        eval_tf = _stream_eval_transform(img_size, mean, std)
        train, test = (ImageFileDataset(files, in_chans, eval_tf, labels) for _, files, labels in splits)
        transform = None
    return LabelledSplits(train, test, transform, len(classes), classes, mean, std, skipped_all)


def _idx_splits(path: str, name: str, img_size: int, in_chans: int) -> LabelledSplits:
    found = _idx_paths(path)
    missing = [k for k in ("train_images", "train_labels", "test_images", "test_labels") if k not in found]
    if missing:
        raise DataError(f"'{path}' lacks the idx files for {', '.join(missing)}: probing needs "
                        "train-/t10k-images-idx3-ubyte and train-/t10k-labels-idx1-ubyte (.gz or plain)")
    parts = []
    for split in ("train", "test"):
        images = _idx_images(found[f"{split}_images"])
        labels = torch.from_numpy(read_idx(found[f"{split}_labels"]).astype(np.int64))
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"'{found[f'{split}_labels']}' has {len(labels)} labels for {len(images)} images: "
                            "re-download the dataset or pass another --data directory")
        parts.append((images, labels))
    mean, std = _idx_stats(name, parts[0][0], in_chans)
    num_classes = int(max(p[1].max() for p in parts)) + 1
    class_names = FASHION_MNIST_CLASSES if name == "fashion-mnist" else [str(i) for i in range(num_classes)]
    train, test = (TensorImages(images.expand(-1, in_chans, -1, -1), labels) for images, labels in parts)
    return LabelledSplits(train, test, BatchEvalTransform(img_size, mean, std), num_classes,
                          list(class_names), mean, std, [])


def default_channels(data: str) -> int:
    """1 for MNIST-format data and folders whose first few images are grayscale, else 3."""
    kind, path, _ = _resolve(data)
    if kind == "idx":
        return 1
    modes = []
    for file in _iter_image_files(path):
        try:
            with Image.open(file) as im:
                modes.append(im.mode)
        except Exception:
            continue
        if len(modes) == 8:
            break
    return 1 if modes and all(m in _GRAY_MODES for m in modes) else 3


def default_img_size(data: str) -> int | None:
    """Native side of MNIST-format images (28 for Fashion-MNIST); None for image folders."""
    kind, path, _ = _resolve(data)
    if kind == "folder":
        return None
    with (gzip.open if (f := _idx_paths(path)["train_images"]).endswith(".gz") else open)(f, "rb") as fh:
        header = fh.read(16)
    if len(header) < 16 or header[:4] != b"\x00\x00\x08\x03":
        raise DataError(f"'{f}' is not an idx image file (bad magic number): re-download it or pass --data DIR")
    return struct.unpack(">I", header[8:12])[0]
