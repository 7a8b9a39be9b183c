"""What every data source shares: the error type, decoding one image, the in-memory dataset, statistics.

Decoding uses Pillow (``load_image``): torchvision's ``decode_image`` returns palette indices for palette PNGs.
Streamed data, decoded again every epoch, takes a faster path for JPEGs (``decode_file`` / ``decode_bytes``):
torchvision's libjpeg-turbo ``decode_jpeg`` on the file's bytes (on a 500 x 375 photo, about 1.4x Pillow's bare
decode and 2x ``load_image``'s, which also copies and converts), the same pixels for RGB output (EXIF orientation
applied too), Pillow for everything else and for any JPEG it refuses. torchvision 0.29 deprecates its decoders
(a DeprecationWarning on every call, silenced here); the day they are gone, ``decode_jpeg`` is None and every
image takes the Pillow path. The EXIF orientation tag is applied, so a photo taken sideways is read the way it is
shown, not as stored.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import tempfile
import uuid
import warnings
import weakref
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms.v2 import functional as TF

from ..config import image_hw

try:  # deprecated since torchvision 0.29 (see the module docstring)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - a torchvision without its decoders
    ImageReadMode = decode_jpeg = None

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif",
                              ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"})
STATS_SAMPLE = 2000               # images used to estimate a folder's (or shards') mean/std
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_EXIF_ORIENTATION = 0x0112        # values 5-8 turn the image by 90 degrees


class DataError(ValueError):
    """A data problem; ``str(err)`` is one self-contained line saying what is wrong and how to fix it."""


def load_image(source: str | IO[bytes], channels: int, draft_size: int | None = None) -> torch.Tensor:
    """Decode one image (a path or a binary file object) to uint8 (channels, H, W); raises on unreadable data.

    The EXIF orientation is applied (H, W are the displayed sides). Alpha is composited on black,
    16-bit samples are stretched from the image's own min-max to 8 bits (:func:`stretch_to_uint8`), RGB -> 1 channel uses ITU-R 601 luma.
    ``draft_size`` lets JPEGs decode at a reduced scale whose both sides stay >= draft_size.
    """
    with Image.open(source) as im:
        if draft_size is not None and im.format == "JPEG":
            im.draft(im.mode, (draft_size, draft_size))
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I"):  # 16-bit (or 32-bit int) grayscale
            arr = stretch_to_uint8(np.asarray(im), source)
        else:
            has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
            arr = np.asarray(im.convert("RGBA" if has_alpha else "L" if im.mode in GRAY_MODES else "RGB"))
    img = torch.from_numpy(arr.copy())
    img = img[None] if img.ndim == 2 else img.permute(2, 0, 1)
    if img.shape[0] == 4:
        img = (img[:3].float() * (img[3:].float() / 255)).round_().to(torch.uint8)
    if channels == 1 and img.shape[0] == 3:
        img = TF.rgb_to_grayscale(img)
    elif channels == 3 and img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.contiguous()


_JPEG_MAGIC = b"\xff\xd8\xff"


def decode_bytes(data: bytes, channels: int, fallback: str | IO[bytes] | None = None) -> torch.Tensor:
    """An encoded image's bytes -> uint8 (channels, H, W), as :func:`load_image` decodes it; raises on unreadable data.

    JPEGs go through torchvision's ``decode_jpeg`` (faster), everything else, and a JPEG it refuses (truncated,
    unusual colour space), through Pillow, which then raises its own one-line error for bad data. ``fallback``:
    what Pillow opens instead of the bytes (a path keeps the file's name in Pillow's messages).
    """
    if data[:3] == _JPEG_MAGIC and decode_jpeg is not None:
        image = _decode_jpeg(data, channels)
        if image is not None:
            return image
    return load_image(io.BytesIO(data) if fallback is None else fallback, channels)


def decode_file(path: str, channels: int) -> torch.Tensor:
    """:func:`decode_bytes` of the file at ``path``."""
    with open(path, "rb") as f:
        return decode_bytes(f.read(), channels, fallback=path)


def _decode_jpeg(data: bytes, channels: int) -> torch.Tensor | None:
    """libjpeg-turbo decode with the EXIF orientation applied, or None (then Pillow decides).

    RGB output matches Pillow's to the value; one channel is taken as decoded for a grey JPEG, else from the RGB
    decode with the same ITU-R 601 luma as :func:`load_image` (libjpeg's own grey output, the stored Y, differs
    by a few levels)."""
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.UNCHANGED
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode,
                                apply_exif_orientation=True)
    except Exception:  # noqa: BLE001 - Pillow decodes it or says why not
        return None
    if image.shape[0] == channels:
        return image
    if channels == 1 and image.shape[0] == 3:
        return TF.rgb_to_grayscale(image).contiguous()
    return None  # CMYK read unchanged for one channel: Pillow's conversion


def sample_draw_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s random draws (its crop) in ``epoch`` of a run seeded ``seed``: a function
    of these three numbers only, whichever batch, process or loader worker handles the sample."""
    return mix_seed(0x43524F50, seed, epoch, index)  # 0x43524F50: "CROP", keeps these seeds apart from others


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers: splitmix64 over the parts, so neighbouring inputs give unrelated seeds."""
    mask = (1 << 64) - 1
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (part & mask)) * 0xBF58476D1CE4E5B9 & mask
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & mask
        state ^= state >> 29
    return state >> 1


_WIDE_NOTED = False


def stretch_to_uint8(samples: np.ndarray, source) -> np.ndarray:
    """A 16-bit (or 32-bit integer) image -> uint8, its own range [min, max] stretched linearly to [0, 255].

    Why not ``round(v / 257)``: 12-bit data (say 200-4200) would keep 16 grey levels and look near-black. Each
    image keeps its own contrast (not the absolute level across images); a flat image becomes 0. The mean/std
    used for normalisation are computed on these 8-bit values, what the model sees. Said once per process.
    """
    global _WIDE_NOTED
    wide = samples.astype(np.float64)
    low, high = float(wide.min()), float(wide.max())
    if not _WIDE_NOTED:
        _WIDE_NOTED = True
        name = source if isinstance(source, str) else getattr(source, "name", "a 16-bit image")
        warnings.warn(f"16-bit images (e.g. '{name}', values {low:.0f}-{high:.0f}): each is stretched from its own "
                      f"min-max to 8 bits (0-255), not divided by 257, so intensities are not comparable between "
                      f"images (calibrated data such as CT: convert them to 8 bits first with one fixed range)",
                      stacklevel=3)
    if high <= low:
        return np.zeros(samples.shape, dtype=np.uint8)
    return np.rint((wide - low) * (255.0 / (high - low))).astype(np.uint8)


def displayed_size(path: str) -> tuple[int, int]:
    """(height, width) of an image as shown (EXIF orientation applied), from its header only."""
    with Image.open(path) as im:
        width, height = im.size
        if im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
            width, height = height, width
    return height, width


def image_mode(source: str | IO[bytes]) -> str:
    with Image.open(source) as im:
        return im.mode


STORED_CROP_PCT = 0.875   # evaluation crop / resized image, the classic ratio: 224 of 256


def eval_box(img_size, crop_pct: float) -> tuple[int, int]:
    """(Hb, Wb): the box an image is resized to cover before its centre ``img_size`` is cut, for ``crop_pct`` =
    crop / box. A square size S: round(S / crop_pct) (224 at 0.875 -> 256, 32 -> 37). A non-square one, as timm's
    eval transform computes it for a (height, width) input size: floor(side / crop_pct) each (64x96 -> 73 x 109),
    so that an exported ``crop_pct`` reproduces the view exactly."""
    height, width = image_hw(img_size)
    if height == width:
        side = round(height / crop_pct)
        return side, side
    return math.floor(height / crop_pct), math.floor(width / crop_pct)


def stored_hw(img_size) -> tuple[int, int]:
    """The box (Hs, Ws) the evaluation view of folder images is cut from: :func:`eval_box` at 0.875."""
    return eval_box(img_size, STORED_CROP_PCT)


def stored_size(img_size) -> int:
    """Shorter side S images are stored or resized to: round(img_size * 8 / 7) (224 -> 256, 32 -> 37); for a
    non-square size, the longer side of its box (64x96 -> 109), so that every image covers the stored box
    :func:`stored_hw` whatever its own aspect ratio."""
    return max(stored_hw(img_size))


def cover_resize(image: torch.Tensor, box) -> torch.Tensor:
    """Resize uint8/float (..., C, h, w) (bicubic, antialiased) keeping its aspect ratio to the smallest size that
    covers ``box`` (an int or (height, width)), the resize before a centre crop. A square box: the shorter side to
    it, as torchvision's ``Resize(S)``. Otherwise as timm's ``ResizeKeepRatio`` (its eval transform for a
    non-square input size): ratio = min(h / Hb, w / Wb), each side round(side / ratio)."""
    box_h, box_w = image_hw(box)
    size = [box_h] if box_h == box_w else cover_size(image.shape[-2:], (box_h, box_w))
    return TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)


def cover_size(size, box) -> list[int]:
    """[h', w'] of an image of ``size`` (h, w) resized keeping its aspect ratio to cover ``box`` (timm's
    ``ResizeKeepRatio`` rounding)."""
    height, width = int(size[0]), int(size[1])
    ratio = min(height / box[0], width / box[1])
    return [round(height / ratio), round(width / ratio)]


def resize_and_crop(image: torch.Tensor, box, crop) -> torch.Tensor:
    """``cover_resize`` to ``box``, then the centre ``crop`` (ints or (height, width)): the evaluation view."""
    return TF.center_crop(cover_resize(image, box), list(image_hw(crop)))


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def warn_skip(name: str, reason: str) -> None:
    warnings.warn(f"skipping unreadable image '{name}' ({reason})", stacklevel=2)


def check_args(img_size: int, in_chans: int) -> None:
    if in_chans not in (1, 3):
        raise DataError(f"in_chans={in_chans} is not supported: use 1 (grayscale) or 3 (RGB)")
    if min(image_hw(img_size)) < 1:
        raise DataError(f"img_size={img_size} must be a positive number of pixels")


def spread(n: int, k: int) -> list[int]:
    """Up to k evenly spaced indices in range(n)."""
    return torch.linspace(0, n - 1, min(n, k)).round().long().unique().tolist()


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] units of up to STATS_SAMPLE evenly spaced uint8 (N, C, H, W) images."""
    idx = torch.tensor(spread(images.shape[0], STATS_SAMPLE))
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


