"""``leanmim embed``: the frozen encoder's features of every image of a folder (or sample of shards), into one file.

One image, as the run evaluates it (the same listing, decoding and view as ``leanmim predict``)::

    file ─ decode (EXIF orientation, the model's channels)                                 uint8 (C, H, W)
         ─ shorter side to round(img_size / crop_pct), bicubic, centre crop img_size, the run's mean/std
    batch (B, C, S, S) ─▶ encoder.forward_features (B, 1 + L, D) ─▶ pool ─▶ (B, F) float32

``crop_pct``: a fine-tuning's recorded evaluation view; for a pretraining the view its probe uses on that kind of
data (8/7 resize + centre crop for folders and folder shards, plain resize for idx data); for an export or other
weights file, what it states (timm ``pretrained_cfg``, transformers ``preprocessor_config.json``), else 0.875 and
the mean/std of the images embedded (one warning says so). ``pool`` as the probe's:
``mean`` of the patch tokens (D), ``cls`` token (D), ``cls+mean`` (2·D) or ``tokens`` (L·D, grid order). For a
fine-tuning, the pool it was fine-tuned with gives the head's input (``fc_norm`` included for ``mean``; with its
``--token-drop``); another pool reads its encoder's tokens as they come out (a ``mean`` fine-tuning's encoder has
no final norm: fine-tuning replaced it by ``fc_norm``).

The file: tensor ``features`` (N, F) float32, row i the image ``paths[i]``; the metadata (JSON strings) holds
``paths`` (relative to ``--data``, sorted as listed; for shards ``SHARD:KEY`` in stream order), ``root``, ``pool``,
``source``, ``checkpoint``, ``kind``,
``method``, ``model``, ``img_size``, ``crop_pct``, ``mean``, ``std``, ``skipped`` (the unreadable files' count).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..config import ConfigError, RunConfig
from ..data.common import SkipLog, channel_stats, load_image, spread
from ..data.shards import decode_sample, is_shard_dir, looks_like_shards, open_shards, raw_samples
from ..parts.encoder import pool_features
from ..train.precision import default_device
from ..train.run import check_output_file
from ..weights import (finetune_data_stats, load_finetuned, load_run, read_finetune_entry, run_data_stats,
                       run_from_weights)
from ..weights.crop_pct import pretraining_crop_pct
from ..weights.export import write_safetensors
from ..weights.read import stated_preprocessing
from .predict import eval_view, image_files, item_batches

EMBED_POOLS = ("mean", "cls", "cls+mean", "tokens")
EMBED_FORMAT = "leanmim.embeddings"
# safetensors refuses headers over 100 MB; the image paths live in it (JSON inside a JSON string)
MAX_PATHS_BYTES = 90_000_000


@dataclass
class FeatureSource:
    """A run's encoder ready to embed: ``features`` maps normalised views (B, C, S, S) to pooled features (B, F);
    the view is ``config.model.img_size`` after resizing to round(img_size / crop_pct), normalised by mean/std."""
    kind: str                           # "pretrain", "finetune" or "weights" (an export or --init-from layout)
    module: nn.Module                   # what ``features`` runs (moved to the device)
    features: Callable[[Tensor], Tensor]
    config: RunConfig                   # the pretraining's (resolved)
    crop_pct: float
    mean: list[float] | None            # None: an older run that recorded no data statistics
    std: list[float] | None
    checkpoint: Path
    global_step: int


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def is_weights_source(source: str | Path) -> bool:
    """A weights file or model directory (an export, timm/transformers/MAE-reference weights), not a leanmim run."""
    path = Path(source).expanduser()
    return (path.is_file() and path.suffix in WEIGHT_SUFFIXES) or (path.is_dir() and (path / "config.json").is_file()
                                                                  and not (path / "run.json").is_file())


def weights_feature_source(source: str | Path, pool: str, data: str) -> FeatureSource:
    """An export or any ``--init-from`` layout as an encoder (read as ``finetune --init-from`` reads it: one load
    line); its normalisation and crop as the file states them (timm ``pretrained_cfg``, transformers
    ``preprocessor_config.json``), else the mean/std of the images embedded and a 0.875 crop, said in one warning."""

    loaded = run_from_weights(source, data)
    stated = stated_preprocessing(source)
    encoder = loaded.method.encoder
    mean, std = stated.get("mean"), stated.get("std")
    channels = loaded.config.model.in_chans
    if mean is not None and (len(mean) != channels or len(std or []) != channels):
        mean = std = None   # stated for other channels (e.g. an RGB export read as grayscale): measure instead
    crop_pct = stated.get("crop_pct", 0.875)
    assumed = [what for what, given in (("mean/std", mean), ("crop", stated.get("crop_pct"))) if given is None]
    if assumed:
        warnings.warn(f"'{source}' does not state its {' and '.join(assumed)}: embed uses "
                      + ("the mean/std of the images embedded" if mean is None else "")
                      + (" and " if mean is None and "crop" in assumed else "")
                      + ("a 0.875 centre crop (timm's default)" if "crop" in assumed else "")
                      + "; the features of weights trained on other data are only comparable with that data's "
                        "normalisation", stacklevel=2)
    return FeatureSource("weights", encoder, lambda images: pool_features(encoder.forward_features(images), pool),
                         loaded.config, crop_pct, mean, std, loaded.checkpoint_path, 0)


def measured_stats(decoders: list[Callable[[], Tensor]], channels: int, img_size: int,
                   crop_pct: float) -> tuple[list[float], list[float]]:
    """Per-channel mean/std (in [0, 1]) of the readable images of ``decoders`` (each gives a uint8 (C, H, W)
    image), as the evaluation view sees them (resized and centre-cropped)."""

    views, first_error = [], None
    for decode in decoders:
        try:
            image = decode()
        except Exception as err:  # noqa: BLE001 - unreadable: counted when embedded
            first_error = first_error or err
            continue
        views.append(eval_view(image, img_size, crop_pct, [0.0] * channels, [1.0 / 255] * channels).round()
                     .clamp(0, 255).to(torch.uint8))
    if not views:
        raise ConfigError(f"none of the {len(decoders)} images could be read to measure their mean/std "
                          f"(e.g. {type(first_error).__name__}: {first_error})")
    mean, std = channel_stats(torch.stack(views))
    return list(mean), list(std)


STATS_IMAGES = 256   # images a weights file's missing mean/std is measured on


class EmbedInput:
    """What ``--data`` names, as (name, decode) pairs in order: the image files below a directory (names relative
    to it), or the samples of shards (a manifest directory or a pattern; names ``SHARD:KEY``)."""

    def __init__(self, data: str, channels: int):

        self.data, self.channels = str(data), channels
        path = Path(data).expanduser()
        self.shards = (path.is_dir() and is_shard_dir(str(path))) or (not path.exists()
                                                                      and looks_like_shards(str(data)))
        if self.shards:

            spec = open_shards(str(data))
            self.urls = [url for urls in spec.splits.values() for url in urls]
            self.stats = ((spec.manifest or {}).get("stats") or {}).get(str(channels))
            self.root = str(path.resolve()) if path.is_dir() else str(data)
        else:
            self.files = image_files(data)   # an empty folder: one DataError line
            self.root = str(path.resolve())

    def items(self) -> Iterator[tuple[str, Callable[[], Tensor]]]:

        if not self.shards:
            for name, relative in zip(self.files, relative_paths(self.files, self.data)):
                yield relative, functools.partial(load_image, name, self.channels)
            return

        log = SkipLog()   # a damaged shard: warned and skipped by the stream, counted here by its name
        for sample in raw_samples(self.urls, log):
            url = sample["__url__"]
            shard = os.path.relpath(url, self.root) if os.path.isdir(self.root) else url
            name = f"{shard}:{sample.get('__key__', '?')}"
            yield name, functools.partial(lambda s: decode_sample(s, self.channels)[0], sample)

    def stats_decoders(self) -> list[Callable[[], Tensor]]:
        """Decoders of up to STATS_IMAGES images: evenly spread files, or the first samples of the shards."""

        if not self.shards:
            return [functools.partial(load_image, self.files[i], self.channels)
                    for i in spread(len(self.files), STATS_IMAGES)]
        return [decode for _, decode in itertools.islice(self.items(), STATS_IMAGES)]


def feature_source(source: str | Path, pool: str, data: str | None = None) -> FeatureSource:
    """Load ``source`` for embedding with ``pool``: a pretraining run or a fine-tuning (directory or checkpoint), or a
    weights file or model directory (:func:`weights_feature_source`; ``data`` picks its channels)."""

    if is_weights_source(source):
        return weights_feature_source(source, pool, data or "fashion-mnist")
    if read_finetune_entry(source) is not None:
        tuned = load_finetuned(source)
        classifier = tuned.classifier
        stats = finetune_data_stats(tuned.checkpoint_path)
        if pool == classifier.pool:   # what the head reads: fc_norm and token drop included
            features = classifier.forward_features
        else:
            features = lambda images: pool_features(classifier.encoder.forward_features(images), pool)  # noqa: E731
        return FeatureSource("finetune", classifier, features, tuned.config, tuned.results["eval_crop_pct"],
                             stats.get("mean"), stats.get("std"), tuned.checkpoint_path, tuned.results["global_step"])
    run = load_run(source)
    run.warn_if_unfinished("embed")
    mean, std = run_data_stats(run.checkpoint_path, run.config)   # None, None (warned) when unrecorded
    encoder = run.method.encoder
    return FeatureSource("pretrain", encoder, lambda images: pool_features(encoder.forward_features(images), pool),
                         run.config, pretraining_crop_pct(run.config), mean, std, run.checkpoint_path, run.global_step)


def relative_paths(files: list[str], data: str | Path) -> list[str]:
    """Each file relative to ``data`` (a directory), or its name when ``data`` is the file itself."""
    root = Path(data).expanduser()
    root = root.parent if root.is_file() else root
    return [os.path.relpath(name, root) for name in files]


@torch.no_grad()
def embed(source: str | Path, data: str, out: str | Path, pool: str = "mean", batch_size: int = 64,
          overwrite: bool = False) -> dict[str, Any]:
    """Write ``out`` (safetensors, atomically): the pooled features (N, F) of the N readable images below ``data``,
    with their paths; unreadable images are skipped and counted (one warning names the first few). Returns a
    summary (rows, feature_dim, skipped, skipped_examples, the file's path)."""

    if pool not in EMBED_POOLS:
        raise ConfigError(f"unknown --pool '{pool}': use {', '.join(EMBED_POOLS)}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    check_output_file(out, overwrite, suffixes=(".safetensors",))
    found = feature_source(source, pool, str(data))
    model = found.config.model
    inputs = EmbedInput(data, model.in_chans)
    if not inputs.shards and len(json.dumps(json.dumps(relative_paths(inputs.files, data)))) > MAX_PATHS_BYTES:
        raise ConfigError(f"the {len(inputs.files)} image paths under '{data}' are too many for one file's metadata "
                          f"(safetensors headers stay under 100 MB): embed its subfolders one by one")
    if found.kind == "weights" and found.mean is None:
        if inputs.shards and inputs.stats:   # the shards' manifest states what the images are
            found.mean, found.std = list(inputs.stats["mean"]), list(inputs.stats["std"])
        else:
            found.mean, found.std = measured_stats(inputs.stats_decoders(), model.in_chans, model.img_size,
                                                   found.crop_pct)
    if not (found.mean and found.std):
        raise ConfigError(f"'{found.checkpoint}' has no recorded data mean/std (an older run): embed cannot "
                          f"reproduce its normalisation")
    device = default_device()
    found.module.to(device)
    view = lambda image: eval_view(image, model.img_size, found.crop_pct, found.mean, found.std)  # noqa: E731
    rows: list[Tensor] = []      # (B, F) per batch, on the CPU
    names: list[str] = []
    skipped: list[str] = []
    for batch_names, images, bad in item_batches(inputs.items(), batch_size, view, warn=False):
        skipped += bad
        if batch_names:
            rows.append(found.features(images.to(device)).float().cpu())
            names += batch_names
    if not names:
        what = "samples of the shards" if inputs.shards else f"{len(inputs.files)} images"
        raise ConfigError(f"none of the {what} under '{data}' could be read (all skipped)")
    if len(json.dumps(json.dumps(names))) > MAX_PATHS_BYTES:
        raise ConfigError(f"the {len(names)} sample names of '{data}' are too many for one file's metadata "
                          f"(safetensors headers stay under 100 MB): embed fewer shards at a time")
    matrix = torch.cat(rows)     # (N, F)
    metadata = {"format": EMBED_FORMAT, "paths": names, "root": inputs.root, "pool": pool, "source": str(source),
                "checkpoint": str(found.checkpoint), "kind": found.kind, "method": found.config.method,
                "model": model.name, "img_size": model.img_size, "crop_pct": found.crop_pct,
                "mean": [float(v) for v in found.mean], "std": [float(v) for v in found.std],
                "global_step": found.global_step, "skipped": len(skipped)}
    write_safetensors({"features": matrix}, Path(out), metadata)
    if skipped:
        warnings.warn(f"embed skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:3])}"
                      f"{', ...' if len(skipped) > 3 else ''}")
    return {"out": str(out), "rows": matrix.shape[0], "feature_dim": matrix.shape[1], "pool": pool,
            "skipped": len(skipped), "skipped_examples": skipped[:20], "kind": found.kind,
            "checkpoint": str(found.checkpoint), "crop_pct": found.crop_pct}


def read_embeddings(path: str | Path) -> tuple[Tensor, list[str], dict[str, Any]]:
    """An ``embed`` file back: features (N, F), the N image paths (relative to ``metadata['root']``), metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata() or {})
        if metadata.get("format") != EMBED_FORMAT:
            raise ConfigError(f"'{path}' is not a file written by 'leanmim embed' (format: {metadata.get('format')})")
        features = handle.get_tensor("features")
    for key in ("paths", "mean", "std", "img_size", "crop_pct", "global_step", "skipped"):
        metadata[key] = json.loads(metadata[key])
    return features, metadata.pop("paths"), metadata
