"""``leanmim shard``: write WebDataset shards (and ``manifest.json``) from an image folder or Fashion-MNIST.

Deterministic: files in sorted order (recursive), shards of ``shard_size`` samples named
``SPLIT-000000.tar …``, tar members with fixed metadata, so the same source gives the same bytes.
Image files are stored as they are (their own bytes and format, no re-encoding); idx images as PNG.
A labelled folder (DIR/train/<class>/…, DIR/test/<class>/… or val/) keeps each image's class as ``cls``
(its index in the sorted class names, listed in the manifest); so does Fashion-MNIST.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import webdataset as wds
from PIL import Image

from .common import GRAY_MODES, DataError, channel_stats, image_mode, spread
from .folder import decode_squares, labelled_files, labelled_layout, list_images
from .idx import FASHION_MNIST_MEAN, FASHION_MNIST_STD, idx_class_names, idx_labelled, idx_native_size, idx_paths
from .shards import MANIFEST, MANIFEST_FORMAT

STATS_SIDE = 64   # images are resized to this (shorter side) for the manifest's mean/std


def _sanitized_key(relative: str) -> str:
    """'sub/a.b.png' -> 'sub/a_b': no dot in the key (webdataset splits a member name at its first dot)."""
    stem = os.path.splitext(relative)[0].replace(os.sep, "/")
    return re.sub(r"[^A-Za-z0-9_/-]", "_", stem)


def _folder_samples(root: str, files: list[str], labels: list[int] | None) -> Iterator[dict[str, Any]]:
    used: set[str] = set()
    for i, path in enumerate(files):
        key = _sanitized_key(os.path.relpath(path, root))
        if key in used:
            key = f"{key}_{i}"
        used.add(key)
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        sample = {"__key__": key, "jpg" if ext == "jpeg" else ext: Path(path).read_bytes()}
        if labels is not None:
            sample["cls"] = str(labels[i])
        yield sample


def _idx_samples(images: np.ndarray, labels: np.ndarray) -> Iterator[dict[str, Any]]:
    for i, (image, label) in enumerate(zip(images, labels)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        yield {"__key__": f"{i:06d}", "png": buffer.getvalue(), "cls": str(int(label))}


def _write_split(samples: Iterator[dict[str, Any]], out: Path, split: str, shard_size: int) -> dict[str, Any]:
    shards, count, writer, current, tmp = [], 0, None, 0, None

    def close():
        if writer is not None:
            writer.close()
            os.replace(tmp, out / shards[-1]["name"])

    for sample in samples:
        if writer is None or current == shard_size:
            close()
            name = f"{split}-{len(shards):06d}.tar"
            tmp = out / f".{name}.tmp-{os.getpid()}"
            writer = wds.TarWriter(str(tmp), mtime=0, user="leanmim", group="leanmim", mode=0o644)
            shards.append({"name": name, "count": 0})
            current = 0
        writer.write(sample)
        current += 1
        shards[-1]["count"] = current
        count += 1
    close()
    if not shards:
        raise DataError(f"no samples to write for the {split} split: check the source")
    last = len(shards) - 1
    return {"pattern": f"{split}-{{000000..{last:06d}}}.tar", "count": count, "shards": shards}


def _stats(files: list[str]) -> dict[str, dict[str, list[float]]]:
    sample = [files[i] for i in spread(len(files), 2000)]
    stats = {}
    for channels in (1, 3):
        images, kept, _ = decode_squares(sample, channels, STATS_SIDE)
        if kept:
            mean, std = channel_stats(images)
            stats[str(channels)] = {"mean": list(mean), "std": list(std)}
    return stats


def written_by_shard(out: Path) -> list[Path]:
    """The shard files ``out``'s manifest lists (what an earlier ``leanmim shard`` wrote there, and nothing else);
    refuses when there is no readable manifest: then nothing in ``out`` is known to be leanmim's to replace."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        names = [shard["name"] for entry in manifest["splits"].values() for shard in entry["shards"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise DataError(f"--out '{out}' is not empty and has no readable {MANIFEST} of an earlier leanmim shard: "
                        "nothing there is known to be leanmim's to replace; choose an empty directory") from None
    listed = []
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise DataError(f"'{out / MANIFEST}' lists a shard '{name}' outside --out: replace it by hand")
        listed.append(out / name)
    return listed


def write_shards(source: str, out: str | Path, shard_size: int = 10_000, overwrite: bool = False) -> dict[str, Any]:
    """Write shards of ``source`` ("fashion-mnist", an MNIST-format directory or an image folder) into ``out``;
    returns the manifest (also written to ``OUT/manifest.json``)."""
    from .source import resolve

    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1 sample, got {shard_size}")
    kind, path, name = resolve(source)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"--out '{out}' is a file: pass a directory for the shards")
    if out.is_dir() and any(entry.name != ".lock" for entry in out.iterdir()):  # .lock: the writer's own (cli)
        if not overwrite:
            raise DataError(f"--out '{out}' is not empty: choose another directory, or pass --overwrite to replace "
                            "the shards and manifest an earlier leanmim shard wrote there (nothing else is touched)")
        for old in written_by_shard(out) + [out / MANIFEST]:
            old.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT, "source": name, "shard_size": shard_size, "splits": {}}
    if kind == "idx":
        parts = idx_labelled(path) if "test_labels" in idx_paths(path) else None
        if parts is None:
            raise DataError(f"'{path}' lacks labels: leanmim shard reads MNIST-format train and t10k images with labels")
        for split, (images, labels) in zip(("train", "test"), parts):
            manifest["splits"][split] = _write_split(_idx_samples(images[:, 0].numpy(), labels.numpy()), out,
                                                     split, shard_size)
        num_classes = int(max(int(labels.max()) for _, labels in parts)) + 1
        manifest.update(channels=1, img_size=idx_native_size(path), classes=idx_class_names(name, num_classes))
        if name == "fashion-mnist":
            manifest["stats"] = {str(c): {"mean": [FASHION_MNIST_MEAN] * c, "std": [FASHION_MNIST_STD] * c}
                                 for c in (1, 3)}
        else:
            mean, std = channel_stats(parts[0][0])
            manifest["stats"] = {str(c): {"mean": list(mean) * c, "std": list(std) * c} for c in (1, 3)}
    else:
        if labelled_layout(path):
            classes, listed = labelled_files(path)
            for split, (split_dir, files, labels) in zip(("train", "test"), listed):
                manifest["splits"][split] = _write_split(_folder_samples(split_dir, files, labels), out, split,
                                                         shard_size)
            train_files = listed[0][1]
            manifest["classes"] = classes
        else:
            train_files = list_images(path)
            manifest["splits"]["train"] = _write_split(_folder_samples(path, train_files, None), out, "train",
                                                       shard_size)
        modes = []
        for file in train_files[:8]:
            try:
                modes.append(image_mode(file))
            except Exception:  # noqa: BLE001 - unreadable: skipped when read
                continue
        manifest.update(channels=1 if modes and all(m in GRAY_MODES for m in modes) else 3, img_size=None,
                        stats=_stats(train_files))
    tmp = out / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest
