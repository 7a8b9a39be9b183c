"""A fine-tuning's accuracy on its own validation or test split, with the recipe's evaluation (centre crop, optional flip)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..config import ConfigError, RunConfig
from ..parts.classifier import class_scores
from ..train.finetune_data import finetune_splits
from ..train.precision import lightning_precision
from ..weights import load_finetuned


def evaluate_finetuned(path: str | Path, split: str = "val", hflip: bool | None = None, batch_size: int = 256) -> float:
    """Top-1 of a fine-tuning's selected classifier on its own ``split`` ('val' or 'test'), rebuilt exactly as the
    fine-tuning carved it (same data, validation fraction, split seed, label subset) and evaluated in its precision.

    ``hflip``: test-time augmentation (:func:`class_scores` with ``mirror``); None: as the fine-tuning validated
    (``--eval-hflip``). Decide on it with ``split='val'``; the test split is for reporting the protocol chosen there.
    """
    if split not in ("val", "test"):
        raise ConfigError(f"split must be 'val' or 'test', got '{split}'")
    run = load_finetuned(path)
    settings = run.settings
    splits, subsets = finetune_splits(settings, settings.data or run.config.data.path, run.config.model)
    dataset = subsets.val if split == "val" else subsets.test
    if dataset is None or len(dataset) == 0:
        raise ConfigError(f"the fine-tuning in '{path}' has no {split} split (--val-fraction 0?)")
    normalize = splits.batch_transform   # None when streamed: the dataset yields normalized tensors
    bf16 = lightning_precision(RunConfig(train=settings.train_config(run.checkpoint_path.parent))) == "bf16-mixed"
    correct = seen = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for images, labels in DataLoader(dataset, batch_size=batch_size):
            images = normalize(images) if normalize is not None else images
            scores = class_scores(run.classifier, images, settings.eval_hflip if hflip is None else hflip)
            correct += int((scores.argmax(1) == labels).sum())
            seen += labels.numel()
    return correct / seen
