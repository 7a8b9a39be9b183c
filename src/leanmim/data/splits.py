"""Labelled subsets of a training split: the validation split that selects, and label-efficiency subsets.

From the labelled splits ``data.build_labelled_splits`` returns::

    training split (N labelled images, K classes)
      ─ stratified_split(val_fraction, seed)      → training pool (N − V)  +  validation (V)   [or DIR/val/]
      ─ class_subset(labels_per_class | label_fraction, seed)  → the labelled images trained on (≤ N − V)
    test split: untouched, never used to choose anything

Both draws are stratified (class by class) and depend only on the labels and the seed. Each class's
images are ordered by one seeded permutation and the subset is a prefix of it, so at one seed the
subsets are nested: the 1 % images are among the 10 % ones. The validation split is carved first, so
a label subset never overlaps it and changing the label budget leaves the validation split as it is.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..config import ConfigError

# Seed offsets, so the validation draw and the label draw are independent at one --split-seed.
_VAL_STREAM, _LABEL_STREAM = 0, 1


def dataset_labels(dataset: Dataset) -> Tensor:
    """Labels (N,) int64 of a labelled dataset, read from its ``labels`` without decoding any image
    (``TensorImages``, ``ImageFileDataset`` and ``Subset`` of them); other datasets are iterated once."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


def _class_orders(labels: Tensor, indices: Tensor, seed: int, stream: int) -> dict[int, Tensor]:
    """{class: its positions among ``indices``, in a seeded random order}; classes ascending."""
    generator = torch.Generator().manual_seed(2 * seed + stream)
    orders = {}
    for label in torch.unique(labels[indices]).tolist():
        members = indices[labels[indices] == label]
        orders[label] = members[torch.randperm(len(members), generator=generator)]
    return orders


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Hold out ``fraction`` of every class: (kept indices, held-out indices), each sorted, disjoint, covering
    ``range(len(labels))``. Class c of n_c images gives round(fraction · n_c) held-out images, at least 1 and
    at most n_c − 1 (so every class stays on both sides) when n_c ≥ 2; a single-image class stays kept."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in (0, 1), got {fraction}")
    kept, held = [], []
    for members in _class_orders(labels, torch.arange(len(labels)), seed, _VAL_STREAM).values():
        count = len(members)
        num_held = 0 if count < 2 else min(count - 1, max(1, round(fraction * count)))
        held.append(members[:num_held])
        kept.append(members[num_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def class_subset(labels: Tensor, indices: Tensor, seed: int, labels_per_class: int | None = None,
                 label_fraction: float | None = None) -> Tensor:
    """The labelled images kept among ``indices`` (sorted): exactly ``labels_per_class`` of every class, or
    max(1, round(label_fraction · n_c)) of class c's n_c images. Neither given: all of ``indices``."""
    if labels_per_class is not None and label_fraction is not None:
        raise ConfigError("give --labels-per-class or --label-fraction, not both")
    if labels_per_class is None and label_fraction is None:
        return indices.sort().values
    if labels_per_class is not None and labels_per_class < 1:
        raise ConfigError(f"labels_per_class must be at least 1, got {labels_per_class}")
    if label_fraction is not None and not 0.0 < label_fraction <= 1.0:
        raise ConfigError(f"label_fraction must lie in (0, 1], got {label_fraction}")
    chosen = []
    for label, members in _class_orders(labels, indices, seed, _LABEL_STREAM).items():
        if labels_per_class is not None:
            if labels_per_class > len(members):
                raise ConfigError(f"--labels-per-class {labels_per_class} exceeds the {len(members)} training images "
                                  f"of class {label} (after the validation split): lower it")
            count = labels_per_class
        else:
            count = max(1, round(label_fraction * len(members)))
        chosen.append(members[:count])
    return torch.cat(chosen).sort().values


@dataclass
class TrainValTest:
    """The three labelled splits a run uses: ``train`` (the labelled images trained on), ``val`` (selects;
    None when nothing is selected), ``test`` (reported once, never chooses). Items are (image, label)."""
    train: Dataset
    val: Dataset | None
    test: Dataset
    val_source: str          # "carved from train (…)", "DIR/val", or "none"

    def counts(self) -> dict[str, int]:
        return {"num_train": len(self.train), "num_val": len(self.val) if self.val is not None else 0,
                "num_test": len(self.test)}


def carve_splits(train: Dataset, test: Dataset, val_fraction: float, seed: int,
                 labels_per_class: int | None = None, label_fraction: float | None = None,
                 val: Dataset | None = None) -> TrainValTest:
    """Validation split first (``val`` as given, e.g. a folder's val/; else ``val_fraction`` of each class of
    ``train``, seeded; ``val_fraction`` 0: none), then the label subset of what remains."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    labels = dataset_labels(train)
    everything = torch.arange(len(labels))
    if val is not None:
        pool, source = everything, "DIR/val"
    elif val_fraction > 0:
        pool, held = stratified_split(labels, val_fraction, seed)
        val, source = Subset(train, held.tolist()), f"carved from train ({val_fraction:g} of each class, seed {seed})"
    else:
        pool, source = everything, "none"
    chosen = class_subset(labels, pool, seed, labels_per_class, label_fraction)
    subset = train if len(chosen) == len(labels) else Subset(train, chosen.tolist())
    return TrainValTest(subset, val, test, source)


def folder_val_split(data: str, img_size: int, in_chans: int) -> Dataset | None:
    """A folder's own validation split: DIR/val/<class>/* when DIR also has train/ and test/ (with only
    train/ and val/, val/ is the test split that ``build_labelled_splits`` returns). None otherwise.

    Built with ``build_labelled_splits`` on a private directory of links ``train → DIR/train``,
    ``test → DIR/val``, so classes and normalisation are the training split's; the links live until the
    process exits (a streamed dataset reads through them)."""
    from .labelled import build_labelled_splits

    if not os.path.isdir(data):
        return None

    def has_classes(path: str) -> bool:
        return os.path.isdir(path) and any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(path))

    if not all(has_classes(os.path.join(data, split)) for split in ("train", "val", "test")):
        return None
    links = tempfile.mkdtemp(prefix="leanmim-val-")
    atexit.register(shutil.rmtree, links, True)
    os.symlink(os.path.abspath(os.path.join(data, "train")), os.path.join(links, "train"))
    os.symlink(os.path.abspath(os.path.join(data, "val")), os.path.join(links, "test"))
    return build_labelled_splits(links, img_size, in_chans).test
