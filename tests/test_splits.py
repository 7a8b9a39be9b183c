"""Validation split and label subsets: stratified, disjoint, exact per-class counts, deterministic per seed."""

import pytest
import torch
from PIL import Image

from conftest import tiny_run_config
from leanmim import api
from leanmim.train.pretrain import pretrain
from leanmim.config import ConfigError
from leanmim.data import TensorImages
from leanmim.data.splits import carve_splits, class_subset, dataset_labels, folder_val_split, stratified_split

# 3 classes of 50, 30 and 7 images, interleaved
LABELS = torch.tensor([0] * 50 + [1] * 30 + [2] * 7)[torch.randperm(87, generator=torch.Generator().manual_seed(1))]


def per_class(indices, labels=LABELS):
    return torch.bincount(labels[indices], minlength=3).tolist()


def test_validation_split_is_stratified_disjoint_and_seeded():
    kept, held = stratified_split(LABELS, 0.1, seed=0)
    assert per_class(held) == [5, 3, 1]                               # round(0.1 · n_c), at least one
    assert per_class(kept) == [45, 27, 6]
    assert set(kept.tolist()).isdisjoint(held.tolist())
    assert sorted(kept.tolist() + held.tolist()) == list(range(87))
    again_kept, again_held = stratified_split(LABELS, 0.1, seed=0)
    assert torch.equal(held, again_held) and torch.equal(kept, again_kept)
    assert not torch.equal(held, stratified_split(LABELS, 0.1, seed=1)[1])
    assert per_class(stratified_split(LABELS, 0.5, seed=0)[1]) == [25, 15, 4]   # round half to even: 3.5 → 4
    two = torch.tensor([0, 0, 1])
    kept, held = stratified_split(two, 0.9, 0)
    assert per_class(held, two) == [1, 0, 0] and per_class(kept, two) == [1, 1, 0]   # each class keeps one image


def test_label_subsets_have_exact_counts_are_nested_and_avoid_validation():
    kept, held = stratified_split(LABELS, 0.1, seed=0)
    five = class_subset(LABELS, kept, seed=0, labels_per_class=5)
    assert per_class(five) == [5, 5, 5] and set(five.tolist()) <= set(kept.tolist())
    assert per_class(class_subset(LABELS, kept, seed=0, label_fraction=0.1)) == [4, 3, 1]   # 4.5 → 4, 2.7, 0.6 → 1
    assert per_class(class_subset(LABELS, kept, seed=0, label_fraction=1.0)) == [45, 27, 6]
    two = class_subset(LABELS, kept, seed=0, labels_per_class=2)
    assert set(two.tolist()) <= set(five.tolist())                      # one seed: smaller budgets are nested
    assert not torch.equal(five, class_subset(LABELS, kept, seed=1, labels_per_class=5))
    assert torch.equal(class_subset(LABELS, kept, seed=0), kept)        # no budget: everything kept
    with pytest.raises(ConfigError, match="exceeds the 6 training images of class 2"):
        class_subset(LABELS, kept, seed=0, labels_per_class=7)
    with pytest.raises(ConfigError, match="not both"):
        class_subset(LABELS, kept, seed=0, labels_per_class=2, label_fraction=0.5)
    with pytest.raises(ConfigError, match=r"label_fraction must lie in \(0, 1\]"):
        class_subset(LABELS, kept, seed=0, label_fraction=0.0)


def test_carve_splits_on_a_dataset():
    images = torch.arange(87, dtype=torch.uint8).reshape(87, 1, 1, 1).expand(87, 1, 2, 2).contiguous()
    train = TensorImages(images, LABELS)
    test = TensorImages(images[:10], LABELS[:10])
    splits = carve_splits(train, test, 0.1, seed=0, labels_per_class=3)
    assert splits.counts() == {"num_train": 9, "num_val": 9, "num_test": 10}
    train_ids = {int(image[0, 0, 0]) for image, _ in splits.train}        # pixel value = index in the training split
    val_ids = {int(image[0, 0, 0]) for image, _ in splits.val}
    assert train_ids.isdisjoint(val_ids)
    assert all(LABELS[int(image[0, 0, 0])] == label for image, label in [*splits.train, *splits.val])
    assert dataset_labels(splits.train).bincount().tolist() == [3, 3, 3]
    assert carve_splits(train, test, 0.0, seed=0).val is None and carve_splits(train, test, 0.0, 0).train is train


def test_probe_trains_on_the_label_subset(tiny_data, tmp_path):
    pretrain(tiny_run_config(tiny_data, tmp_path / "run", epochs=1))
    report = api.probe(tmp_path / "run", baseline="random", linear_epochs=1, k=5, labels_per_class=10,
                       val_fraction=0.1)
    assert report["num_train"] == 20 and report["num_test"] == 64 and report["labels_per_class"] == 10
    full = api.probe(tmp_path / "run", baseline="random", linear_epochs=1, k=5)
    assert full["num_train"] == 128 and "labels_per_class" not in full


def test_a_folder_with_its_own_val_split_uses_it(tmp_path):
    for split, count in (("train", 4), ("val", 2), ("test", 3)):
        for cls in ("a", "b"):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("L", (8, 8), color=40 * i + (100 if cls == "b" else 0)).save(folder / f"{i}.png")
    val = folder_val_split(str(tmp_path / "data"), 8, 1)
    assert len(val) == 4 and dataset_labels(val).tolist() == [0, 0, 1, 1]
    assert folder_val_split(str(tmp_path / "data" / "train"), 8, 1) is None
