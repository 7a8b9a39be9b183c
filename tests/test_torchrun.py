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


def test_a_killed_peer_ends_the_other_process_in_one_line(tmp_path):
    """kill -9 of rank 1 mid-run: rank 0's collective fails in gloo; it says so in one line (not "unexpected")."""
    import signal
    import time

    data = make_tiny_idx_dataset(tmp_path / "idx", num_train=1024)
    out, port = tmp_path / "run", str(free_port())
    command = [TORCHRUN, "--nproc-per-node", "2", "-m", "leanmim", "pretrain", "--devices", "2", "--strategy", "ddp",
               "--data", str(data), "--out", str(out), *TINY, "--epochs", "100"]
    launcher = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1", "PET_MASTER_PORT": port},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (out / "logs" / "metrics.csv").exists() \
                and not (out / "summary.json").exists():
            time.sleep(0.3)
        time.sleep(2)   # training: both ranks inside collectives every step
        rank1 = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _environment_has(
            int(pid), b"LOCAL_RANK=1", b"PET_MASTER_PORT=" + port.encode())]
        assert rank1, "rank 1 not found"
        os.kill(rank1[0], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    ours = [line for line in output.splitlines() if line.startswith("leanmim: error")]
    assert len(ours) == 1 and "another process of this multi-process run stopped" in ours[0], output[-3000:]
    assert "unexpected" not in ours[0]


def _environment_has(pid: int, *entries: bytes) -> bool:
    try:
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return all(entry in environment for entry in entries)
