"""The training engine end to end on a tiny model: learning, resumption, NaN guard, DDP, checkpoints."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import assert_same_training_state, tiny_run_config
from leanmim.weights import load_run, read_checkpoint
from leanmim.config import ConfigError
from leanmim.data.sampler import GlobalBatchSampler
from leanmim.train.optim import warmup_cosine
from leanmim.train.pretrain import pretrain
from leanmim.train.trainer import NonFiniteLossError, TrainingInterrupted, align_loops


class StopAfterEpoch(L.Callback):
    """Simulates an interrupted run: stops at the end of the epoch that reaches ``steps``."""

    def __init__(self, steps):
        self.steps = steps

    def on_train_epoch_end(self, trainer, module):
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def read_losses(run_dir: Path) -> list[float]:
    rows = csv.DictReader(open(next(run_dir.glob("logs/metrics.csv"))))
    return [float(r["loss_step"]) for r in rows if r.get("loss_step")]


def test_short_run_lowers_loss_and_writes_run_directory(tiny_data, tmp_path):
    summary = pretrain(tiny_run_config(tiny_data, tmp_path / "run", epochs=6))
    losses = read_losses(tmp_path / "run")
    assert summary["global_step"] == 24 and len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    run = tmp_path / "run"
    for name in ("config.yaml", "summary.json", "checkpoints/last.ckpt", "checkpoints/epoch005.ckpt"):
        assert (run / name).is_file(), name
    assert list(run.glob("tensorboard/**/events.out.tfevents.*"))
    # the checkpoint holds the full model (encoder and decoder) and loads with weights_only=True
    checkpoint = read_checkpoint(run)
    assert any(k.startswith("method.decoder.") for k in checkpoint["state_dict"])
    assert any(k.startswith("method.encoder.blocks.") for k in checkpoint["state_dict"])
    assert not list(run.glob("checkpoints/*.tmp"))


def test_resumed_run_equals_uninterrupted_run(tiny_data, tmp_path):
    pretrain(tiny_run_config(tiny_data, tmp_path / "whole", epochs=4))
    pretrain(tiny_run_config(tiny_data, tmp_path / "split", epochs=4), callbacks=[StopAfterEpoch(8)])
    assert load_run(tmp_path / "split").global_step == 8
    summary = pretrain(tiny_run_config(tiny_data, tmp_path / "split", epochs=4))
    assert summary["resumed_from"] and summary["global_step"] == 16
    whole = load_run(tmp_path / "whole").method.state_dict()
    split = load_run(tmp_path / "split").method.state_dict()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key


class TermAt(L.Callback):
    """SIGTERM at the end of step ``step``; the run stops (and saves ``last.ckpt``) at the end of the next step."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_stop_on_an_epochs_last_batch_resumes_exactly(tiny_data, tmp_path, single_thread):
    """A stop during an epoch's last batch saves ``last.ckpt`` after that batch, before the epoch's end (Lightning's
    counters: "epoch 0 in progress, its last batch trained"); a ``--max-steps`` run with drop path resumed from it
    starts epoch 1 at its first batch and ends equal to an uninterrupted one, optimizer state included."""
    def config(out):
        run = tiny_run_config(tiny_data, out, max_steps=8)
        run.model.drop_path = 0.2
        return run

    pretrain(config(tmp_path / "whole"))
    with pytest.raises(TrainingInterrupted):
        pretrain(config(tmp_path / "split"), callbacks=[TermAt(3)])
    stopped = read_checkpoint(tmp_path / "split" / "checkpoints" / "last.ckpt")
    assert stopped["global_step"] == 4 and stopped["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 0
    assert pretrain(config(tmp_path / "split"))["global_step"] == 8
    assert_same_training_state(*(tmp_path / run / "checkpoints" / "last.ckpt" for run in ("whole", "split")))


def test_accumulation_over_a_partial_last_group_counts_lightnings_steps_and_resumes_exactly(tiny_data, tmp_path,
                                                                                           single_thread):
    """4 batches an epoch accumulated by 3: Lightning steps after batches 3 and 4 (the epoch ends with a step), so an
    epoch is 2 optimizer steps and 3 epochs 6 — the schedule's length too. Stopped mid-epoch 1 (step 3) and resumed,
    the run ends as an uninterrupted one."""
    def config(out):
        run = tiny_run_config(tiny_data, out, epochs=3, accumulate_grad_batches=3)
        run.model.drop_path = 0.2
        return run

    whole = pretrain(config(tmp_path / "whole"))
    assert whole["global_step"] == 6 and whole["total_steps"] == 6
    with pytest.raises(TrainingInterrupted):
        pretrain(config(tmp_path / "split"), callbacks=[TermAt(2)])
    assert read_checkpoint(tmp_path / "split" / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert pretrain(config(tmp_path / "split"))["global_step"] == 6
    assert_same_training_state(*(tmp_path / run / "checkpoints" / "last.ckpt" for run in ("whole", "split")))


def test_align_loops_reads_every_boundary_checkpoint_as_the_next_epochs_start():
    """Lightning's counters as it writes them at an epoch's end and after an epoch's last batch (a stop, before the
    end) become one state, "epoch 2 done, 3 not started"; mid-epoch ones read "batch k of the epoch trained"."""
    def written(step, epochs, epochs_processed, batches_total, batches_current, lag):
        def counters(value, completed):
            return {"ready": value, "started": value, "processed": value, "completed": completed}
        epoch = counters(epochs, epochs_processed - (not lag))
        epoch["processed"] = epochs_processed
        steps = {"total": {"ready": step, "completed": step}, "current": {"ready": batches_current} | {"completed": batches_current}}
        return {"global_step": step, "epoch": epochs_processed, "loops": {"fit_loop": {
            "epoch_progress": {"total": dict(epoch), "current": dict(epoch)},
            "epoch_loop.state_dict": {"_batches_that_stepped": step - lag},
            "epoch_loop.batch_progress": {"total": counters(batches_total, batches_total - lag),
                                          "current": counters(batches_current, batches_current - lag),
                                          "is_last_batch": batches_current == 4},
            "epoch_loop.scheduler_progress": json.loads(json.dumps(steps)),
            "epoch_loop.automatic_optimization.optim_progress": {"optimizer": {"step": json.loads(json.dumps(steps))}},
            "epoch_loop.val_loop.batch_progress": {"total": counters(0, 0), "current": counters(0, 0),
                                                   "is_last_batch": False}}}}

    at_epoch_end = written(8, epochs=2, epochs_processed=2, batches_total=8, batches_current=4, lag=0)
    after_last_batch = written(8, epochs=2, epochs_processed=1, batches_total=8, batches_current=4, lag=1)
    for checkpoint in (at_epoch_end, after_last_batch):
        assert align_loops(checkpoint, batches_per_epoch=4, accumulate=1) == (2, 0)
    assert at_epoch_end == after_last_batch
    fit = at_epoch_end["loops"]["fit_loop"]
    assert fit["epoch_progress"]["current"] == {"ready": 2, "started": 2, "processed": 2, "completed": 2}
    assert fit["epoch_loop.batch_progress"]["current"]["ready"] == 0 and fit["epoch_loop.batch_progress"]["total"]["ready"] == 8
    mid_epoch = written(6, epochs=2, epochs_processed=1, batches_total=6, batches_current=2, lag=1)
    as_lightning_wrote_it = json.loads(json.dumps(mid_epoch))
    assert align_loops(mid_epoch, batches_per_epoch=4, accumulate=1) == (1, 2)
    assert mid_epoch == as_lightning_wrote_it


def test_resuming_with_another_model_is_refused(tiny_data, tmp_path):
    pretrain(tiny_run_config(tiny_data, tmp_path / "run", max_steps=1))
    config = tiny_run_config(tiny_data, tmp_path / "run", max_steps=2)
    config.model.depth = 3
    with pytest.raises(ConfigError, match=r"holds a different pretrain run \(model.depth: 2 -> 3; train.max_steps: 1 -> 2\)"):
        pretrain(config)
    with pytest.raises(ConfigError, match="belongs to method 'mae', not 'pcae'"):
        load_run(tmp_path / "run", expect_method="pcae")


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    pretrain(tiny_run_config(tiny_data, run, epochs=1))
    before = (run / "checkpoints/last.ckpt").read_bytes()
    from leanmim.methods.mae import MAE
    original = MAE.forward

    def poisoned(self, images, progress=0.0, rng=None):
        output = original(self, images, progress, rng)
        output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(MAE, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 4"):
        pretrain(tiny_run_config(tiny_data, run, epochs=2, extend=True))
    assert (run / "checkpoints/last.ckpt").read_bytes() == before


def test_global_batch_sampler_splits_global_batches_between_processes():
    whole = list(GlobalBatchSampler(40, 8, seed=3))
    ranks = [list(GlobalBatchSampler(40, 4, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == whole
    sampler = GlobalBatchSampler(40, 8, seed=3)
    sampler.set_epoch(1)
    assert list(sampler) != whole and sorted(sum(list(sampler), [])) == sorted(sum(whole, []))


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_ddp_two_processes_match_one_process(tiny_data, tmp_path):
    """2 gloo processes × 16 images give the same losses and weights as 1 process × 32 images, with the default
    augmentation on: each image's crop and flip follow its position in the global batch, as the masking does."""
    common = ["--data", str(tiny_data), "--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2",
              "--num-heads", "2", "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2",
              "--augment", "--precision", "32", "--max-steps", "3", "--lr", "1e-3", "--no-progress-bar",
              "--accelerator", "cpu", "--log-every-steps", "1"]
    leanmim = [sys.executable, "-m", "leanmim", "pretrain"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(leanmim + common + ["--out", str(tmp_path / "one"), "--batch-size", "32"], check=True, env=env,
                   capture_output=True)
    subprocess.run(leanmim + common + ["--out", str(tmp_path / "two"), "--batch-size", "16", "--devices", "2",
                                       "--strategy", "ddp"], check=True, env=env, capture_output=True)
    one, two = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert one == pytest.approx(two, rel=1e-5)
    first, second = load_run(tmp_path / "one").method.state_dict(), load_run(tmp_path / "two").method.state_dict()
    for key in first:
        # The key part of qkv.bias has an exactly-zero true gradient (softmax ignores a per-query constant);
        # Adam turns its float noise into steps of size ~lr, so it is only equal to within lr × steps.
        tolerance = 3e-3 if key.endswith("qkv.bias") else 1e-5
        assert torch.allclose(first[key], second[key], atol=tolerance), key
