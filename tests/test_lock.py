"""One writer per run directory: an OS lock on DIR/.lock, held by the live process, released by the kernel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from leanmim.config import ConfigError
from leanmim.train.lock import LOCK_FILE, RunLock
from leanmim.train.run import check_run_directory

HOLD = ("import sys, time; from leanmim.train.lock import hold_directory; hold_directory(sys.argv[1]); "
        "print('held', flush=True); time.sleep(60)")


def start_holder(directory):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_second_writer_is_refused_naming_the_holder_then_kill_releases(tmp_path):
    out = tmp_path / "run"
    holder = start_holder(out)
    try:
        with pytest.raises(ConfigError, match=rf"in use by another leanmim process \(PID {holder.pid} on host "):
            RunLock(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(out):  # the kernel released the dead process's lock: no clean-up by hand
        assert f'"pid": {os.getpid()}' in (out / LOCK_FILE).read_text()
    # the lock file alone does not make a directory "not empty"
    assert check_run_directory(out, "pretrain", {}, extend=False) is None


def test_concurrent_pretrain_commands_on_one_out(tiny_data, tmp_path):
    out = tmp_path / "run"
    holder = start_holder(out)
    try:
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "leanmim", "pretrain", "--data", str(tiny_data), "--out",
                                 str(out), "--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth",
                                 "2", "--num-heads", "2", "--epochs", "1", "--batch-size", "32", "--precision", "32",
                                 "--no-progress-bar", "--accelerator", "cpu"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        lines = [line for line in result.stderr.splitlines() if line.startswith("leanmim: error:")]
        assert len(lines) == 1 and f"PID {holder.pid} on host" in lines[0]
        assert time.monotonic() - started < 60
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
