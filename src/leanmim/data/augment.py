"""Masked-image-modeling augmentation: RandomResizedCrop + flip + normalize, on whole batches or per sample.

In-memory data is augmented on whole uint8 batches by the engine (``BatchMIMAugment``,
``BatchEvalTransform``). Streamed data (large folders, shards) is split in two halves: each loader worker cuts
the sample's RandomResizedCrop box from the decoded image and resizes it to the training size in uint8
(``WorkerCrop``, seeded per sample; ``worker_eval_view`` without augmentation), and the engine flips and
normalizes the uint8 batch on the training device (``BatchFlipNormalize``; ``BatchEvalTransform``).
``sample_transform`` / ``sample_eval_transform`` are the older all-in-the-worker float versions (the
labelled streamed splits and the throughput benchmark's "before" figure use them).

Whole images: a batch may come with each image's own size, ``(canvas uint8 (B, C, Hc, Wc), sizes int
(B, 2))``, each image in the top-left ``sizes[i]`` corner of its canvas (the rest repeats its last
row/column). Crops are then sampled from each image's whole area, as torchvision's
RandomResizedCrop does on the original image.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..config import image_hw
from .common import cover_size, resize_and_crop, stored_hw

RRC_RATIO = (3 / 4, 4 / 3)


def crop_ratio(img_size, ratio: tuple[float, float] = RRC_RATIO) -> tuple[float, float]:
    """The RandomResizedCrop aspect range (width / height) for an output of ``img_size``: ``ratio`` times the
    output's own aspect, so that a crop is on average as wide as what it is resized to (a 64x96 output draws
    crops of aspect 1.125 to 2, not squares stretched by 1.5). A square output keeps ``ratio``, torchvision's."""
    height, width = image_hw(img_size)
    return ratio if height == width else (ratio[0] * width / height, ratio[1] * width / height)


def _unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is taken to be in [0, 1] already."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def _channel_buffer(values: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def _split_sizes(images) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch, or a (canvas, sizes) pair of whole images -> (images, sizes or None)."""
    if isinstance(images, (tuple, list)):
        return images[0], images[1]
    return images, None


def _global_rand(generator, rank: int, world_size: int, batch: int, *shape: int,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Uniform draws for the whole global batch of ``world_size * batch`` images, this process's slice
    [rank·batch, (rank+1)·batch): image i of the global batch gets the same numbers however it is split."""
    everything = torch.rand(world_size * batch, *shape, dtype=dtype, generator=generator)
    return everything[rank * batch:(rank + 1) * batch]


class BatchMIMAugment(nn.Module):
    """RandomResizedCrop + horizontal flip + normalize on a whole batch.

    (B, C, H, W) uint8 or float in [0, 1] (or a whole-image ``(canvas, sizes)`` pair) -> float32
    (B, C, height, width) normalized, ``img_size`` an int (a square) or (height, width); the aspect range is
    ``ratio`` times the output's aspect (:func:`crop_ratio`). Crops follow torchvision's RandomResizedCrop sampling
    (area fraction ~ U(scale), aspect ratio log-uniform, integer box, ``tries`` attempts then the
    central fallback), vectorised over the batch; crop, resize and flip are one ``affine_grid`` +
    ``grid_sample`` (no antialiasing: stored images are at most a few times larger than the output).
    ``generator`` must be a CPU generator; the batch may live on any device. Under data parallelism
    pass the same generator state on every process with ``rank`` / ``world_size``: each image's draws
    then depend on its position in the global batch only.
    """

    def __init__(self, img_size, mean: tuple[float, ...], std: tuple[float, ...],
                 scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = RRC_RATIO,
                 hflip: bool = True, interpolation: str = "bicubic", tries: int = 10):
        super().__init__()
        self.img_size, self.scale, self.ratio = img_size, scale, crop_ratio(img_size, ratio)
        self.hflip, self.interpolation, self.tries = hflip, interpolation, tries
        self.register_buffer("mean", _channel_buffer(mean), persistent=False)
        self.register_buffer("std", _channel_buffer(std), persistent=False)

    def sample_crops(self, batch: int, height, width, generator: torch.Generator | None = None,
                     rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Crop boxes (batch, 4) float64 as (top, left, h, w) in pixels; ``height``/``width`` are ints or
        per-image (batch,) tensors."""
        height = torch.as_tensor(height, dtype=torch.float64).expand(batch)
        width = torch.as_tensor(width, dtype=torch.float64).expand(batch)
        u = _global_rand(generator, rank, world_size, batch, self.tries, 4)
        area = (height * width)[:, None] * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[..., 0])
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[..., 1])
        w, h = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
        ok = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
        first = ok.int().argmax(1, keepdim=True)  # first valid try (0 when none is valid)
        w, h, u = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], u[torch.arange(batch), first[:, 0]]
        top = torch.floor(u[:, 2] * (height - h + 1))
        left = torch.floor(u[:, 3] * (width - w + 1))
        # Fallback when no try fits: the largest central crop with an allowed aspect ratio.
        image_ratio = width / height
        fh = torch.where(image_ratio < min(self.ratio), (width / min(self.ratio)).round(), height)
        fw = torch.where(image_ratio > max(self.ratio), (height * max(self.ratio)).round(), width)
        fallback = torch.stack([torch.div(height - fh, 2, rounding_mode="floor"),
                                torch.div(width - fw, 2, rounding_mode="floor"), fh, fw], dim=1)
        boxes = torch.stack([top, left, h, w], dim=1)
        return torch.where(ok.any(1, keepdim=True), boxes, fallback)

    def forward(self, images, generator: torch.Generator | None = None, rank: int = 0,
                world_size: int = 1) -> torch.Tensor:
        images, sizes = _split_sizes(images)
        x = _unit_float(images)
        b, c, height, width = x.shape
        if sizes is None:
            top, left, h, w = self.sample_crops(b, height, width, generator, rank, world_size).unbind(1)
        else:
            sizes = sizes.to("cpu", torch.float64)
            top, left, h, w = self.sample_crops(b, sizes[:, 0], sizes[:, 1], generator, rank, world_size).unbind(1)
        sx = w / width
        if self.hflip:
            sx = torch.where(_global_rand(generator, rank, world_size, b, dtype=torch.float32) < 0.5, -sx, sx)
        zero = torch.zeros_like(sx)
        # Output pixel centres (normalized, align_corners=False) -> input coordinates of the box.
        theta = torch.stack([torch.stack([sx, zero, (2 * left + w) / width - 1], 1),
                             torch.stack([zero, h / height, (2 * top + h) / height - 1], 1)], 1)
        theta = theta.to(device=x.device, dtype=x.dtype)
        grid = F.affine_grid(theta, [b, c, *image_hw(self.img_size)], align_corners=False)
        x = F.grid_sample(x, grid, mode=self.interpolation, padding_mode="border", align_corners=False)
        return x.clamp_(0, 1).sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