class SkipLog:
    """Names of unreadable samples, including those found inside DataLoader worker processes (appended to a
    small log file the main process reads back); removed when its owner is garbage-collected."""

    def __init__(self, initial: list[str] | None = None):
        self._names = list(initial or [])
        self._log = os.path.join(tempfile.gettempdir(), f"leanmim-skipped-{uuid.uuid4().hex}.log")
        weakref.finalize(self, _remove_owned, self._log, os.getpid())

    @property
    def names(self) -> list[str]:
        logged = []
        if os.path.exists(self._log):
            with open(self._log) as f:
                logged = f.read().splitlines()
        return list(dict.fromkeys(self._names + logged))

    def add(self, name: str, reason: str) -> None:
        """Record (and warn about, once) an unreadable sample."""
        if name in self.names:
            return
        warn_skip(name, reason)
        self._names.append(name)
        if get_worker_info() is not None:
            with open(self._log, "a") as f:
                f.write(name + "\n")


def worker_start_method(num_workers: int) -> str | None:
    """How a DataLoader's worker processes start: ``"forkserver"`` inside an initialised process group, else
    the default (``None``: fork on Linux).

    Why: under torchrun the communication threads of a process group create and delete Python thread states,
    and a worker forked while one of them holds the interpreter's thread-state lock hangs in CPython 3.11's
    ``PyOS_AfterFork_Child`` for ever (seen once in this project's DDP test, the rank then waited on its worker).
    A forkserver worker is forked from a single-threaded server instead, which has imported ``leanmim.data``
    (and torch) once, so a worker start costs about what a fork does. Single-process runs keep the fork.
    """
    if (num_workers > 0 and torch.distributed.is_available() and torch.distributed.is_initialized()
            and "forkserver" in multiprocessing.get_all_start_methods()):
        multiprocessing.set_forkserver_preload(["leanmim.data"])   # no effect once the server runs
        return "forkserver"
    return None


def _remove_owned(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid and os.path.exists(path):
        os.remove(path)
