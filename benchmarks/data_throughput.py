"""Data-path throughput: images per second, per loader worker, that the streamed pretraining paths deliver from a
folder of JPEGs and from the same images as WebDataset shards, before and after the uint8 loader, side by side;
where a worker's time per image goes; and the loader cores a ViT-B/16 MAE step needs at a published GPU rate.

The photos are synthesised from real image content found locally, not noise: each 500 x 375 RGB JPEG is a 4 x 3
mosaic of Fashion-MNIST pictures (upscaled bicubically to 125 x 125, one picture per colour channel and tile),
saved at quality 90 — about the size and JPEG cost of a typical ImageNet photo.

    before  the per-sample float path: Pillow decode, then torchvision's RandomResizedCrop (bicubic, antialiased)
            + flip + normalize in float in the worker (``sample_transform``), float batches shipped
    after   what ``build_pretrain_data`` streams now: libjpeg-turbo decode (``decode_file`` / ``decode_bytes``),
            the sample's crop box cut and resized to 224 px in uint8 in the worker (``WorkerCrop``, seeded per
            sample), uint8 batches shipped; flip + normalize run batched on the training device
            (``BatchFlipNormalize``, timed here on this CPU for reference only)

Each configuration reads the images through leanmim's own loaders (``ImageFileDataset`` in GlobalBatchSampler
order for the folder, ``ShardSource.loader`` for the shards) at 224 px, batch 64, and reports images/s over
``--images`` images after one warm-up batch per worker, the best of REPEATS (3) interleaved runs. The breakdown
times the same steps on one thread without a DataLoader (best of 3 passes), including the worker's collation of a
batch into new shared memory (as DataLoader workers do); "rest" is the remainder of the measured per-image time
(transfer, index traffic, Python). Run it on a quiet machine: the figures are wall-clock rates.

    python benchmarks/data_throughput.py --images 1024 --workers 1 --out benchmarks/results/data_throughput.json

GPU rate assumed: MAE ViT-B/16 pretraining at 313 images/s per GPU, from 0.4084 s per iteration at 128 images per
GPU on 8 x RTX A6000 (ConvMAE authors' measurement of MAE, https://github.com/Alpha-VL/ConvMAE/issues/5).
Override it with --gpu-rate for your hardware.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from leanmim.data import FASHION_MNIST_DIR, GlobalBatchSampler, ImageFileDataset, read_idx, write_shards
from leanmim.data import common
from leanmim.data.augment import BatchFlipNormalize, WorkerCrop, sample_transform
from leanmim.data.common import SkipLog, decode_bytes, load_image, sample_draw_seed
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


class PillowFloatFiles(Dataset):
    """The "before" folder path as it was: Pillow decode + the per-sample float transform, in the worker."""

    def __init__(self, files: list[str], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_image(self.files[index], 3))


@contextlib.contextmanager
def pillow_decoding():
    """Every image decoded by Pillow (the "before" shards), as without torchvision's decoder; forked loader workers
    inherit it."""
    saved, common.decode_jpeg = common.decode_jpeg, None
    try:
        yield
    finally:
        common.decode_jpeg = saved


REPEATS = 3  # each figure is the best of this many runs (interleaved): on a shared machine, the least disturbed


def per_image_ms(step, items) -> float:
    """Milliseconds per item of ``step(item)`` over ``items``, after one untimed call; the best of REPEATS passes."""
    step(items[0])
    best = math.inf
    for _ in range(REPEATS):
        start = time.perf_counter()
        for item in items:
            step(item)
        best = min(best, (time.perf_counter() - start) * 1000 / len(items))
    return best


def shared_collate(items: list[torch.Tensor]) -> torch.Tensor:
    """What a DataLoader worker's default collate does with a batch of tensors: stack them into new shared memory."""
    storage = items[0].untyped_storage()._new_shared(sum(x.nbytes for x in items))
    out = items[0].new(storage).view(len(items), *items[0].shape)
    return torch.stack(items, out=out)


def breakdown(files: list[str], images: int, crop: WorkerCrop, before) -> dict[str, dict[str, float]]:
    """Milliseconds per image of each step a worker does, on one thread, without a DataLoader."""
    files = files[:images]
    blobs = [Path(name).read_bytes() for name in files]
    with pillow_decoding():
        pillow = per_image_ms(lambda blob: decode_bytes(blob, 3), blobs)
    fast = per_image_ms(lambda blob: decode_bytes(blob, 3), blobs)
    decoded = [decode_bytes(blob, 3) for blob in blobs]
    seeded = list(zip(decoded, (sample_draw_seed(0, 0, i) for i in range(len(decoded)))))
    crops = [crop(image, seed) for image, seed in seeded]
    floats = [before(image) for image in decoded[:BATCH * 4]]
    batches = [crops[k:k + BATCH] for k in range(0, len(crops) - BATCH + 1, BATCH)]
    flip_normalize = BatchFlipNormalize(MEAN, STD)
    device_half = per_image_ms(lambda batch: flip_normalize(batch, generator=torch.Generator().manual_seed(0)),
                               [torch.stack(batch) for batch in batches[:4]]) / BATCH
    read = per_image_ms(lambda name: Path(name).read_bytes(), files)
    return {
        "before": {"read": read, "decode (Pillow)": pillow,
                   "crop + resize + flip + normalize (float)": per_image_ms(before, decoded),
                   "collate into shared memory (float)": per_image_ms(
                       shared_collate, [floats[k:k + BATCH] for k in range(0, len(floats), BATCH)]) / BATCH},
        "after": {"read": read, "decode (libjpeg-turbo)": fast,
                  "crop + resize (uint8)": per_image_ms(lambda pair: crop(*pair), seeded),
                  "collate into shared memory (uint8)": per_image_ms(shared_collate, batches) / BATCH,
                  "flip + normalize, batched (device; this CPU)": device_half},
    }