class BatchEvalTransform(nn.Module):
    """Deterministic: optional centre crop to ``crop_size``, resize to img_size (antialiased),
    normalize. (B, C, H, W) uint8 or float in [0, 1] -> float32 (B, C, height, width).

    ``img_size`` and ``crop_size`` are ints (squares) or (height, width). To a non-square size the batch is
    resized keeping its aspect ratio to cover it, then centre-cropped (as timm's eval transform), never
    stretched."""

    def __init__(self, img_size, mean: tuple[float, ...], std: tuple[float, ...],
                 crop_size=None, interpolation: str = "bicubic"):
        super().__init__()
        self.img_size, self.crop_size, self.interpolation = img_size, crop_size, interpolation
        self.register_buffer("mean", _channel_buffer(mean), persistent=False)
        self.register_buffer("std", _channel_buffer(std), persistent=False)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None, rank: int = 0,
                world_size: int = 1) -> torch.Tensor:
        """``generator``, ``rank`` and ``world_size`` are unused; they let callers treat this and
        BatchMIMAugment alike."""
        x = _unit_float(images)
        height, width = image_hw(self.img_size)
        if height != width:
            return self._non_square(x)
        if self.crop_size is not None and self.crop_size < min(x.shape[-2:]):
            x = TF.center_crop(x, [self.crop_size, self.crop_size])
        if tuple(x.shape[-2:]) != (height, width):
            x = F.interpolate(x, size=(height, width), mode=self.interpolation,
                              align_corners=False, antialias=True).clamp_(0, 1)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def _non_square(self, x: torch.Tensor) -> torch.Tensor:
        """The centre ``crop_size`` box where the batch holds it, resized to cover img_size, centre-cropped."""
        height, width = image_hw(self.img_size)
        if self.crop_size is not None:
            box = image_hw(self.crop_size)
            if box[0] <= x.shape[-2] and box[1] <= x.shape[-1]:
                x = TF.center_crop(x, list(box))
        if tuple(x.shape[-2:]) != (height, width):
            size = tuple(cover_size(x.shape[-2:], (height, width)))
            if size != tuple(x.shape[-2:]):
                x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False,
                                  antialias=True).clamp_(0, 1)
            x = TF.center_crop(x, [height, width])
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class BatchFlipNormalize(nn.Module):
    """The training-device half of the streamed augmentation: random horizontal flip + normalize of the crops the
    loader workers cut (``WorkerCrop``). uint8 (B, C, S, S) (or float in [0, 1]) -> float32 (B, C, S, S).

    The flips are drawn from ``generator`` by position in the global batch, exactly as BatchMIMAugment draws
    them: under data parallelism pass the same generator state on every process with ``rank`` / ``world_size``.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], hflip: bool = True):
        super().__init__()
        self.hflip = hflip
        self.register_buffer("mean", _channel_buffer(mean), persistent=False)
        self.register_buffer("std", _channel_buffer(std), persistent=False)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None, rank: int = 0,
                world_size: int = 1) -> torch.Tensor:
        if self.hflip:  # flipped while still uint8: a quarter of the bytes to move
            flip = _global_rand(generator, rank, world_size, images.shape[0], dtype=torch.float32) < 0.5
            images = torch.where(flip.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)
        scale = 255.0 if images.dtype == torch.uint8 else 1.0  # (x / 255 - mean) / std in two in-place passes
        mean, std = self.mean.to(images.device) * scale, self.std.to(images.device) * scale
        return images.to(torch.float32, copy=True).sub_(mean).div_(std)


def crop_box(height: int, width: int, draw_seed: int, scale: tuple[float, float] = (0.2, 1.0),
             ratio: tuple[float, float] = RRC_RATIO, tries: int = 10) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box (top, left, h, w) for a height x width image, drawn from ``draw_seed`` alone.

    torchvision's sampling (area fraction ~ U(scale), aspect ratio log-uniform, rounded sides, ``tries``
    attempts, then the largest central crop with an allowed aspect ratio), with Python's own seeded generator:
    a few microseconds, and independent of any global random state."""
    rng = random.Random(draw_seed)
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(tries):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    image_ratio = width / height
    if image_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif image_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


