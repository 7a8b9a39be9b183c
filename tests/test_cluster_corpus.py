"""Issue 29 §3–§5: nothing hangs, nothing half-written or silently restarted, errors a user can act on.

Each case is one test; the ones about a process (a launcher missing, a FIFO read by ``shard``) run the real CLI in a
subprocess with a timeout, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_idx_dataset, tiny_run_config
from leanmim.cli import main, worker_error
from leanmim.config import ConfigError, FinetuneConfig, RunConfig
from leanmim.train.pretrain import pretrain
from leanmim.train.trainer import TrainingInterrupted
from leanmim.files import RUN_FILE, remove_stale_temporaries
from leanmim.train.run import check_output_file, data_fingerprint, write_run_file
from test_runs import SendSignalAtStep


def cli(argv: list[str], cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_PROCID")}
    return subprocess.run([sys.executable, "-m", "leanmim", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**environment, "OMP_NUM_THREADS": "1", **env})


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("leanmim: error")]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def interrupted_run(data: Path, out: Path, **train) -> None:
    """A run of 3 steps stopped by SIGTERM after its first (last.ckpt at step 1)."""
    with pytest.raises(TrainingInterrupted):
        pretrain(tiny_run_config(data, out, max_steps=3, **train), callbacks=[SendSignalAtStep(1, signal.SIGTERM)])


# ----------------------------------------------------------------------------- §3 nothing hangs

def test_fifo_named_png_is_not_opened_by_shard_or_the_fingerprint(tmp_path):
    from PIL import Image
    images = tmp_path / "images"
    images.mkdir()
    for index in range(4):
        Image.new("L", (16, 16), color=index * 40).save(images / f"{index}.png")
    os.mkfifo(images / "trap.png")
    assert data_fingerprint(str(images)).startswith("4 files")
    result = cli(["shard", str(images), "--out", str(tmp_path / "shards"), "--shard-size", "2"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train: 4 samples" in result.stdout


def test_symlink_cycles_end_in_the_fingerprint(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x" * 10)
    os.symlink(".", tmp_path / "loop1")
    os.symlink(".", tmp_path / "loop2")
    started = time.perf_counter()
    assert data_fingerprint(str(tmp_path)).startswith("1 files")
    assert time.perf_counter() - started < 5


def test_yaml_alias_bomb_is_refused(tmp_path):
    levels = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for level in range(1, 9):
        previous = chr(ord("a") + level - 1)
        levels.append(f"{chr(ord('a') + level)}: &{chr(ord('a') + level)} [{', '.join(['*' + previous] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("options:\n" + "".join(f"  {line}\n" for line in levels))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="alias"):
        RunConfig.load_yaml(bomb)
    assert time.perf_counter() - started < 5
    recursive = tmp_path / "recursive.yaml"
    recursive.write_text("options: &a {x: *a}\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        RunConfig.load_yaml(recursive)
    # a few ordinary aliases are still fine
    fine = tmp_path / "fine.yaml"
    fine.write_text("train: &t {epochs: 2}\noptions: {}\n")
    assert RunConfig.load_yaml(fine).train.epochs == 2


def test_num_nodes_without_a_launcher_is_refused_at_once(tiny_data, tmp_path):
    started = time.perf_counter()
    result = cli(["pretrain", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--num-nodes", "2",
                  "--accelerator", "cpu", "--max-steps", "1"], tmp_path)
    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "needs a launcher" in lines[0] and "torchrun" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - started < 60


def test_huge_brace_pattern_is_checked_without_listing_it(tmp_path):
    from leanmim.data import DataError
    from leanmim.data.shards import open_shards
    started = time.perf_counter()
    with pytest.raises(DataError, match="x-00000000.tar' .*does not exist"):
        open_shards(str(tmp_path / "x-{00000000..99999999}.tar"))
    (tmp_path / "y-000.tar").write_bytes(b"")
    with pytest.raises(DataError, match="y-001.tar' \\(name 2 of the pattern"):
        open_shards(str(tmp_path / "y-{000..999}.tar"))
    assert time.perf_counter() - started < 10


# ----------------------------------------------------------------------------- §4 nothing half-written

def test_stale_temporary_of_a_dead_process_does_not_block_out(tiny_data, tmp_path, single_thread):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / f".{RUN_FILE}.tmp-{dead_pid()}"
    stale.write_text('{"kind": "pre')
    live = tmp_path / f".other.tmp-{os.getppid()}"  # a live writer's temporary is left alone
    live.write_text("in progress")
    summary = pretrain(tiny_run_config(tiny_data, out, max_steps=1))
    assert summary["global_step"] == 1 and not stale.exists()
    assert remove_stale_temporaries(tmp_path) == [] and live.exists()


def test_config_yaml_is_atomic_and_repaired_on_resume(tiny_data, tmp_path, single_thread):
    out = tmp_path / "run"
    interrupted_run(tiny_data, out)
    written = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(written[:40])  # truncated
    pretrain(tiny_run_config(tiny_data, out, max_steps=3))
    assert (out / "config.yaml").read_text() == written
    assert not list(out.glob(".*tmp-*"))
    assert RunConfig.load_yaml(out / "config.yaml").train.max_steps == 3


def test_failed_first_start_records_nothing(tiny_data, tmp_path, single_thread):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        pretrain(tiny_run_config(tiny_data, out, max_steps=1, batch_size=1000))
    assert not (out / RUN_FILE).exists() and not (out / "config.yaml").exists()
    assert pretrain(tiny_run_config(tiny_data, out, max_steps=1))["global_step"] == 1


def test_run_directory_without_checkpoint_takes_new_settings(tiny_data, tmp_path, single_thread, capfd):
    out = tmp_path / "run"
    write_run_file(out, "pretrain", {"train.seed": 5, "model.depth": 9}, {})
    with pytest.warns(UserWarning, match="never wrote a checkpoint: its record is replaced"):
        summary = pretrain(tiny_run_config(tiny_data, out, max_steps=1))
    assert summary["global_step"] == 1


def test_finetune_values_are_checked_before_anything_is_written(tmp_path):
    bad = {"weight_decay": -1.0, "warmup_fraction": 5.0, "grad_clip": -1.0, "min_lr": -1.0, "base_lr": -1.0,
           "lr": float("nan"), "devices": "0", "seed": -1}
    for name, value in bad.items():
        with pytest.raises(ConfigError, match=name):
            FinetuneConfig(**{name: value}).validate()
    for name in ("mixup", "cutmix"):
        for value in (float("nan"), float("inf")):
            with pytest.raises(ConfigError, match="Beta alphas"):
                FinetuneConfig(**{name: value})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no GPU"):
            FinetuneConfig(accelerator="gpu").validate()
    FinetuneConfig().validate()


def test_unreadable_checkpoints_refuse_instead_of_restarting(tiny_data, tmp_path, single_thread):
    out = tmp_path / "run"
    interrupted_run(tiny_data, out)
    for checkpoint in (out / "checkpoints").glob("*.ckpt"):
        checkpoint.write_bytes(checkpoint.read_bytes()[:3000])
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").glob("*.ckpt")}
    with pytest.raises(ConfigError, match="every checkpoint .* is unreadable"):
        pretrain(tiny_run_config(tiny_data, out, max_steps=3))
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").glob("*.ckpt")} == before


def test_deleted_run_file_still_refuses_other_data(tiny_data, tmp_path, single_thread):
    out = tmp_path / "run"
    interrupted_run(tiny_data, out)
    (out / RUN_FILE).unlink()
    other = make_tiny_idx_dataset(tmp_path / "other", seed=1)
    with pytest.raises(ConfigError, match="data.fingerprint"):
        pretrain(tiny_run_config(other, out, max_steps=3))
    assert pretrain(tiny_run_config(tiny_data, out, max_steps=3))["global_step"] == 3  # the right data resumes
    assert (out / RUN_FILE).is_file()  # and the record is written again


def test_fingerprint_covers_what_is_read_not_what_sits_beside(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"1" * 100)
    first = data_fingerprint(str(data), exclude=[data / "run"])
    (data / ".DS_Store").write_bytes(b"finder")
    (data / "run" / "checkpoints").mkdir(parents=True)
    (data / "run" / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    assert data_fingerprint(str(data), exclude=[data / "run"]) == first
    time.sleep(0.02)
    (data / "a.png").write_bytes(b"2" * 100)  # another image of the same size
    assert data_fingerprint(str(data), exclude=[data / "run"]) != first


def test_output_files_never_written_through_symlinks(tmp_path):
    users = tmp_path / "thesis.png"
    users.write_bytes(b"the user's own file")
    (tmp_path / "link.png").symlink_to(users)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    for name in ("link.png", "dangling.png"):
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match="symbolic link"):
                check_output_file(tmp_path / name, overwrite, suffixes=(".png",))
    assert users.read_bytes() == b"the user's own file"


# ----------------------------------------------------------------------------- §5 errors a user can act on

def test_cost_and_bench_refuse_zero_sizes(tmp_path, capsys):
    for argv, fragment in ((["cost", "--img-size", "0"], "cost --img-size must be a positive integer, got 0"),
                           (["cost", "--patch-size", "-4"], "--patch-size must be a positive"),
                           (["cost", "--token-drop", "1.5"], "--token-drop must lie in [0, 1)"),
                           (["bench", "--img-size", "0"], "bench --img-size must be a positive")):
        assert main(argv) == 2
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and fragment in lines[0], lines


def test_worker_tracebacks_become_their_last_line():
    flattened = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                 '  File "x.py", line 1, in f\nleanmim.data.common.DataError: none of the 4 image files could be read')
    assert worker_error(flattened) == "none of the 4 image files could be read"
    other = flattened.replace("leanmim.data.common.DataError", "FileNotFoundError")
    assert worker_error(other).startswith("FileNotFoundError: none of") and "data change" in worker_error(other)
    assert worker_error("plain error") is None


def test_disk_full_during_a_checkpoint_is_one_line(tiny_data, tmp_path, monkeypatch, capsys, single_thread):
    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    argv = ["pretrain", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--img-size", "16",
            "--patch-size", "4", "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--decoder-embed-dim", "32",
            "--decoder-depth", "1", "--decoder-num-heads", "2", "--precision", "32", "--no-progress-bar",
            "--accelerator", "cpu", "--max-steps", "1", "--batch-size", "32"]
    assert main(argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "no space left on the device" in lines[0] and "rerun to resume" in lines[0], lines
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))  # no half-written checkpoint


def test_second_interrupt_message_is_leanmims():
    stop = TrainingInterrupted(signal.SIGINT, 0, None, at_once=True)
    assert "second SIGINT: stopped at once" in str(stop) and stop.exit_code == 130
