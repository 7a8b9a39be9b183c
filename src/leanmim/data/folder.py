"""Source: a directory of image files (recursive, any common format, sorted order).

Held in memory as uint8 when the decoded images fit under ``max_memory_bytes`` (decoded once, in
parallel), else decoded from disk on access with per-sample transforms (meant for DataLoader workers):
for pretraining, the sample's crop cut and resized in uint8 (``WorkerCrop``, seeded by the ``SampleIndex``
that GlobalBatchSampler yields), the flip and normalisation left to the training device.
Unreadable files are skipped with one warning each and named in ``skipped_files``.

Stored in memory, each image keeps its aspect ratio: the shorter side is resized to S =
stored_size(img_size) and the longer side kept up to MAX_ASPECT · S (the centre of wider images),
in a canvas shared by the batch (``WholeImages``). The evaluation view and the labelled splits keep
the centre S × S square (all that resize + centre crop ever reads); for a non-square img_size, the centre
of the image resized to cover the stored box ``stored_hw(img_size)`` (Hs × Ws), S = max(Hs, Ws).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..config import image_hw
from .common import (IMAGE_EXTENSIONS, DataError, SkipLog, decode_file, displayed_size, load_image, one_line,
                     resize_and_crop, sample_draw_seed, spread, STATS_SAMPLE, warn_skip)

PARALLEL_DECODE_MIN_FILES = 256   # decode with DataLoader workers from this many files on
MAX_ASPECT = 2.0                  # in memory, the longer side is kept up to this many times the shorter


def iter_image_files(root: str):
    """Image files under ``root`` in sorted order (recursive, follows links, each real directory once, skips hidden
    entries and anything that is not a regular file: FIFOs, sockets, devices)."""
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # symlink cycle
            dirnames.clear()
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            # regular files only (os.path.isfile follows links): a FIFO named x.png would block its reader for ever
            path = os.path.join(dirpath, name)
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(path):
                yield path


def list_images(root: str) -> list[str]:
    files = list(iter_image_files(root))
    if not files:
        raise DataError(f"no image files found under '{root}' (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}): "
                        "pass a directory of images or --data fashion-mnist")
    return files


def labelled_layout(root: str) -> tuple[str, str] | None:
    """(train dir, test dir) when ``root`` has train/ and test/ (or val/) with class subfolders."""
    def class_dirs(d):
        return os.path.isdir(d) and any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(d))
    train = os.path.join(root, "train")
    tests = [os.path.join(root, s) for s in ("test", "val") if class_dirs(os.path.join(root, s))]
    return (train, tests[0]) if class_dirs(train) and tests else None


def labelled_files(root: str) -> tuple[list[str], list[tuple[str, list[str], list[int]]]]:
    """Class names and [(split dir, files, labels)] for the train and test splits of a labelled layout."""
    layout = labelled_layout(root)
    if layout is None:
        raise DataError(f"'{root}' has no labelled splits: probing expects {root}/train/<class>/* and "
                        f"{root}/test/<class>/* (or val/); an unlabelled folder can only be used for pretraining")
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
            found = list(iter_image_files(os.path.join(split_dir, cls)))
            files.extend(found)
            labels.extend([label] * len(found))
        if not files:
            raise DataError(f"no image files found in the class folders of '{split_dir}': put images "
                            "in <split>/<class>/ subfolders")
        listed.append((split_dir, files, labels))
    return classes, listed


def whole_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) stored for a height × width image: shorter side ``size`` (torchvision's Resize rounding),
    longer side at most round(MAX_ASPECT · size)."""
    short, long = min(height, width), max(height, width)
    new_long = min(int(size * long / short), round(MAX_ASPECT * size))
    return (new_long, size) if height > width else (size, new_long)


class ImageFileDataset(Dataset):
    """Images decoded from disk on access (``decode_file``: libjpeg-turbo for JPEGs, else Pillow) ->
    transform(uint8 (C, H, W)) [, label].

    A transform with ``takes_seed`` (``WorkerCrop``) is called as ``transform(image, draw_seed)``: the seed is
    the index's own ``draw_seed`` when it is a :class:`~leanmim.data.sampler.SampleIndex` (GlobalBatchSampler's),
    else ``sample_draw_seed(seed, 0, index)``, so a sample's crop never depends on the worker or the batch.

    A file that fails to decode is warned about once, recorded in ``skipped_files`` and replaced
    by the next readable file (with that file's label; the crop keeps the requested sample's seed).
    Failures inside DataLoader worker processes reach the main process's ``skipped_files`` too.
    """

    def __init__(self, files: list[str], channels: int, transform: nn.Module,
                 labels: list[int] | None = None, skipped: list[str] | None = None, seed: int = 0):
        self.files, self.channels, self.transform, self.labels = files, channels, transform, labels
        self.seed = seed
        self._takes_seed = getattr(transform, "takes_seed", False)
        self._log = SkipLog(skipped)
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    @property
    def skipped_files(self) -> list[str]:
        return self._log.names

    def __getitem__(self, index: int):
        n = len(self.files)
        for i in ((index + k) % n for k in range(n)):
            if i in self._bad:
                continue
            try:
                img = decode_file(self.files[i], self.channels)
            except Exception as e:  # any decoder error: skip the file, never the epoch
                self._bad.add(i)
                self._log.add(self.files[i], one_line(e))
                continue
            if self._takes_seed:
                seed = index.draw_seed if hasattr(index, "draw_seed") else sample_draw_seed(self.seed, 0, index)
                out = self.transform(img, seed)
            else:
                out = self.transform(img)
            return out if self.labels is None else (out, self.labels[i])
        raise DataError(f"none of the {n} image files could be read (e.g. '{self.files[0]}'): "
                        "check the files or pass another --data directory")