def loaders(files: list[str], urls: list[str], workers: int, crop: WorkerCrop, before):
    """(source, path, a zero-argument context, the loader) for each configuration timed."""
    def folder(dataset):
        return DataLoader(dataset, batch_sampler=GlobalBatchSampler(len(files), BATCH, seed=0), num_workers=workers)

    def shards(transform):
        source = ShardSource(urls, 3, transform, samples_per_epoch=len(files), shuffle_buffer=1000, log=SkipLog())
        return source.loader(BATCH, 0, 0, 1, workers)

    yield "folder", "before", contextlib.nullcontext, folder(PillowFloatFiles(files, before))
    yield "folder", "after", contextlib.nullcontext, folder(ImageFileDataset(files, 3, crop))
    yield "shards", "before", pillow_decoding, shards(before)
    yield "shards", "after", contextlib.nullcontext, shards(crop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="images timed per configuration [1024]")
    parser.add_argument("--workers", default="1", help="loader worker counts, comma-separated [1]")
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
    before = sample_transform(IMG_SIZE, MEAN, STD, crop_min_scale=0.2, hflip=True)
    crop = WorkerCrop(IMG_SIZE, scale=(0.2, 1.0))
    results = {"images_timed": args.images, "image_size": "500x375 JPEG q90", "crop": IMG_SIZE, "batch": BATCH,
               "gpu_rate_assumed": args.gpu_rate, "gpu_rate_source": PUBLISHED_SOURCE, "torch_threads_per_worker": 1,
               "cpu_count": len(os.sched_getaffinity(0)), "rows": []}
    files = list_images(str(photos))
    urls = open_shards(str(shards)).splits["train"]
    results["repeats"] = REPEATS
    for workers in [int(w) for w in args.workers.split(",")]:
        configurations = list(loaders(files, urls, workers, crop, before))
        runs = {(source, path): [] for source, path, _, _ in configurations}
        for _ in range(REPEATS):  # interleaved, so that a busy spell on a shared machine hits every path alike
            for source, path, context, loader in configurations:
                with context():
                    runs[source, path].append(rate(loader, args.images))
        for (source, path), rates in runs.items():
            images_per_second = max(rates)
            per_worker = images_per_second / workers
            row = {"source": source, "path": path, "workers": workers,
                   "images_per_second": round(images_per_second, 1), "per_worker": round(per_worker, 1),
                   "all_runs": [round(r, 1) for r in rates], "ms_per_image_per_worker": round(1000 / per_worker, 3),
                   "loader_cores_for_one_gpu": math.ceil(args.gpu_rate / per_worker),
                   "cores_busy_at_gpu_rate": round(args.gpu_rate / per_worker, 2)}
            results["rows"].append(row)
            print(f"{source:<7} {path:<7} {workers} worker(s): {row['images_per_second']:7.1f} img/s "
                  f"({row['per_worker']:.1f} per worker, best of {row['all_runs']}) -> {row['loader_cores_for_one_gpu']} loader "
                  f"core(s) per GPU at {args.gpu_rate:.0f} img/s ({row['cores_busy_at_gpu_rate']:.2f} busy)")
    steps = breakdown(files, args.images, crop, before)
    one_worker = {(r["source"], r["path"]): r for r in results["rows"] if r["workers"] == 1}
    for path, parts in steps.items():
        row = one_worker.get(("folder", path))
        if row is not None:  # what the DataLoader adds on top of the worker's own steps, per image
            worker_side = sum(v for k, v in parts.items() if "device" not in k)
            parts["rest (loader: transfer, indices, Python)"] = row["ms_per_image_per_worker"] - worker_side
    results["ms_per_image_one_thread"] = {path: {k: round(v, 3) for k, v in parts.items()}
                                          for path, parts in steps.items()}
    for path, parts in results["ms_per_image_one_thread"].items():
        print(f"{path} (folder, ms per image): " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    results["decode_only_one_thread"] = {name: round(1000 / ms, 1) for name, ms in
                                         (("pillow", steps["before"]["decode (Pillow)"]),
                                          ("torchvision.io.decode_jpeg", steps["after"]["decode (libjpeg-turbo)"]))}
    print("decode only, one thread: " + ", ".join(f"{name} {value:.1f} img/s"
                                                  for name, value in results["decode_only_one_thread"].items()))
    if args.out:
        out = Path(args.out)
        partial = out.with_name(out.name + ".tmp")
        partial.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(partial, out)  # atomic: a reader never sees half a file


if __name__ == "__main__":
    main()