class WorkerCrop(nn.Module):
    """The loader-worker half of the streamed augmentation: the sample's RandomResizedCrop box (``crop_box``, drawn
    from the sample's own seed), cut from the decoded image and resized to img_size with antialiasing, in uint8.
    uint8 (C, H, W) and a draw seed -> uint8 (C, height, width) (``img_size`` an int or (height, width); the
    aspect range as BatchMIMAugment's, :func:`crop_ratio`).

    Why resize here rather than on the device: the boxes differ in size from image to image and a batch is one
    tensor, so each crop is brought to img_size where it is cut. In uint8 that costs 0.2-0.4 ms per 224-px crop
    of a 500 x 375 photo (torchvision's uint8 antialiased kernels; benchmarks/data_throughput.py) and ships 4x fewer
    bytes than float; the flip and the normalisation, the same for every image, run batched on the device
    (BatchFlipNormalize). JPEG draft mode (DCT-domain downscaling) is not used: it needs both sides of the crop
    >= 2 x img_size (never at 224 px on ImageNet-sized photos), and saves only 18% (1/2) to 38% (1/4) of the
    decode on a 2000 x 1500 JPEG, entropy decoding being most of the cost.
    """

    takes_seed = True  # the datasets pass each sample's draw seed as the second argument

    def __init__(self, img_size, scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = RRC_RATIO,
                 interpolation: v2.InterpolationMode = v2.InterpolationMode.BICUBIC):
        super().__init__()
        self.img_size, self.scale, self.interpolation = img_size, scale, interpolation
        self.ratio = crop_ratio(img_size, ratio)

    def forward(self, image: torch.Tensor, draw_seed: int) -> torch.Tensor:
        top, left, h, w = crop_box(image.shape[-2], image.shape[-1], draw_seed, self.scale, self.ratio)
        return TF.resized_crop(image, top, left, h, w, list(image_hw(self.img_size)),
                               interpolation=self.interpolation, antialias=True)


class EvalView(nn.Module):
    """The evaluation view of one image: resized keeping its aspect ratio to cover the stored box
    (:func:`~leanmim.data.common.stored_hw`; a square: the shorter side to S), then the centre img_size.
    uint8 (C, H, W) -> uint8 (C, height, width)."""

    def __init__(self, img_size):
        super().__init__()
        self.img_size = img_size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return resize_and_crop(image, stored_hw(self.img_size), self.img_size)


def worker_eval_view(img_size) -> nn.Module:
    """The streamed evaluation view, in uint8 in the worker (:class:`EvalView`); BatchEvalTransform normalizes
    the batch."""
    return EvalView(img_size)


def denormalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Undo normalization for display: (..., C, H, W) -> float in [0, 1]."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images * s + m).clamp(0, 1)


def sample_transform(img_size: int, mean, std, crop_min_scale: float, hflip: bool) -> nn.Module:
    """Per-sample equivalent of BatchMIMAugment on the whole decoded image (antialiased), all in the worker, drawn
    from torch's global generator: uint8 (C, H, W) -> float32 (C, img_size, img_size) normalized. The streamed
    pretraining data now uses WorkerCrop + BatchFlipNormalize instead (the benchmark keeps this as "before")."""
    steps = [v2.RandomResizedCrop(list(image_hw(img_size)), scale=(crop_min_scale, 1.0), ratio=crop_ratio(img_size),
                                  interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    steps += [v2.RandomHorizontalFlip()] if hflip else []
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def sample_eval_transform(img_size: int, mean, std) -> nn.Module:
    """Per-sample evaluation view (:class:`EvalView`: a square size: shorter side to S = stored_size(img_size),
    centre crop img_size), normalized."""
    return v2.Compose([EvalView(img_size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