class WholeImages(Dataset):
    """In-memory whole images: uint8 canvas (N, C, Hc, Wc) and int64 sizes (N, 2) -> (canvas[i], sizes[i]).

    Image i fills the top-left sizes[i] = (h, w) corner of its canvas; its last row and column are
    repeated beyond, so interpolation at its edges never reads another value. A DataLoader batch is
    ``[canvas (B, C, Hc, Wc), sizes (B, 2)]``, the pair BatchMIMAugment takes.
    """

    def __init__(self, canvas: torch.Tensor, sizes: torch.Tensor):
        self.images, self.sizes = canvas, sizes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.images[index], self.sizes[index]

    def __getitems__(self, indices: list[int]) -> list:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return list(zip(self.images[idx].unbind(0), self.sizes[idx].unbind(0)))


class _ResizedFiles(Dataset):
    """Decode-once helper: file i -> (uint8 image or None, error reason). The centre S × S square (``size`` an int,
    or the centre Hs × Ws box of the image resized to cover it, ``size`` (Hs, Ws)), or with ``whole`` (``size`` an
    int) the image with its shorter side S and its longer side cut to MAX_ASPECT · S."""

    def __init__(self, files: list[str], channels: int, size, whole: bool = False):
        self.files, self.channels, self.size, self.whole = files, channels, size, whole

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            img = load_image(self.files[i], self.channels, draft_size=max(image_hw(self.size)))
        except Exception as e:
            return None, one_line(e)
        if self.whole:
            img = TF.resize(img, [self.size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
            cap = round(MAX_ASPECT * self.size)
            return TF.center_crop(img, [min(img.shape[1], cap), min(img.shape[2], cap)]), ""
        return resize_and_crop(img, self.size, self.size), ""


def _decoded(files: list[str], channels: int, size: int, whole: bool):
    """(index, image or None, reason) for every file, in order, decoded in parallel for many files."""
    workers = min(len(os.sched_getaffinity(0)), 8) if len(files) >= PARALLEL_DECODE_MIN_FILES else 0
    loader = DataLoader(_ResizedFiles(files, channels, size, whole), batch_size=None, num_workers=workers)
    for i, (img, reason) in enumerate(loader):
        yield i, img, reason


def decode_squares(files: list[str], channels: int, size) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode the centre squares of ``files`` (``size`` S, or the centre Hs × Ws boxes, ``size`` (Hs, Ws)) ->
    (uint8 (n_ok, C, Hs, Ws), indices of the readable files, skipped)."""
    images = torch.empty((len(files), channels, *image_hw(size)), dtype=torch.uint8)
    kept, skipped = [], []
    for i, img, reason in _decoded(files, channels, size, whole=False):
        if img is None:
            warn_skip(files[i], reason)
            skipped.append(files[i])
        else:
            images[len(kept)] = img
            kept.append(i)
    return images[: len(kept)], kept, skipped


def canvas_shape(files: list[str], size: int) -> tuple[int, int]:
    """(Hc, Wc) that holds every readable file stored whole (from the image headers)."""
    height = width = size
    for path in files:
        try:
            h, w = whole_size(*displayed_size(path), size)
        except Exception:  # unreadable: found and reported when decoding
            continue
        height, width = max(height, h), max(width, w)
    return height, width


def decode_whole(files: list[str], channels: int, size: int, canvas: tuple[int, int]):
    """Decode ``files`` whole -> (uint8 canvas (n_ok, C, Hc, Wc), int64 sizes (n_ok, 2), kept indices, skipped)."""
    height, width = canvas
    images = torch.empty((len(files), channels, height, width), dtype=torch.uint8)
    sizes = torch.empty((len(files), 2), dtype=torch.long)
    kept, skipped = [], []
    for i, img, reason in _decoded(files, channels, size, whole=True):
        if img is None:
            warn_skip(files[i], reason)
            skipped.append(files[i])
            continue
        img = TF.center_crop(img, [min(img.shape[1], height), min(img.shape[2], width)])
        h, w = img.shape[1:]
        slot = images[len(kept)]
        slot[:, :h, :w] = img
        slot[:, :h, w:] = img[:, :, -1:]
        slot[:, h:, :] = slot[:, h - 1:h, :]
        sizes[len(kept)] = torch.tensor([h, w])
        kept.append(i)
    return images[: len(kept)], sizes[: len(kept)], kept, skipped


def decode_folder(files: list[str], root: str, in_chans: int, size, in_memory: bool,
                  labels: list[int] | None = None):
    """Centre squares (``size`` S or a box (Hs, Ws): :func:`decode_squares`) of all ``files`` (in memory) or of an
    evenly spread sample of STATS_SAMPLE (streaming).

    Returns (uint8 (n, C, Hs, Ws) decoded images, files not found unreadable, their labels, skipped).
    """
    probe = files if in_memory else [files[i] for i in spread(len(files), STATS_SAMPLE)]
    images, kept, skipped = decode_squares(probe, in_chans, size)
    if not kept:
        raise DataError(f"none of the {len(probe)} image files checked under '{root}' could be read "
                        f"(e.g. '{probe[0]}'): check the files or pass another --data directory")
    bad = set(skipped)
    keep = [i for i, f in enumerate(files) if f not in bad]
    return images, [files[i] for i in keep], None if labels is None else [labels[i] for i in keep], skipped
