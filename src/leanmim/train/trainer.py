"""The training core both tasks run on: :func:`build_trainer` (Lightning Trainer with leanmim's precision, devices,
loggers and callbacks), the atomic checkpoint writer and schedule, and the signal handling that saves and stops.

Lightning owns the loop, precision, devices (DDP/FSDP via torchrun or SLURM), checkpoints and logging.
"""

from __future__ import annotations

import os
import signal
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..config import RunConfig
from ..data.common import mix_seed
from ..files import CHECKPOINT_DIR, LAST_CHECKPOINT, temporary_path
from ..weights import checkpoint_step
from .console import RunProgress
from .loggers import build_loggers, continue_logs
from .messages import report_peer_lost
from .optim import resume_position
from .precision import lightning_precision


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class FiniteLossGuard:
    """Stops a run whose loss became NaN or infinite, before any checkpoint holds it, without a host synchronisation
    per step on a GPU: the "all finite" flag stays on the device and is read every step on a CPU (free), on logging
    steps on a GPU, and before every checkpoint write (``check`` raising there writes nothing)."""

    def __init__(self, advice: str):
        self.advice = advice                  # what the user can do (the task's settings are part of its identity)
        self.all_finite: torch.Tensor | None = None
        self.unchecked_since = 0              # the first step since the last check

    def update(self, loss: torch.Tensor, step: int, epoch: int, log_every: int) -> None:
        finite = torch.isfinite(loss.detach())
        if self.all_finite is None:
            self.all_finite, self.unchecked_since = finite, step
        else:
            self.all_finite = self.all_finite & finite
        if finite.device.type == "cpu" or step % max(1, log_every) == 0:
            self.check(step, epoch)

    def check(self, step: int, epoch: int) -> None:
        if self.all_finite is not None and not bool(self.all_finite):
            when = f"at step {step}" if self.unchecked_since == step else \
                f"between steps {self.unchecked_since} and {step}"
            raise NonFiniteLossError(f"the loss became NaN or infinite {when} (epoch {epoch}); the last good "
                                     f"checkpoint is untouched. {self.advice}")
        self.all_finite = None


