"""Data-path throughput: decoded + augmented images per second, per loader worker, from a folder of JPEGs and from
the same images as WebDataset shards, and the workers a ViT-B/16 MAE step needs at a published GPU rate.

The photos are synthesised from real image content found locally, not noise: each 500 x 375 RGB JPEG is a 4 x 3
mosaic of Fashion-MNIST pictures (upscaled bicubically to 125 x 125, one picture per colour channel and tile),
saved at quality 90 — about the size and JPEG cost of a typical ImageNet photo.

Each configuration reads the images through leanmim's own loaders (``ImageFileDataset`` for the folder,
``ShardSource.loader`` for the shards) with the default pretraining augmentation at 224 px (RandomResizedCrop on the
whole image, flip, normalize), batch 64, and reports images/s over ``--images`` images after one warm-up batch per
worker. Run it on a quiet machine: the figures are wall-clock rates.

    python benchmarks/data_throughput.py --images 2048 --workers 1,2 --out benchmarks/results/data_throughput.json

GPU rate assumed: MAE ViT-B/16 pretraining at 313 images/s per GPU, from 0.4084 s per iteration at 128 images per
GPU on 8 x RTX A6000 (ConvMAE authors' measurement of MAE, https://github.com/Alpha-VL/ConvMAE/issues/5).
Override it with --gpu-rate for your hardware.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from leanmim.data import FASHION_MNIST_DIR, ImageFileDataset, read_idx, write_shards
from leanmim.data.augment import sample_transform
from leanmim.data.common import SkipLog
from leanmim.data.folder import list_images
from leanmim.data.shards import ShardSource, open_shards

PUBLISHED_GPU_RATE = 313.0  # MAE ViT-B/16 img/s per GPU: 128 / 0.4084 s on RTX A6000 (Alpha-VL/ConvMAE issue #5)
PUBLISHED_SOURCE = "https://github.com/Alpha-VL/ConvMAE/issues/5 (MAE ViT-B, 8 x A6000, 128/GPU, 0.4084 s/iter)"
IMG_SIZE, BATCH = 224, 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def synthesise_photos(out: Path, count: int, seed: int = 0) -> None:
    """``count`` 500 x 375 RGB JPEGs, each a 4 x 3 mosaic of upscaled Fashion-MNIST pictures."""
    pictures = read_idx(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        canvas = Image.new("RGB", (500, 375))
        for row in range(3):
            for col in range(4):
                channels = [Image.fromarray(pictures[j]).resize((125, 125), Image.BICUBIC)
                            for j in rng.integers(0, len(pictures), 3)]
                canvas.paste(Image.merge("RGB", channels), (col * 125, row * 125))
        canvas.save(out / f"{i:06d}.jpg", quality=90)


def rate(batches, images: int) -> float:
    """Images per second over ``images`` images after the first batch of each worker (process start-up)."""
    iterator = iter(batches)
    seen, start = 0, None
    for batch in iterator:
        seen += len(batch)
        if start is None and seen >= BATCH * max(1, getattr(batches, "num_workers", 1)):
            start, seen = time.perf_counter(), 0
        elif start is not None and seen >= images:
            break
    return seen / (time.perf_counter() - start)


def decode_rates(files: list[str], images: int) -> dict[str, float]:
    """Decode-only images/s on one thread: Pillow (what the loaders use) against torchvision's libjpeg-turbo decoder
    (``torchvision.io.decode_jpeg``), the same files read from memory, so only the decoder differs."""
    from torchvision.io import decode_jpeg

    blobs = [bytearray(Path(name).read_bytes()) for name in files[:images]]
    rates = {}
    for name, decode in (("pillow", lambda blob: Image.open(io.BytesIO(blob)).convert("RGB").load()),
                         ("torchvision.io.decode_jpeg", lambda blob: decode_jpeg(torch.frombuffer(blob, dtype=torch.uint8)))):
        decode(blobs[0])
        start = time.perf_counter()
        for blob in blobs:
            decode(blob)
        rates[name] = round(len(blobs) / (time.perf_counter() - start), 1)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="images timed per configuration [1024]")
    parser.add_argument("--workers", default="1,2", help="loader worker counts, comma-separated [1,2]")
    parser.add_argument("--gpu-rate", type=float, default=PUBLISHED_GPU_RATE,
                        help=f"images/s one GPU trains (MAE ViT-B/16) [{PUBLISHED_GPU_RATE}: {PUBLISHED_SOURCE}]")
    parser.add_argument("--work-dir", help="keep the synthesised photos and shards here [a temporary directory]")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per worker, as DataLoader workers run

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="leanmim-data-throughput-"))
    photos, shards = work / "photos", work / "shards"
    count = args.images + BATCH * 4  # enough for the warm-up batches of every worker
    if not photos.is_dir() or len(list(photos.iterdir())) < count:
        synthesise_photos(photos, count)
    if not (shards / "manifest.json").is_file():
        write_shards(str(photos), shards, shard_size=256)
    augment = sample_transform(IMG_SIZE, MEAN, STD, crop_min_scale=0.2, hflip=True)
    results = {"images_timed": args.images, "image_size": "500x375 JPEG q90", "crop": IMG_SIZE, "batch": BATCH,
               "gpu_rate_assumed": args.gpu_rate, "gpu_rate_source": PUBLISHED_SOURCE, "torch_threads_per_worker": 1,
               "cpu_count": len(os.sched_getaffinity(0)), "rows": []}
    files = list_images(str(photos))
    urls = open_shards(str(shards)).splits["train"]
    for workers in [int(w) for w in args.workers.split(",")]:
        folder = DataLoader(ImageFileDataset(files, 3, augment), batch_size=BATCH, shuffle=True,
                            num_workers=workers, drop_last=True)
        stream = ShardSource(urls, 3, augment, samples_per_epoch=len(files), shuffle_buffer=1000, log=SkipLog())
        for name, loader in (("folder", folder), ("shards", stream.loader(BATCH, 0, 0, 1, workers))):
            images_per_second = rate(loader, args.images)
            row = {"source": name, "workers": workers, "images_per_second": round(images_per_second, 1),
                   "per_worker": round(images_per_second / workers, 1),
                   "workers_for_one_gpu": math.ceil(args.gpu_rate / (images_per_second / workers))}
            results["rows"].append(row)
            print(f"{name:<7} {workers} worker(s): {row['images_per_second']:7.1f} img/s "
                  f"({row['per_worker']:.1f} per worker) -> {row['workers_for_one_gpu']} workers per GPU "
                  f"at {args.gpu_rate:.0f} img/s")
    results["decode_only_one_thread"] = decode_rates(files, args.images)
    print("decode only, one thread: " + ", ".join(f"{name} {value:.1f} img/s"
                                                  for name, value in results["decode_only_one_thread"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
