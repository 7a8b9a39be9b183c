"""Streamed pretraining data ships uint8 crops: the worker half (WorkerCrop, seeded per sample), the device half
(BatchFlipNormalize), crops independent of workers and batches, and an exact mid-epoch resume on a streamed folder."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from conftest import tiny_run_config
from leanmim.config import DataConfig
from leanmim.data import GlobalBatchSampler, build_pretrain_data, write_shards
from leanmim.data.augment import BatchFlipNormalize, WorkerCrop, crop_box
from leanmim.data.common import SkipLog, decode_file, load_image, sample_draw_seed
from leanmim.data.sampler import SampleIndex
from leanmim.data.shards import ShardSource, open_shards
from leanmim.train.pretrain import pretrain
from leanmim.train.trainer import TrainingInterrupted
from leanmim.weights import load_run


def make_photo_folder(root: Path, count: int = 24, channels: int = 3) -> Path:
    """``count`` small JPEGs (and every fifth a PNG) of varied sizes with smooth content, so crops differ."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        height, width = 20 + i % 5 * 3, 24 + i % 4 * 4
        ys, xs = np.mgrid[0:height, 0:width]
        planes = [(128 + 100 * np.sin(xs / (2 + c + i % 3) + ys / (3 + i % 4)) + rng.integers(-8, 9, (height, width)))
                  for c in range(channels)]
        pixels = np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
        image.save(root / (f"{i:03d}.png" if i % 5 == 0 else f"{i:03d}.jpg"), quality=90)
    return root


def crops_by_index(dataset, sampler, workers: int) -> dict[int, torch.Tensor]:
    """Each sample's item, keyed by its index, as a DataLoader with ``workers`` serves ``sampler``'s batches."""
    order = [int(i) for batch in sampler for i in batch]
    items = [x for batch in DataLoader(dataset, batch_sampler=sampler, num_workers=workers) for x in batch]
    assert len(order) == len(items)
    return dict(zip(order, items))


def test_streamed_items_are_uint8_crops_and_the_batch_transform_flips_and_normalizes(tmp_path):
    folder = make_photo_folder(tmp_path / "photos")
    data = build_pretrain_data(str(folder), img_size=16, in_chans=3, max_memory_bytes=0, crop_min_scale=0.3)
    assert not data.in_memory and isinstance(data.batch_transform, BatchFlipNormalize)
    sampler = GlobalBatchSampler(len(data.dataset), 8, seed=7)
    sampler.set_epoch(2)
    indices = next(iter(sampler))
    batch = next(iter(DataLoader(data.dataset, batch_sampler=sampler, num_workers=0)))
    assert batch.shape == (8, 3, 16, 16) and batch.dtype == torch.uint8
    for index, crop in zip(indices, batch):  # the worker half: this sample's own box, cut and resized in uint8
        image = decode_file(data.dataset.files[index], 3)
        assert index.draw_seed == sample_draw_seed(7, 2, int(index))
        top, left, h, w = crop_box(*image.shape[1:], index.draw_seed, scale=(0.3, 1.0))
        expected = TF.resized_crop(image, top, left, h, w, [16, 16], antialias=True,
                                   interpolation=TF.InterpolationMode.BICUBIC)
        assert torch.equal(crop, expected), int(index)
    # the device half, by hand: flip where the generator's draw for the image's global position is < 0.5, normalize
    out = data.batch_transform(batch, generator=torch.Generator().manual_seed(11))
    flip = torch.rand(8, generator=torch.Generator().manual_seed(11)) < 0.5
    assert 0 < flip.sum() < 8  # both cases are exercised
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    for k in range(8):
        image = batch[k].flip(-1) if flip[k] else batch[k]
        torch.testing.assert_close(out[k], (image.float() / 255 - mean) / std, rtol=0, atol=1e-6)
    # two processes, each with half of the global batch and the same generator state, = one process
    halves = [data.batch_transform(batch[r * 4:(r + 1) * 4], generator=torch.Generator().manual_seed(11), rank=r,
                                   world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), out)


def test_jpeg_fast_decode_matches_pillow(tmp_path):
    folder = make_photo_folder(tmp_path / "photos", count=6)
    for name in sorted(os.listdir(folder)):
        for channels in (1, 3):
            fast, reference = decode_file(str(folder / name), channels), load_image(str(folder / name), channels)
            assert fast.shape == reference.shape and (fast.int() - reference.int()).abs().max() <= 1, (name, channels)


