"""The README's multi-process command, exactly as documented (torchrun + --devices 2 --strategy ddp), on CPU/gloo:
it trains, writes checkpoints, and the same command with a longer schedule resumes. On shards and on a folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_tiny_idx_dataset
from leanmim.data import write_shards

TORCHRUN = shutil.which("torchrun") or str(Path(os.sys.executable).with_name("torchrun"))
TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
        "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2", "--precision", "32",
        "--batch-size", "8", "--accelerator", "cpu", "--no-progress-bar", "--log-every-steps", "1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_pretrain(data: Path, out: Path, *flags: str) -> dict:
    command = [TORCHRUN, "--nproc-per-node", "2", "-m", "leanmim", "pretrain", "--devices", "2", "--strategy", "ddp",
               "--data", str(data), "--out", str(out), *TINY, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PET_MASTER_PORT": str(free_port())}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def make_folder(root: Path, count: int = 40) -> Path:
    """Photos of mixed shapes (whole images in memory): 20 x 28 and 28 x 20 crops of a smooth pattern."""
    root.mkdir(parents=True)
    y, x = np.mgrid[0:64, 0:64]
    for i in range(count):
        pattern = (127 + 120 * np.sin((x * (1 + i % 5) + y * (i % 3)) / 9)).astype(np.uint8)
        picture = pattern[: 20 + 8 * (i % 2), : 28 - 8 * (i % 2)]
        Image.fromarray(np.stack([picture, picture[::-1], 255 - picture], -1)).save(root / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("source", ["shards", "folder"])
def test_readme_torchrun_command_trains_checkpoints_and_resumes(tmp_path, source):
    if source == "shards":
        data = tmp_path / "shards"
        write_shards(str(make_tiny_idx_dataset(tmp_path / "idx")), data, shard_size=16)  # 8 train shards
        extra = ["--num-workers", "1"]
    else:
        data = make_folder(tmp_path / "photos")
        extra = []
    out = tmp_path / "run"
    first = torchrun_pretrain(data, out, "--max-steps", "2", *extra)
    assert first["world_size"] == 2 and first["global_step"] == 2 and first["resumed_from"] is None
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "run.json").is_file()
    resumed = torchrun_pretrain(data, out, "--max-steps", "4", "--extend", *extra)
    assert resumed["global_step"] == 4 and resumed["resumed_from"].endswith("last.ckpt")
    assert resumed["final_loss"] is not None and np.isfinite(resumed["final_loss"])