class TrainingInterrupted(Exception):
    """Training stopped on a signal (Ctrl-C, SIGTERM, SIGUSR1) after saving a checkpoint at the current step."""

    def __init__(self, signum: int, step: int, checkpoint: str | None, at_once: bool = False):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        if at_once:
            super().__init__(f"interrupted by a second {name}: stopped at once, nothing saved; rerun the same "
                             f"command to resume from the last checkpoint")
            return
        saved = f"checkpoint saved at step {step} ({checkpoint})" if checkpoint else "no step was completed"
        super().__init__(f"interrupted by {name}: {saved}; rerun the same command to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell convention: 130 for Ctrl-C, 143 for SIGTERM


class ThroughputSummary(Callback):
    """Counts images and wall time of the steps run in this process (for the run summary)."""

    def __init__(self):
        self.images, self.seconds, self.steps = 0, 0.0, 0
        self._start = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.steps >= 2:  # the first steps pay one-off costs (allocation, compilation)
            self.seconds += time.perf_counter() - self._start
            self.images += len(batch[0] if isinstance(batch, list) else batch) * trainer.world_size  # list: whole images
        self.steps += 1


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made crash-safe: each checkpoint goes to a hidden temporary file beside
    its target (``.NAME.tmp-PID``, same directory, so never in the system temp directory), is fsynced, then
    renamed into place. A kill mid-write leaves the previous file intact; the next start removes the temporary."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint for a run directory: ``last.ckpt`` at every epoch end (a fine-tune's after its
    validation), then ``epochNNN.ckpt`` every ``every_n_epochs`` epochs (the newest ``keep`` kept, -1: all), plus
    ``last.ckpt`` every ``every_n_steps`` optimizer steps (a rolling resume point for exact mid-epoch resume).

    ``last.ckpt`` is written by leanmim, not by Lightning's ``save_last`` (which writes it only when a periodic
    checkpoint was written at that step: never with ``every_n_epochs`` 0 or ``keep`` 0), and before the periodic
    file, so that a kill between the two leaves the newest state in ``last.ckpt``.
    """

    def __init__(self, dirpath: Path, every_n_epochs: int = 1, keep: int = -1, every_n_steps: int = 0):
        periodic = every_n_epochs > 0 and keep != 0
        super().__init__(dirpath=dirpath, filename="epoch{epoch:03d}", auto_insert_metric_name=False, save_last=False,
                         every_n_epochs=every_n_epochs if periodic else None, save_top_k=-1 if periodic else 0,
                         enable_version_counter=False)
        self.keep, self.every_n_steps = keep, every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        epoch_ends = batch_idx + 1 >= trainer.num_training_batches or 0 < trainer.max_steps <= step
        if (self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and not epoch_ends
                and not trainer.fit_loop._should_accumulate()):   # at an epoch's end: written there in a moment
            save_resume_point(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_at_epoch_end(trainer)
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_at_epoch_end(trainer)
        super().on_validation_end(trainer, pl_module)

    def _save_last_at_epoch_end(self, trainer) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and not trainer.fast_dev_run:
            save_resume_point(trainer)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.keep > 0 and trainer.is_global_zero and Path(filepath).name != LAST_CHECKPOINT:
            periodic = sorted(Path(filepath).parent.glob("epoch*.ckpt"), key=lambda p: int("0" + p.stem[5:].split("-")[0]))
            for old in periodic[:-self.keep]:
                old.unlink(missing_ok=True)


def save_resume_point(trainer: L.Trainer) -> str | None:
    """Write ``last.ckpt`` at the current step (all processes call it; the global-zero one writes)."""
    callback = trainer.checkpoint_callback
    if callback is None or callback.dirpath is None or trainer.global_step == 0:
        return None
    path = os.path.join(callback.dirpath, LAST_CHECKPOINT)
    trainer.save_checkpoint(path, weights_only=False)  # a resume point: optimizer, schedule, loops, callbacks too
    return path


def align_loops(checkpoint: dict[str, Any], batches_per_epoch: int, accumulate: int) -> tuple[int, int]:
    """Where a run resumed from ``checkpoint`` stands — (epoch, batches of it already trained), from its step count
    alone (:func:`leanmim.train.optim.resume_position`) — and Lightning's loop counters in ``checkpoint`` rewritten to
    say the same, so that the data (which skips those batches itself) and Lightning's loops agree.

    Why: Lightning restores a checkpoint written at an epoch's end in two ways. An epoch-based run starts the next
    epoch; a ``max_steps`` run (and, before its counters are advanced, a shard stream asking for the epoch) treats the
    epoch as unfinished and trains one more batch labelled (epoch e, batch N) before restarting epoch e + 1 at batch 0.
    A ``last.ckpt`` written after an epoch's last batch but before its end is a third case. Here every checkpoint at an
    epoch boundary reads as "epoch e done, e + 1 not started", and every mid-epoch one as Lightning writes it after a
    training batch ("batch k of epoch e trained", :class:`RunCheckpoint`'s rolling resume point).
    """

    step = int(checkpoint.get("global_step", 0))
    epoch, batches = resume_position(step, batches_per_epoch, accumulate)
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not isinstance(fit, dict) or "epoch_progress" not in fit:   # not written by a Lightning fit: as it is
        return epoch, batches
    steps_in_epoch = batches // accumulate
    mid = batches > 0

    def counters(progress: dict[str, Any], total: int, current: int, current_completed: int | None = None) -> None:
        for part, value in (("total", total), ("current", current)):
            for key in progress.get(part, {}):
                progress[part][key] = value
        if current_completed is not None:  # written after a batch, before Lightning counts it completed
            progress["total"]["completed"] = total - 1
            progress["current"]["completed"] = current_completed

    counters(fit["epoch_progress"], epoch + mid, epoch + mid)
    if mid:  # epoch e started, not yet processed
        for part in ("total", "current"):
            fit["epoch_progress"][part].update(processed=epoch, completed=epoch)
    batch = fit.get("epoch_loop.batch_progress", {})
    counters(batch, epoch * batches_per_epoch + batches, batches, batches - 1 if mid else None)
    batch["is_last_batch"] = False
    counters(fit.get("epoch_loop.scheduler_progress", {}), step, steps_in_epoch)
    optimizer = fit.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {})
    for progress in optimizer.values():
        counters(progress, step, steps_in_epoch)
    validation = fit.get("epoch_loop.val_loop.batch_progress", {})
    counters(validation, 0, 0)
    validation["is_last_batch"] = False
    if isinstance(fit.get("epoch_loop.state_dict"), dict):   # logging steps; Lightning adds the one in progress
        fit["epoch_loop.state_dict"]["_batches_that_stepped"] = step - 1 if mid else step
    checkpoint["epoch"] = epoch
    return epoch, batches


class SeedEachBatch(Callback):
    """Seeds torch's global generator before every training batch from (seed, epoch, batch, rank): drop path,
    dropout and any other draw from it depend on where the batch stands, never on what ran before it in this
    process (a resumed run, a loader started at an epoch boundary), on the CPU and on the accelerator alike."""

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:

        torch.manual_seed(mix_seed(0x44524F50, self.seed, trainer.current_epoch, batch_idx, trainer.global_rank))  # "DROP"


class StopOnSignal(Callback):
    """Ctrl-C, SIGTERM and SIGUSR1 (SLURM's pre-emption warning, ``#SBATCH --signal=USR1@90``) stop training at the
    end of the current optimizer step: save ``last.ckpt`` there, then raise :class:`TrainingInterrupted`.
    A second Ctrl-C stops at once (Lightning's own shutdown). Under DDP any process's signal stops all of them.
    ``after_last_batch``: a signal that arrives after the last training batch (a fine-tune's last validation) still
    stops the run, before what follows the fit (its test evaluation); without it (pretraining) a run that has
    trained every step is finished and ends normally."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self, after_last_batch: bool = False):
        self.after_last_batch = after_last_batch
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:  # leanmim's line, not Lightning's exit(1)
            raise TrainingInterrupted(signum, 0, None, at_once=True)
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                if hasattr(signal, name):
                    number = getattr(signal, name)
                    self._previous[number] = signal.signal(number, self._handler)

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()
        if self.received is not None and self.after_last_batch:
            raise TrainingInterrupted(self.received, trainer.global_step, save_resume_point(trainer))

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
        if trainer.world_size > 1:   # before Lightning's teardown: the launcher's SIGTERM may follow at once
            report_peer_lost(exception)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and not trainer.fit_loop._should_accumulate():
            path = save_resume_point(trainer)
            flush_logs(trainer)
            raise TrainingInterrupted(self.received or signal.SIGTERM, trainer.global_step, path)


def flush_logs(trainer: L.Trainer) -> None:
    """Before stopping inside a step: log that step's metrics (Lightning logs them only after the batch-end hooks) and
    write what the loggers hold, so that the run's log ends at the step its resume point holds."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None and hasattr(connector, "update_train_step_metrics"):
        connector.update_train_step_metrics()
    for logger in trainer.loggers:
        logger.save()


def build_trainer(config: RunConfig, run_dir: Path, callbacks: Sequence[Callback] = (),
                  stop_after_last_batch: bool = False) -> L.Trainer:
    """The Lightning Trainer both tasks run on: precision, devices, loggers, atomic checkpoints, signal handling."""
    train = config.train
    checkpointing = RunCheckpoint(run_dir / CHECKPOINT_DIR, every_n_epochs=train.checkpoint_every_epochs,
                                  keep=train.keep_checkpoints, every_n_steps=train.checkpoint_every_steps)
    loggers = build_loggers(train.logger, run_dir)
    all_callbacks = [checkpointing, StopOnSignal(stop_after_last_batch), SeedEachBatch(train.seed), *callbacks]
    if train.progress_bar:  # leanmim's one line for the whole run (console.py), not Lightning's bar per epoch
        all_callbacks.append(RunProgress(every_steps=train.log_every_steps))
    devices: Any = int(train.devices) if str(train.devices).isdigit() else train.devices
    return L.Trainer(
        accelerator=train.accelerator, devices=devices, num_nodes=train.num_nodes, strategy=train.strategy,
        precision=lightning_precision(config), max_epochs=train.epochs if train.max_steps <= 0 else -1,
        max_steps=train.max_steps, accumulate_grad_batches=train.accumulate_grad_batches,
        gradient_clip_val=train.grad_clip, logger=loggers, callbacks=all_callbacks,
        log_every_n_steps=train.log_every_steps, enable_progress_bar=False,
        use_distributed_sampler=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=run_dir, plugins=[AtomicCheckpointIO()])


@contextmanager
def fitting(trainer: L.Trainer, resume_from: str | Path | None, *also_ignore: str) -> Iterator[None]:
    """Around ``trainer.fit`` (and what follows it in the same session): the run's CSV log continued from the
    resumed step (:class:`RunCSVLogger`), and none of Lightning's advice that does not apply: its "does not have many
    workers" hint (leanmim chooses workers per source) and, for each task, the messages in ``also_ignore`` (regular
    expressions), e.g. pretraining's mid-epoch resume warning (leanmim's sampler resumes mid-epoch itself).
    """
    continue_logs(trainer, (checkpoint_step(Path(resume_from)) or 0) if resume_from else 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        for message in also_ignore:
            warnings.filterwarnings("ignore", message=message)
        yield


def session_record(trainer: L.Trainer, resume_from: str | Path | None, started: float) -> dict[str, Any]:
    """What both tasks report about this session: where it resumed from, where it stands, how long it trained."""
    return {"resumed_from": str(resume_from) if resume_from else None, "global_step": trainer.global_step,
            "epochs_completed": trainer.current_epoch,
            "train_seconds_this_session": round(time.perf_counter() - started, 1)}
