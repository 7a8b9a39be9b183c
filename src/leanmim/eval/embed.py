"""``leanmim embed``: the frozen encoder's features of every image of a folder, into one safetensors file.

One image, as the run evaluates it (the same listing, decoding and view as ``leanmim predict``)::

    file ─ decode (EXIF orientation, the model's channels)                                 uint8 (C, H, W)
         ─ shorter side to round(img_size / crop_pct), bicubic, centre crop img_size, the run's mean/std
    batch (B, C, S, S) ─▶ encoder.forward_features (B, 1 + L, D) ─▶ pool ─▶ (B, F) float32

``crop_pct``: a fine-tuning's recorded evaluation view; for a pretraining the view its probe uses on that kind of
data (8/7 resize + centre crop for folders and folder shards, plain resize for idx data). ``pool`` as the probe's:
``mean`` of the patch tokens (D), ``cls`` token (D), ``cls+mean`` (2·D) or ``tokens`` (L·D, grid order). For a
fine-tuning, the pool it was fine-tuned with gives the head's input (``fc_norm`` included for ``mean``; with its
``--token-drop``); another pool reads its encoder's tokens as they come out (a ``mean`` fine-tuning's encoder has
no final norm: fine-tuning replaced it by ``fc_norm``).

The file: tensor ``features`` (N, F) float32, row i the image ``paths[i]``; the metadata (JSON strings) holds
``paths`` (relative to ``--data``, sorted as listed), ``root``, ``pool``, ``source``, ``checkpoint``, ``kind``,
``method``, ``model``, ``img_size``, ``crop_pct``, ``mean``, ``std``, ``skipped`` (the unreadable files' count).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import ConfigError, RunConfig
from ..parts.encoder import pool_features
from .predict import eval_view, image_files, read_batches

EMBED_POOLS = ("mean", "cls", "cls+mean", "tokens")
EMBED_FORMAT = "leanmim.embeddings"
# safetensors refuses headers over 100 MB; the image paths live in it (JSON inside a JSON string)
MAX_PATHS_BYTES = 90_000_000


@dataclass
class FeatureSource:
    """A run's encoder ready to embed: ``features`` maps normalised views (B, C, S, S) to pooled features (B, F);
    the view is ``config.model.img_size`` after resizing to round(img_size / crop_pct), normalised by mean/std."""
    kind: str                           # "pretrain" or "finetune"
    module: nn.Module                   # what ``features`` runs (moved to the device)
    features: Callable[[Tensor], Tensor]
    config: RunConfig                   # the pretraining's (resolved)
    crop_pct: float
    mean: list[float] | None            # None: an older run that recorded no data statistics
    std: list[float] | None
    checkpoint: Path
    global_step: int


def feature_source(source: str | Path, pool: str) -> FeatureSource:
    """Load ``source`` (a pretraining run or a fine-tuning, directory or checkpoint) for embedding with ``pool``."""
    from ..weights import finetune_data_stats, load_finetuned, load_run, read_finetune_entry, run_data_stats
    from ..weights.export import pretraining_crop_pct

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
    from ..train.precision import default_device
    from ..train.run import check_output_file
    from ..weights.export import write_safetensors

    if pool not in EMBED_POOLS:
        raise ConfigError(f"unknown --pool '{pool}': use {', '.join(EMBED_POOLS)}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    check_output_file(out, overwrite, suffixes=(".safetensors",))
    files = image_files(data)   # an empty folder: one DataError line
    if len(json.dumps(json.dumps(relative_paths(files, data)))) > MAX_PATHS_BYTES:
        raise ConfigError(f"the {len(files)} image paths under '{data}' are too many for one file's metadata "
                          f"(safetensors headers stay under 100 MB): embed its subfolders one by one")
    found = feature_source(source, pool)
    model = found.config.model
    if not (found.mean and found.std):
        raise ConfigError(f"'{found.checkpoint}' has no recorded data mean/std (an older run): embed cannot "
                          f"reproduce its normalisation")
    device = default_device()
    found.module.to(device)
    view = lambda image: eval_view(image, model.img_size, found.crop_pct, found.mean, found.std)  # noqa: E731
    rows: list[Tensor] = []      # (B, F) per batch, on the CPU
    names: list[str] = []
    skipped: list[str] = []
    for batch_files, images, bad in read_batches(files, model.in_chans, batch_size, view, warn=False):
        skipped += bad
        if batch_files:
            rows.append(found.features(images.to(device)).float().cpu())
            names += batch_files
    if not names:
        raise ConfigError(f"none of the {len(files)} images under '{data}' could be read (all skipped)")
    matrix = torch.cat(rows)     # (N, F)
    metadata = {"format": EMBED_FORMAT, "paths": relative_paths(names, data),
                "root": str(Path(data).expanduser().resolve()), "pool": pool, "source": str(source),
                "checkpoint": str(found.checkpoint), "kind": found.kind, "method": found.config.method,
                "model": model.name, "img_size": model.img_size, "crop_pct": found.crop_pct,
                "mean": [float(v) for v in found.mean], "std": [float(v) for v in found.std],
                "global_step": found.global_step, "skipped": len(skipped)}
    write_safetensors({"features": matrix}, Path(out), metadata)
    if skipped:
        warnings.warn(f"embed skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:3])}"
                      f"{', ...' if len(skipped) > 3 else ''}", stacklevel=2)
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
