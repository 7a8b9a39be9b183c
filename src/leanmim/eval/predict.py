"""``leanmim predict``: classify a folder of images with a fine-tuning's selected classifier, into a CSV.

One image, as the fine-tuning evaluated it::

    file ─ decode (EXIF orientation, the model's channels)          uint8 (C, H, W)
         ─ shorter side to round(img_size / crop_pct), bicubic, antialiased (a non-square H x W: resized
           keeping its aspect to cover floor(H / crop_pct) x floor(W / crop_pct), as timm)
         ─ centre crop img_size, scale to [0, 1], normalise (the fine-tuning data's mean/std)   (C, H, W)
    batch ─▶ classifier ─▶ softmax (B, K); with the fine-tuning's --eval-hflip: the mean of the softmax of
             each image and of its mirror image (what it validated and selected with)

``crop_pct`` is the fine-tuning's evaluation view (8/7 resize + centre crop for folders and folder shards,
plain resize for idx data), recorded in ``finetune.json``. The CSV has one row per readable image:
``image, class_1, probability_1, …, class_k, probability_k`` (most probable first); unreadable files are
skipped, warned about and counted.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from ..config import ConfigError
from ..data import eval_box, resize_and_crop

DEFAULT_TOP_K = 5   # classes per image unless asked, at most the number of classes


def eval_view(image: Tensor, img_size, crop_pct: float, mean, std) -> Tensor:
    """uint8 (C, H, W) -> normalised float (C, height, width): the shorter side to round(img_size / crop_pct)
    (bicubic, antialiased), then the centre img_size square. A non-square (height, width): resized keeping the
    aspect ratio to cover floor(side / crop_pct) of each side, then the centre height x width (timm's eval view)."""
    image = resize_and_crop(image, eval_box(img_size, crop_pct), img_size).float().div_(255)
    return TF.normalize(image, list(mean), list(std))


def image_files(data: str | Path) -> list[str]:
    """The image files below ``data`` (sorted, recursive) or ``data`` itself when it is one image file."""
    from ..data.folder import list_images

    path = Path(data).expanduser()
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise ConfigError(f"--data '{data}' does not exist: pass a directory of images (or one image file)")
    return list_images(str(path))


def read_batches(files: list[str], channels: int, batch_size: int, view,
                 warn: bool = True) -> Iterator[tuple[list[str], Tensor, list[str]]]:
    """(names, views (B, C, S, S), skipped names) per batch of ``batch_size`` files; unreadable files skipped (with
    ``warn``, one warning each naming the reason)."""
    from ..data.common import load_image

    return item_batches(((name, functools.partial(load_image, name, channels)) for name in files), batch_size, view,
                        warn)


def item_batches(items: Iterable[tuple[str, Callable[[], Tensor]]], batch_size: int, view,
                 warn: bool = True) -> Iterator[tuple[list[str], Tensor, list[str]]]:
    """:func:`read_batches` over (name, decode) pairs: ``decode()`` gives the uint8 (C, H, W) image or raises (a
    file to open, a shard sample to decode); the pairs may be a stream (shards are read once, in order)."""
    from ..data.common import one_line, warn_skip

    items = iter(items)
    while True:
        names, views, skipped = [], [], []
        for name, decode in itertools.islice(items, batch_size):
            try:
                views.append(view(decode()))
                names.append(name)
            except Exception as err:  # noqa: BLE001 - any decoder error: skip the image, count it
                if warn:
                    warn_skip(name, one_line(err))
                skipped.append(name)
        if not names and not skipped:
            return
        yield names, torch.stack(views) if views else torch.empty(0), skipped


@torch.no_grad()
def predict(finetuning: str | Path, data: str, out: str | Path, top_k: int | None = None, batch_size: int = 64,
            overwrite: bool = False) -> dict[str, Any]:
    """Write ``out`` (CSV, atomically) with the top-``top_k`` classes and probabilities of every image below ``data``
    (``top_k`` None: min(5, the number of classes))."""
    from ..files import atomic_write_text
    from ..train.precision import default_device
    from ..train.run import check_output_file
    from ..weights import finetune_data_stats, load_finetuned, read_finetune_entry

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    check_output_file(out, overwrite, suffixes=(".csv",))
    if read_finetune_entry(finetuning) is None:
        raise ConfigError(f"'{finetuning}' is not a fine-tuning (made by 'leanmim finetune'): predict needs its "
                          f"classifier; for features of a pretrained encoder use 'leanmim embed'")
    loaded = load_finetuned(finetuning)
    names = loaded.results["class_names"]
    if top_k is None:
        top_k = min(DEFAULT_TOP_K, len(names))
    if not 1 <= top_k <= len(names):
        raise ConfigError(f"--top-k must lie between 1 and the {len(names)} classes, got {top_k}")
    stats = finetune_data_stats(loaded.checkpoint_path)
    model = loaded.config.model
    if not stats:
        raise ConfigError(f"'{loaded.checkpoint_path.parent.parent}/finetune.json' records no data mean/std: "
                          f"predict cannot reproduce the fine-tuning's normalisation")
    crop_pct = loaded.results["eval_crop_pct"]
    mirror = bool(loaded.settings.eval_hflip)
    device = default_device()
    classifier = loaded.classifier.to(device)
    view = lambda image: eval_view(image, model.img_size, crop_pct, stats["mean"], stats["std"])  # noqa: E731
    rows, skipped = [], []
    for files, images, bad in read_batches(image_files(data), model.in_chans, batch_size, view, warn=False):
        skipped += bad
        if not files:
            continue
        images = images.to(device)
        probabilities = classifier(images).float().softmax(-1)
        if mirror:  # the fine-tuning selected with mirror averaging: predict with it too
            probabilities = (probabilities + classifier(images.flip(-1)).float().softmax(-1)) / 2
        values, indices = probabilities.topk(top_k, dim=1)
        for name, top_values, top_indices in zip(files, values.tolist(), indices.tolist()):
            rows.append([name] + [item for value, index in zip(top_values, top_indices)
                                  for item in (names[index], f"{value:.6f}")])
    if not rows:
        raise ConfigError(f"none of the images under '{data}' could be read ({len(skipped)} skipped)")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["image"] + [f"{kind}_{rank}" for rank in range(1, top_k + 1) for kind in ("class", "probability")])
    writer.writerows(rows)
    atomic_write_text(Path(out), text.getvalue())
    if skipped:
        warnings.warn(f"predict skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:3])}"
                      f"{', ...' if len(skipped) > 3 else ''}")
    return {"out": str(out), "rows": len(rows), "skipped": len(skipped), "skipped_examples": skipped[:20],
            "classes": names, "mirror_averaging": mirror, "crop_pct": crop_pct, "checkpoint": str(loaded.checkpoint_path)}
