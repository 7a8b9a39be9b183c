"""The run lifecycle: identity, resume-or-refuse, extension, checkpoints kept, mid-epoch resume, signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import assert_same_training_state, tiny_run_config
from leanmim.weights import newest_checkpoint
from leanmim.config import ConfigError
from leanmim.train.optim import resume_position
from leanmim.train.pretrain import pretrain
from leanmim.train.trainer import TrainingInterrupted
from leanmim.files import RUN_FILE, dumps_strict
from leanmim.train.run import check_output_file, data_fingerprint, identity_differences


def files_state(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def strict_json(path: Path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


class SendSignalAtStep(L.Callback):
    """Sends ``signum`` to this process once ``global_step`` reaches ``step`` (as a user or SLURM would)."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def test_identity_differences_name_every_field():
    old = {"train.seed": 0, "model.depth": 2, "data.fingerprint": "3 files, ab"}
    new = {"train.seed": 1, "model.depth": 2, "data.fingerprint": "4 files, cd", "train.extra": None}
    assert identity_differences(old, new) == ["data.fingerprint: 3 files, ab -> 4 files, cd", "train.seed: 0 -> 1"]
    # a field added later (ADDED_FIELDS) compares as its old value when a stored identity lacks it, else as none
    assert identity_differences({"epochs": 4}, {"epochs": 4, "eval_hflip": False}) == []
    assert identity_differences({"epochs": 4}, {"epochs": 4, "eval_hflip": True}) == ["eval_hflip: False -> True"]
    assert identity_differences({"epochs": 4}, {"epochs": 4, "pool": "mean"}) == ["pool: none -> mean"]


def test_data_fingerprint_tracks_files_and_sizes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"12345")
    first = data_fingerprint(str(tmp_path))
    stamp = (tmp_path / "a" / "x.png").stat().st_mtime_ns
    assert first.startswith("1 files, ")
    (tmp_path / "a" / "x.png").write_bytes(b"123456")  # same name, other size
    assert data_fingerprint(str(tmp_path)) != first
    (tmp_path / "a" / "x.png").write_bytes(b"12345")
    os.utime(tmp_path / "a" / "x.png", ns=(stamp, stamp))  # the same file again (sizes and mtimes are compared)
    assert data_fingerprint(str(tmp_path)) == first


def test_strict_json_writes_null_for_nan():
    assert json.loads(dumps_strict({"loss": float("nan"), "items": [float("inf"), 1.5]})) == {"loss": None,
                                                                                             "items": [None, 1.5]}


def test_resume_position_counts_steps_and_accumulation():
    assert resume_position(0, 4, 1) == (0, 0)
    assert resume_position(6, 4, 1) == (1, 2)
    assert resume_position(8, 4, 1) == (2, 0)
    # 5 batches per epoch, 2 per step: 3 steps per epoch (the last on one batch)
    assert resume_position(4, 5, 2) == (1, 2)


def test_rerun_refuses_other_settings_and_finished_rerun_changes_nothing(tiny_data, tmp_path, single_thread):
    run = tmp_path / "run"
    summary = pretrain(tiny_run_config(tiny_data, run, epochs=1))
    assert summary["global_step"] == 4
    record = strict_json(run / RUN_FILE)
    assert record["kind"] == "pretrain" and record["identity"]["train.seed"] == 0
    assert record["identity"]["data.fingerprint"].startswith("4 files, ")
    strict_json(run / "summary.json")
    before = files_state(run)
    again = pretrain(tiny_run_config(tiny_data, run, epochs=1))  # finished: nothing to do, nothing touched
    assert again["already_finished"] and again["global_step"] == 4
    assert files_state(run) == before
    other = tmp_path / "other-data"
    shutil.copytree(tiny_data, other)
    (other / "extra.txt").write_text("more")
    for change, expected in [({"seed": 1}, "train.seed: 0 -> 1"), ({"epochs": 2}, "train.epochs: 1 -> 2"),
                             ({"batch_size": 16}, "train.global_batch_size: 32 -> 16"),
                             ({"base_lr": 2e-3}, "train.base_lr: 0.001 -> 0.002")]:
        with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
            pretrain(tiny_run_config(tiny_data, run, **{"epochs": 1, **change}))
    with pytest.raises(ConfigError, match=r"data\.fingerprint: 4 files, \w+ -> 5 files"):
        pretrain(tiny_run_config(other, run, epochs=1))
    assert files_state(run) == before
    # the deliberate way: --extend trains the same run longer
    with pytest.raises(ConfigError, match="add --extend"):
        pretrain(tiny_run_config(tiny_data, run, epochs=2))
    extended = pretrain(tiny_run_config(tiny_data, run, epochs=2, extend=True))
    assert extended["global_step"] == 8 and extended["resumed_from"]
    assert strict_json(run / RUN_FILE)["identity"]["train.epochs"] == 2


