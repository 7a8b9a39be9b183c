"""A resumed run equals an uninterrupted one, whatever a kill -9 leaves (issue 29 §1).

Each case trains through the real CLI entry point (``leanmim.cli.main``, what ``leanmim`` runs). The interrupted
runs are processes forked from this one (it has imported torch and Lightning once; fork keeps each run isolated and
the file fast) that stop at a chosen training step — right after the checkpoints of the steps before it were
written — until this process kills them with a real SIGKILL (or sends SIGTERM). A last run in this process
resumes; its final checkpoint must equal an uninterrupted run's tensor by tensor (``torch.equal``): every weight,
every AdamW moment and step count, and the schedule's position.

Pretraining, for each source — in memory (idx), a folder streamed from disk by 2 loader workers, shards made with
``leanmim shard`` and streamed by 2 workers — with drop path on (its draws must continue exactly): killed right
after the end of epoch 0 (its ``last.ckpt``), resumed, killed again mid-epoch 1 (right after a
``--checkpoint-every-steps`` ``last.ckpt``), resumed to the end. In-memory data runs by ``--max-steps`` (Lightning
counts such runs differently at epoch ends), the streamed sources by ``--epochs``.

Fine-tuning (drop path 0.1, the default): killed in epoch 2 of 3 (the resume point is epoch 1's ``last.ckpt``, which
must exist), then stopped by SIGTERM mid-epoch 2 (a mid-epoch ``last.ckpt``), resumed to the end: the same weights,
optimizer state, ``best.ckpt`` and validation history as an uninterrupted fine-tuning.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_tiny_idx_dataset
from leanmim.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--img-size", "16", "--patch-size", "4", "--in-chans", "1", "--embed-dim", "32", "--depth", "2",
        "--num-heads", "2", "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2",
        "--precision", "32", "--accelerator", "cpu", "--no-progress-bar", "--batch-size", "16", "--seed", "3"]
PRETRAIN = [*TINY, "--drop-path", "0.1", "--checkpoint-every-steps", "3"]   # 64 images: 4 steps an epoch
STREAMED = ["--max-memory-gb", "0", "--num-workers", "2", "--epochs", "3"]
FINETUNE = ["--epochs", "3", "--batch-size", "16", "--lr", "3e-3", "--precision", "32", "--accelerator", "cpu",
            "--no-progress-bar"]  # 64 − 7 validation images: 3 steps an epoch; drop path 0.1 (the default)


def _pause_then(argv: list[str], step: int, marker: Path) -> None:
    """A forked run of ``leanmim ARGV`` that waits before training step ``step + 1`` (the checkpoints of step
    ``step`` and before are on disk) while ``marker`` exists: the parent kills it there, or signals and releases it."""
    from leanmim.train.finetune import FinetuneModule
    from leanmim.train.pretrain import PretrainModule

    for cls in (PretrainModule, FinetuneModule):
        original = cls.on_train_batch_start

        def pause(self, batch, batch_idx, original=original):
            if self.global_step == step:
                marker.touch()
                deadline = time.monotonic() + 120
                while marker.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
            return original(self, batch, batch_idx)

        cls.on_train_batch_start = pause
    sys.exit(main(argv))


def interrupt(argv: list[str], step: int, how: signal.Signals, tmp_path: Path) -> int:
    """Run ``leanmim ARGV`` in a forked process, stop it before step ``step + 1`` with ``how``; its exit code."""
    marker = tmp_path / f"paused-{os.getpid()}-{time.monotonic_ns()}"
    child = multiprocessing.get_context("fork").Process(target=_pause_then, args=(argv, step, marker))
    child.start()
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.is_alive(), f"the run ended (exit {child.exitcode}) before reaching step {step}"
        assert time.monotonic() < deadline, f"step {step} not reached in 120 s"
        time.sleep(0.01)
    os.kill(child.pid, how)
    if how != signal.SIGKILL:
        marker.unlink()   # let it finish the step it is in: SIGTERM saves there and stops
    child.join(120)
    assert not child.is_alive()
    return child.exitcode


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(whole: Path, resumed: Path) -> None:
    """The two checkpoints hold the same step, weights, optimizer state and schedule, tensor by tensor."""
    a, b = checkpoint(whole), checkpoint(resumed)
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    differ = [key for key in a["state_dict"] if not torch.equal(a["state_dict"][key], b["state_dict"][key])]
    assert not differ, f"{len(differ)} of {len(a['state_dict'])} weight tensors differ, e.g. {differ[:3]}"
    (first,), (second,) = a["optimizer_states"], b["optimizer_states"]
    assert first["state"].keys() == second["state"].keys()
    moments = [(index, name) for index, state in first["state"].items() for name, value in state.items()
               if not torch.equal(value, second["state"][index][name])]
    assert not moments, f"{len(moments)} optimizer tensors differ, e.g. {moments[:3]}"
    assert first["param_groups"] == second["param_groups"]
    assert a["lr_schedulers"] == b["lr_schedulers"]


def newest_step(run: Path) -> tuple[int, str]:
    """(step, file name) of the checkpoint a resume starts from."""
    from leanmim.weights import checkpoint_step, newest_checkpoint

    newest = newest_checkpoint(run / "checkpoints")
    return checkpoint_step(newest), newest.name


def kill_twice_and_resume(args: list[str], tmp_path: Path) -> None:
    """Pretrain uninterrupted; then killed right after epoch 0's end, resumed, killed after the step-6 checkpoint
    (mid-epoch 1), resumed to the end: the same final state."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["pretrain", *args, "--out", str(whole)]) == 0
    command = ["pretrain", *args, "--out", str(split)]
    assert interrupt(command, 4, signal.SIGKILL, tmp_path) == -signal.SIGKILL
    assert newest_step(split)[0] == 4   # the epoch-end checkpoint
    assert checkpoint(split / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert interrupt(command, 6, signal.SIGKILL, tmp_path) == -signal.SIGKILL
    assert newest_step(split) == (6, "last.ckpt")   # mid-epoch 1
    assert main(command) == 0
    assert json.loads((split / "summary.json").read_text())["resumed_from"].endswith("last.ckpt")
    assert_same_state(whole / "checkpoints" / "last.ckpt", split / "checkpoints" / "last.ckpt")


def make_gray_folder(root: Path, count: int = 64) -> Path:
    """``count`` grayscale PNGs of varied sizes with smooth content and noise, so crops differ."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        height, width = 18 + i % 5 * 3, 20 + i % 4 * 4
        ys, xs = np.mgrid[0:height, 0:width]
        pixels = 128 + 100 * np.sin(xs / (2 + i % 3) + ys / (3 + i % 4)) + rng.integers(-8, 9, (height, width))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory) -> Path:
    return make_tiny_idx_dataset(tmp_path_factory.mktemp("kill-idx"), num_train=64, num_test=32)


def test_in_memory_pretraining_killed_at_an_epoch_end_and_mid_epoch_resumes_exactly(idx_data, tmp_path):
    kill_twice_and_resume([*PRETRAIN, "--data", str(idx_data), "--max-steps", "12"], tmp_path)


def test_streamed_folder_pretraining_killed_at_an_epoch_end_and_mid_epoch_resumes_exactly(tmp_path):
    folder = make_gray_folder(tmp_path / "photos")
    kill_twice_and_resume([*PRETRAIN, *STREAMED, "--data", str(folder)], tmp_path)


def test_shard_pretraining_killed_at_an_epoch_end_and_mid_epoch_resumes_exactly(tmp_path):
    folder = make_gray_folder(tmp_path / "photos")
    assert main(["shard", str(folder), "--out", str(tmp_path / "shards"), "--shard-size", "16"]) == 0
    kill_twice_and_resume([*PRETRAIN, *STREAMED, "--shuffle-buffer", "16", "--data", str(tmp_path / "shards")],
                          tmp_path)


def test_finetuning_killed_in_epoch_two_and_stopped_mid_epoch_resumes_exactly(idx_data, tmp_path):
    run = tmp_path / "pretrained"
    assert main(["pretrain", *TINY, "--data", str(idx_data), "--max-steps", "4", "--out", str(run)]) == 0
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["finetune", str(run), *FINETUNE, "--out", str(whole)]) == 0
    command = ["finetune", str(run), *FINETUNE, "--out", str(split)]
    assert interrupt(command, 4, signal.SIGKILL, tmp_path) == -signal.SIGKILL   # step 5 is epoch 2's second
    assert checkpoint(split / "checkpoints" / "last.ckpt")["global_step"] == 3   # written at epoch 1's end
    assert interrupt(command, 4, signal.SIGTERM, tmp_path) == 128 + signal.SIGTERM
    assert newest_step(split) == (5, "last.ckpt")   # saved at the end of the step SIGTERM arrived in
    assert main(command) == 0
    for name in ("last.ckpt", "best.ckpt"):
        assert_same_state(whole / "checkpoints" / name, split / "checkpoints" / name)
    first, second = (json.loads((out / "finetune.json").read_text()) for out in (whole, split))
    assert second["resumed_from"] and first["history"] == second["history"]
    for key in ("selected_epoch", "selected_val_top1", "selected_test_top1", "last_test_top1"):
        assert first[key] == second[key], key
