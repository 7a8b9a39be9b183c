"""Shared fixtures: a tiny labelled idx dataset and a tiny model configuration."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from leanmim.config import DataConfig, ModelConfig, RunConfig, TrainConfig


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an idx file (uint8), gzipped: magic 0x0000 08 <ndim>, big-endian dims, data."""
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_tiny_idx_dataset(root: Path, size: int = 16, num_train: int = 128, num_test: int = 64, seed: int = 0) -> Path:
    """Two classes of 16×16 images: a bright square top-left vs bottom-right, plus noise."""
    rng = np.random.default_rng(seed)

    def images(count):
        labels = rng.integers(0, 2, count)
        pictures = rng.integers(0, 60, (count, size, size))
        for picture, label in zip(pictures, labels):
            offset = 2 if label == 0 else size // 2
            picture[offset:offset + 6, offset:offset + 6] += 180
        return pictures.clip(0, 255), labels

    root.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = images(num_train)
    test_images, test_labels = images(num_test)
    write_idx(root / "train-images-idx3-ubyte.gz", train_images)
    write_idx(root / "train-labels-idx1-ubyte.gz", train_labels)
    write_idx(root / "t10k-images-idx3-ubyte.gz", test_images)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", test_labels)
    return root


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run faster on one thread, and much more steadily on a loaded machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_idx_dataset(tmp_path_factory.mktemp("tiny-idx"))


def tiny_model(**overrides) -> ModelConfig:
    values = dict(name="vit_tiny_patch16", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    values.update(overrides)
    return ModelConfig(**values)


def train_steps(method, images, steps: int = 12, lr: float = 2e-3) -> list[float]:
    """AdamW steps on one fixed batch (same masking each step); the losses, for 'a few steps lower the loss' tests."""
    import torch
    from leanmim.parts.tokens import BatchRandom

    optimizer = torch.optim.AdamW(method.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = method(images, rng=BatchRandom(seed=0)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def tiny_run_config(data: Path, out: Path, method: str = "mae", options=None, **train) -> RunConfig:
    train_values = dict(out=str(out), epochs=2, batch_size=32, base_lr=1e-3, warmup_fraction=0.1,
                        precision="32", progress_bar=False, log_every_steps=1, seed=0)
    train_values.update(train)
    return RunConfig(method=method, model=tiny_model(), data=DataConfig(path=str(data)),
                     train=TrainConfig(**train_values), options=dict(options or {}))


def assert_same_training_state(first: Path, second: Path) -> None:
    """Two checkpoints hold the same training state, tensor by tensor (``torch.equal``): every weight and every
    optimizer moment (a resumed run against an uninterrupted one)."""
    a, b = (torch.load(path, map_location="cpu", weights_only=True) for path in (first, second))
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    moments, again = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert moments.keys() == again.keys()
    for index in moments:
        for name in moments[index]:
            assert torch.equal(moments[index][name], again[index][name]), (index, name)