def test_crop_depends_on_seed_epoch_and_index_only(tmp_path):
    """The crop of sample i in epoch e is the same with 0, 1 or 2 workers, whatever batch (or process) it falls in."""
    folder = make_photo_folder(tmp_path / "photos")
    data = build_pretrain_data(str(folder), img_size=16, in_chans=3, max_memory_bytes=0)
    n = len(data.dataset)

    def sampler(batch_size, epoch, rank=0, world_size=1):
        s = GlobalBatchSampler(n, batch_size, seed=3, rank=rank, world_size=world_size)
        s.set_epoch(epoch)
        return s

    reference = crops_by_index(data.dataset, sampler(4, epoch=1), workers=0)
    assert len(reference) == n
    for workers in (1, 2):
        served = crops_by_index(data.dataset, sampler(4, epoch=1), workers=workers)
        assert all(torch.equal(served[i], reference[i]) for i in reference), workers
    # other batches: batch size 3 on each of 2 processes
    for rank in (0, 1):
        other = crops_by_index(data.dataset, sampler(3, epoch=1, rank=rank, world_size=2), workers=2)
        assert all(torch.equal(other[i], reference[i]) for i in other), rank
    # an index reaching the dataset as a plain int (another sampler) is cropped as epoch 0 of the dataset's seed
    assert data.dataset.seed == 0
    assert torch.equal(data.dataset[5], data.dataset[SampleIndex(5, sample_draw_seed(0, 0, 5))])
    assert not torch.equal(data.dataset[5], reference[5])
    # another epoch draws other crops
    epoch2 = crops_by_index(data.dataset, sampler(4, epoch=2), workers=0)
    assert sum(not torch.equal(epoch2[i], reference[i]) for i in reference) > n // 2


def test_unreadable_streamed_file_is_skipped_and_counted_from_a_worker(tmp_path):
    folder = make_photo_folder(tmp_path / "photos", count=12)
    data = build_pretrain_data(str(folder), img_size=16, in_chans=3, max_memory_bytes=0)
    broken = data.dataset.files[3]
    Path(broken).write_bytes(Path(broken).read_bytes()[:60])  # truncated after the statistics were taken
    batches = list(DataLoader(data.dataset, batch_sampler=GlobalBatchSampler(12, 4, seed=0), num_workers=1))
    assert len(batches) == 3 and all(b.dtype == torch.uint8 and b.shape == (4, 3, 16, 16) for b in batches)
    assert data.skipped_files == [broken]


def test_shard_stream_ships_uint8_crops_and_resumes_exactly(tmp_path):
    folder = make_photo_folder(tmp_path / "photos", count=40)
    write_shards(str(folder), tmp_path / "shards", shard_size=8)
    data = build_pretrain_data(str(tmp_path / "shards"), img_size=16, in_chans=3, shuffle_buffer=8)
    assert isinstance(data.batch_transform, BatchFlipNormalize)
    urls = open_shards(str(tmp_path / "shards")).splits["train"]
    source = ShardSource(urls, 3, WorkerCrop(16), samples_per_epoch=40, shuffle_buffer=8, log=SkipLog())

    def batches(workers, resume_at=None):
        return list(source.loader(4, seed=1, rank=0, world_size=1, num_workers=workers, resume_at=resume_at))

    whole = batches(2)
    assert len(whole) == 10 and all(b.dtype == torch.uint8 and b.shape == (4, 3, 16, 16) for b in whole)
    rest = batches(2, resume_at=(0, 3))
    assert len(rest) == 7 and all(torch.equal(a, b) for a, b in zip(whole[3:], rest))


class TermAt(L.Callback):
    """SIGTERM at the end of step ``step``; the run stops (and checkpoints) at the next step end."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_streamed_folder_pretrain_interrupted_mid_epoch_and_resumed_equals_uninterrupted(tmp_path, single_thread):
    folder = make_photo_folder(tmp_path / "photos", count=64, channels=1)

    def config(out):
        run = tiny_run_config(folder, out, epochs=2, batch_size=16, checkpoint_every_steps=1)
        run.data = DataConfig(path=str(folder), num_workers=2, max_memory_gb=0)  # streamed, augmented
        return run

    whole = pretrain(config(tmp_path / "whole"))
    assert whole["global_step"] == 8 and whole["dataset"]["images"] == 64
    with pytest.raises(TrainingInterrupted):
        pretrain(config(tmp_path / "split"), callbacks=[TermAt(2)])
    assert load_run(tmp_path / "split").global_step == 3  # mid-epoch 0, an odd number of batches into it
    resumed = pretrain(config(tmp_path / "split"))
    assert resumed["resumed_from"] and resumed["global_step"] == 8
    first, second = load_run(tmp_path / "whole").method.state_dict(), load_run(tmp_path / "split").method.state_dict()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_the_engine_hands_each_sample_its_epoch_seed(tmp_path, monkeypatch, single_thread):
    """Under the engine the streamed folder receives GlobalBatchSampler's SampleIndex (not a plain int, which would
    repeat epoch 0's crops every epoch): each (epoch, sample) draws from its own seed."""
    from leanmim.data import folder as folder_module

    folder = make_photo_folder(tmp_path / "photos", count=32, channels=1)
    seen = []
    original = folder_module.ImageFileDataset.__getitem__

    def spy(self, index):
        seen.append(index)
        return original(self, index)

    monkeypatch.setattr(folder_module.ImageFileDataset, "__getitem__", spy)
    run = tiny_run_config(folder, tmp_path / "run", epochs=2, batch_size=16)
    run.data = DataConfig(path=str(folder), num_workers=0, max_memory_gb=0)  # in this process, to be seen
    pretrain(run)
    assert len(seen) == 64 and all(isinstance(index, SampleIndex) for index in seen)
    assert {index.draw_seed for index in seen} == {sample_draw_seed(0, epoch, i) for epoch in (0, 1) for i in range(32)}
