"""WebDataset shards: `leanmim shard`, the per-rank/per-worker stream, bad samples, exact resume, labelled shards."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torchvision.transforms import v2

from conftest import make_tiny_idx_dataset, tiny_run_config
from leanmim.weights import load_run
from leanmim.cli import main
from leanmim.config import DataConfig
from leanmim.data import DataError, build_labelled_splits, build_pretrain_data, default_img_size, write_shards
from leanmim.data.augment import sample_transform
from leanmim.data.common import SkipLog, worker_start_method
from leanmim.data.shards import ShardSource, open_shards
from leanmim.train.pretrain import pretrain
from leanmim.train.trainer import TrainingInterrupted


def make_labelled_folder(root: Path, per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls, value in (("cat", 40), ("dog", 200)):
            (root / split / cls / "deep").mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(value + rng.integers(-9, 10, (10 + i, 14, 3)), 0, 255).astype(np.uint8)
                sub = "deep/" if i == 0 else ""
                Image.fromarray(pixels).save(root / split / cls / f"{sub}im.{i}.png")


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_shard_folder_is_deterministic_keeps_classes_and_refuses_to_overwrite(tmp_path, capsys):
    make_labelled_folder(tmp_path / "src")
    assert main(["shard", str(tmp_path / "src"), "--out", str(tmp_path / "a"), "--shard-size", "4"]) == 0
    write_shards(str(tmp_path / "src"), tmp_path / "b", shard_size=4)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["manifest.json", "test-000000.tar", "test-000001.tar", "train-000000.tar", "train-000001.tar"]
    for name in names:  # same source, same bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog"] and manifest["channels"] == 3
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [4, 2]
    # the folder readers' order (sorted; a folder's files before its subfolders); keys without dots; cls
    assert tar_members(tmp_path / "a" / "train-000000.tar") == [
        "cat/im_1.cls", "cat/im_1.png", "cat/im_2.cls", "cat/im_2.png", "cat/deep/im_0.cls", "cat/deep/im_0.png",
        "dog/im_1.cls", "dog/im_1.png"]
    with tarfile.open(tmp_path / "a" / "train-000001.tar") as tar:
        assert tar.extractfile("dog/im_2.cls").read() == b"1"
        png = tar.extractfile("dog/im_2.png").read()
    assert png == (tmp_path / "src" / "train" / "dog" / "im.2.png").read_bytes()  # stored as they were
    before = (tmp_path / "a" / "manifest.json").read_bytes()
    capsys.readouterr()
    assert main(["shard", str(tmp_path / "src"), "--out", str(tmp_path / "a")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "a" / "manifest.json").read_bytes() == before


def test_labelled_shards_equal_their_sources(tmp_path):
    """Probing reads shards of an idx dataset and of a labelled folder exactly as it reads the sources."""
    idx = make_tiny_idx_dataset(tmp_path / "idx")
    write_shards(str(idx), tmp_path / "idx-shards", shard_size=50)
    assert default_img_size(str(tmp_path / "idx-shards")) == 16
    direct, sharded = (build_labelled_splits(str(p), 16, 1) for p in (idx, tmp_path / "idx-shards"))
    for a, b in ((direct.train, sharded.train), (direct.test, sharded.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    make_labelled_folder(tmp_path / "src")
    write_shards(str(tmp_path / "src"), tmp_path / "folder-shards", shard_size=5)
    direct, sharded = (build_labelled_splits(str(p), 8, 3) for p in (tmp_path / "src", tmp_path / "folder-shards"))
    assert sharded.class_names == ["cat", "dog"] and (len(sharded.train), len(sharded.test)) == (6, 6)
    # a folder's splits are ordered by class then path, the shards by path: compare as sets of (image, label)
    def items(split):
        return sorted((bytes(image.flatten().tolist()), label) for image, label in split)
    assert items(direct.train) == items(sharded.train) and items(direct.test) == items(sharded.test)
    with pytest.raises(DataError, match="no labelled shards"):
        write_shards(str(tmp_path / "src" / "train" / "cat"), tmp_path / "unlabelled", shard_size=5)
        build_labelled_splits(str(tmp_path / "unlabelled"), 8, 3)


def stream_batches(source: ShardSource, epoch: int = 0, resume_at=None, rank: int = 0, world: int = 1,
                   workers: int = 0, batch_size: int = 4) -> list[torch.Tensor]:
    loader = source.loader(batch_size, seed=3, rank=rank, world_size=world, num_workers=workers,
                           epoch=lambda: epoch, resume_at=resume_at)
    return list(loader)


@pytest.fixture(scope="module")
def idx_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_shards(str(make_tiny_idx_dataset(root / "idx")), root / "shards", shard_size=20)  # 7 train shards
    return root / "shards"


def test_stream_epochs_ranks_workers_and_exact_resume(idx_shards):
    spec = open_shards(str(idx_shards))
    assert spec.counts["train"] == 128 and len(spec.splits["train"]) == 7
    urls = spec.splits["train"]
    augment = sample_transform(16, (0.5,), (0.5,), crop_min_scale=0.3, hflip=True)
    source = ShardSource(urls, 1, augment, samples_per_epoch=64, shuffle_buffer=10, log=SkipLog())
    whole = stream_batches(source, workers=2)
    assert len(whole) == 64 // 4 and all(b.shape == (4, 1, 16, 16) and b.dtype == torch.float32 for b in whole)
    assert all(torch.equal(a, b) for a, b in zip(whole, stream_batches(source, workers=2)))      # deterministic
    assert not torch.equal(whole[0], stream_batches(source, epoch=1, workers=2)[0])              # epochs differ
    for done in (1, 4, 7):  # resumed after `done` batches (odd: the other worker goes first): exactly the rest
        rest = stream_batches(source, resume_at=(0, done), workers=2)
        assert len(rest) == len(whole) - done
        assert all(torch.equal(a, b) for a, b in zip(whole[done:], rest)), done
    assert len(stream_batches(source, resume_at=(1, 5), workers=2)) == len(whole)  # another epoch: not skipped


def test_stream_splits_shards_between_ranks_and_workers(idx_shards):
    """Each (rank, worker) slot reads its own shards: with the identity transform, the images two slots
    deliver in one epoch never come from the same shard."""
    urls = open_shards(str(idx_shards)).splits["train"]
    by_shard = {}
    for shard, url in enumerate(urls):
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    image = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
                    by_shard[image.tobytes()] = shard
    source = ShardSource(urls, 1, v2.Identity(), samples_per_epoch=40, shuffle_buffer=5, log=SkipLog())
    shards_of = {}
    for rank in (0, 1):
        for worker in (0, 1):
            loader = source.loader(4, seed=0, rank=rank, world_size=2, num_workers=2)
            batches = list(loader)
            assert len(batches) == 5
            images = [image for batch in batches[worker::2] for image in batch]
            shards_of[rank, worker] = {by_shard[image[0].numpy().tobytes()] for image in images}
    slots = list(shards_of.values())
    assert all(not (a & b) for i, a in enumerate(slots) for b in slots[i + 1:]), shards_of


def write_bad_shard(idx_shards: Path, shard: Path) -> Path:
    """A copy of the first training shard whose samples 000003 and 000005 are truncated PNGs."""
    with tarfile.open(idx_shards / "train-000000.tar") as src, tarfile.open(shard, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.startswith(("000003.", "000005.")) and member.name.endswith(".png"):
                data = data[: len(data) // 3]  # truncated PNG
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return shard


def test_bad_samples_are_replaced_counted_and_named(tmp_path, idx_shards):
    shard = write_bad_shard(idx_shards, tmp_path / "bad-000000.tar")
    pattern = str(tmp_path / "bad-{000000..000000}.tar")
    with pytest.raises(DataError, match="--samples-per-epoch"):
        build_pretrain_data(pattern, 16, 1)
    data = build_pretrain_data(pattern, 16, 1, samples_per_epoch=20, augment=False, shuffle_buffer=1)  # in order
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        batches = list(data.dataset.loader(5, seed=0, rank=0, world_size=1, num_workers=0))
    assert len(batches) == 4 and all(b.shape == (5, 1, 16, 16) for b in batches)
    assert sorted(data.skipped_files) == [f"{shard}:000003", f"{shard}:000005"]


def test_loader_workers_start_from_a_forkserver_inside_a_process_group(idx_shards, tmp_path):
    """Under torchrun, a forked loader worker can hang for ever (CPython 3.11 after-fork lock): inside a process
    group the workers start from a forkserver, and deliver the same batches and bad-sample log as forked ones."""
    urls = open_shards(str(idx_shards)).splits["train"]
    augment = sample_transform(16, (0.5,), (0.5,), crop_min_scale=0.3, hflip=True)
    source = ShardSource(urls, 1, augment, samples_per_epoch=32, shuffle_buffer=10, log=SkipLog())
    bad = build_pretrain_data(str(write_bad_shard(idx_shards, tmp_path / "bad-000000.tar")), 16, 1,
                              samples_per_epoch=20, augment=False, shuffle_buffer=1).dataset
    assert worker_start_method(2) is None and source.loader(4, 3, 0, 1, 2).multiprocessing_context is None
    forked = stream_batches(source, workers=2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert worker_start_method(0) is None and worker_start_method(2) == "forkserver"
        loader = source.loader(4, seed=3, rank=0, world_size=1, num_workers=2)
        assert loader.multiprocessing_context.get_start_method() == "forkserver"
        served = list(loader)
        assert len(served) == len(forked) == 8 and all(torch.equal(a, b) for a, b in zip(forked, served))
        # the worker warns on its own stderr; the names reach this process through the SkipLog's file
        assert len(list(bad.loader(5, seed=0, rank=0, world_size=1, num_workers=1))) == 4
    finally:
        dist.destroy_process_group()
    assert sorted(bad.skipped_files) == [f"{tmp_path / 'bad-000000.tar'}:000003", f"{tmp_path / 'bad-000000.tar'}:000005"]


def test_pretrain_on_shards_interrupted_and_resumed_equals_uninterrupted(idx_shards, tmp_path, single_thread):
    """SIGTERM mid-epoch (streamed shards, 2 loader workers), then the same command again: every tensor equal."""

    class TermAt(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 4:  # the signal is handled at the next step end: 5 (an odd mid-epoch skip)
                os.kill(os.getpid(), signal.SIGTERM)

    def config(out):
        run = tiny_run_config(idx_shards, out, epochs=2, batch_size=16, checkpoint_every_steps=1)
        run.data = DataConfig(path=str(idx_shards), num_workers=2, shuffle_buffer=16)
        return run

    whole = pretrain(config(tmp_path / "whole"))
    assert whole["global_step"] == 16 and whole["dataset"]["images"] == 128  # 128 samples / 16 per batch, 2 epochs
    with pytest.raises(TrainingInterrupted):
        pretrain(config(tmp_path / "split"), callbacks=[TermAt()])
    assert load_run(tmp_path / "split").global_step == 5
    resumed = pretrain(config(tmp_path / "split"))
    assert resumed["resumed_from"] and resumed["global_step"] == 16
    first, second = load_run(tmp_path / "whole").method.state_dict(), load_run(tmp_path / "split").method.state_dict()
    for key in first:
        assert torch.equal(first[key], second[key]), key