def test_out_refuses_foreign_directories_and_files(tiny_data, tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.yaml").write_text("mine\n")
    with pytest.raises(ConfigError, match="is not empty and is not a leanmim pretrain run"):
        pretrain(tiny_run_config(tiny_data, user, max_steps=1))
    assert (user / "config.yaml").read_text() == "mine\n" and len(list(user.iterdir())) == 1
    with pytest.raises(ConfigError, match="is a file"):
        pretrain(tiny_run_config(tiny_data, user / "config.yaml", max_steps=1))
    one_patch = tiny_run_config(tiny_data, tmp_path / "never", max_steps=1)
    one_patch.model.patch_size = 16
    with pytest.raises(ConfigError, match="single patch"):  # a failed start leaves no run directory
        pretrain(one_patch)
    assert not (tmp_path / "never").exists()


def test_keep_checkpoints_keeps_the_newest(tiny_data, tmp_path, single_thread):
    run = tmp_path / "run"
    pretrain(tiny_run_config(tiny_data, run, epochs=4, keep_checkpoints=2))
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["epoch002.ckpt", "epoch003.ckpt",
                                                                           "last.ckpt"]


def test_newest_valid_checkpoint_wins_and_corrupt_ones_are_skipped(tiny_data, tmp_path, single_thread):
    run = tmp_path / "run"
    pretrain(tiny_run_config(tiny_data, run, epochs=2, keep_checkpoints=-1))
    checkpoints = run / "checkpoints"
    # a kill between writing epoch001.ckpt and updating last.ckpt: last.ckpt still holds epoch 0
    shutil.copy(checkpoints / "epoch000.ckpt", checkpoints / "last.ckpt")
    assert newest_checkpoint(checkpoints).name == "epoch001.ckpt"
    # a truncated newest file is skipped, with a warning naming it
    (checkpoints / "epoch001.ckpt").write_bytes((checkpoints / "epoch001.ckpt").read_bytes()[:1000])
    with pytest.warns(UserWarning, match="epoch001.ckpt"):
        assert newest_checkpoint(checkpoints).name == "last.ckpt"


def test_mid_epoch_interruption_resumes_exactly(tiny_data, tmp_path, single_thread):
    """SIGTERM at step 6 of 8 (mid-epoch 1), with drop path on: the resumed run equals the uninterrupted one,
    every tensor of model and optimizer state. Stale temporary files are cleaned on the next start."""
    model_overrides = {"drop_path": 0.2}  # drop path draws from the global generator: its state must resume too

    def config(out, **train):
        cfg = tiny_run_config(tiny_data, out, epochs=2, checkpoint_every_steps=3, **train)
        cfg.model.drop_path = model_overrides["drop_path"]
        return cfg

    pretrain(config(tmp_path / "whole"))
    split = tmp_path / "split"
    with pytest.raises(TrainingInterrupted) as stopped:
        pretrain(config(split), callbacks=[SendSignalAtStep(5, signal.SIGTERM)])
    # the signal arrives after step 5's stop check: training stops at the end of step 6 (epoch 1, batch 2)
    assert stopped.value.step == 6 and stopped.value.exit_code == 143
    assert "rerun the same command to resume" in str(stopped.value)
    assert torch.load(split / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 6
    stale = split / "checkpoints" / ".last.ckpt.tmp-99999"
    stale.write_bytes(b"partial")
    summary = pretrain(config(split))
    assert summary["global_step"] == 8 and not stale.exists()
    assert_same_training_state(tmp_path / "whole/checkpoints/last.ckpt", split / "checkpoints/last.ckpt")


def test_output_file_guard(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match="already exists: pass --overwrite"):
        check_output_file(tmp_path / "a.png", overwrite=False, suffixes=(".png",))
    assert check_output_file(tmp_path / "a.png", overwrite=True, suffixes=(".png",)) == tmp_path / "a.png"
    with pytest.raises(ConfigError, match="is a directory"):
        check_output_file(tmp_path, overwrite=True)


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="POSIX signals")
def test_ctrl_c_saves_and_exits_130_then_resumes(tiny_data, tmp_path):
    """The real command: Ctrl-C (SIGINT) mid-run saves a checkpoint and exits 130 with one hint line; the same
    command then finishes the run."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "leanmim", "pretrain", "--data", str(tiny_data), "--out", str(out),
               "--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
               "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2", "--precision", "32",
               "--no-progress-bar", "--accelerator", "cpu", "--batch-size", "8", "--epochs", "200",
               "--checkpoint-every-steps", "1", "--keep-checkpoints", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert last.exists(), process.communicate()[1][-2000:]
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=240)
    assert process.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("leanmim")]
    assert len(lines) == 1 and lines[0].startswith("leanmim: interrupted by SIGINT: checkpoint saved at step ")
    assert "Traceback" not in err
    step = int(lines[0].split("at step ")[1].split()[0])
    assert torch.load(last, weights_only=True)["global_step"] == step > 0


class RecordBatches(L.Callback):
    def __init__(self):
        self.sums: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.sums.setdefault(trainer.current_epoch, []).append(float(batch.float().sum()))


def test_each_epoch_draws_a_new_order(tiny_data, tmp_path, single_thread):
    """Lightning sets the epoch on ``batch_sampler.sampler``; without that hook every epoch repeated epoch 0."""
    record = RecordBatches()
    pretrain(tiny_run_config(tiny_data, tmp_path / "run", epochs=2), callbacks=[record])
    assert len(record.sums[0]) == len(record.sums[1]) == 4
    assert record.sums[0] != record.sums[1]
    assert sum(record.sums[0]) == pytest.approx(sum(record.sums[1]))  # the same images, in another order


def test_finetune_output_directory_has_one_identity(tiny_data, tmp_path, single_thread):
    """A fine-tuning rerun on other data or with other settings refuses instead of continuing the old one."""
    from leanmim import api

    run = tmp_path / "run"
    pretrain(tiny_run_config(tiny_data, run, max_steps=2))
    settings = dict(epochs=1, batch_size=16, precision="32", progress_bar=False, accelerator="cpu")
    first = api.finetune(run, **settings)
    out = Path(first["out"])
    assert strict_json(out / RUN_FILE)["kind"] == "finetune"
    before = files_state(out)
    other = tmp_path / "other-data"
    shutil.copytree(tiny_data, other)
    (other / "README").write_text("another dataset")
    with pytest.raises(ConfigError, match=r"data\.fingerprint: 4 files, \w+ -> 5 files"):
        api.finetune(run, **{**settings, "data": str(other)})
    with pytest.raises(ConfigError, match=r"seed: 0 -> 3"):
        api.finetune(run, **{**settings, "seed": 3})
    with pytest.raises(ConfigError, match="add --extend"):
        api.finetune(run, **{**settings, "epochs": 2})
    assert files_state(out) == before
