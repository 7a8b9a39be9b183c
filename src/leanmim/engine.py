"""The training engine: a Lightning module around a method, and the ``pretrain`` entry point.

Lightning owns the loop, precision, devices (DDP/FSDP via torchrun or SLURM), checkpoints and
logging. leanmim adds: the MAE optimiser recipe, a data order and per-step randomness that
survive resumption and do not depend on the number of processes, and a NaN/inf guard.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from . import __version__
from .checkpoint import CHECKPOINT_DIR, LAST_CHECKPOINT, checkpoint_step, newest_checkpoint, read_checkpoint
from .config import ConfigError, RunConfig, as_user_meant
from .encoder import training_attention
from .console import quiet
from .data import MIMData, ShardSource, build_pretrain_data, default_channels, default_img_size
from .data.common import worker_start_method
from .data.sampler import GlobalBatchSampler
from .methods import MIMMethod, build_method, build_options
from .methods.base import options_to_dict
from .run import (RUN_FILE, RunLock, is_launcher_rank_zero, atomic_write_text, check_run_directory, data_fingerprint, dumps_strict, has_checkpoint,
                  identity_of,
                  remove_stale_temporaries, temporary_path, write_run_file)
from .tokens import BatchRandom


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


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


def bf16_supported(accelerator: str = "auto") -> bool:
    """bf16 autocast pays off on CUDA with bf16 support and on CPUs with native bf16 (AVX512-BF16/AMX)."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def lightning_precision(config: RunConfig) -> str:
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if bf16_supported(config.train.accelerator) else "32"
    return "bf16-mixed" if precision == "bf16" else "32-true"


def resolve_config(config: RunConfig) -> RunConfig:
    """Fill model geometry from the data, validate the method options, pick the run directory."""
    config.train.validate()
    config.data.validate()
    model = config.model.resolved(default_img_size(config.data.path), default_channels(config.data.path))
    options = options_to_dict(build_options(config.method, config.options))
    train = config.train
    if train.out is None:
        train = type(train)(**{**train.__dict__, "out": f"runs/{config.method}-{model.name}"})
    # stored absolute in config.yaml, so that --config RUN/config.yaml works from any directory
    data = dataclasses.replace(config.data, path=as_user_meant(config.data.path))
    return RunConfig(config.method, model, data, train, options)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup from 0, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def parameter_groups(method: MIMMethod, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms, tokens and position embeddings (1-D or token params)."""
    decay, no_decay = [], []
    for name, parameter in method.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or "token" in name or "pos_embed" in name or "relative" in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class PretrainModule(L.LightningModule):
    """Wraps a method: applies the batch augmentation, calls the method, logs, schedules."""

    def __init__(self, config: RunConfig, batch_transform: torch.nn.Module | None = None):
        super().__init__()
        self.config = config
        self.method = build_method(config.method, config.model, config.options)
        self.batch_transform = batch_transform
        self.total_steps = 1          # set by pretrain() once the data size is known
        self.batches_per_epoch = 1
        self._last_step_time: float | None = None
        self.resume_at: tuple[int, int] | None = None  # set when a checkpoint is loaded
        self._pending_rng_state: torch.Tensor | None = None

    def forward_method(self, images: torch.Tensor, micro_step: int):
        train = self.config.train
        rank, world = self.global_rank, self.trainer.world_size if self._trainer else 1
        if self.batch_transform is not None:  # the same generator on every process: each image's draws follow its
            generator = torch.Generator().manual_seed(train.seed * 1_000_003 + micro_step * 7 + 1)  # global position
            images = self.batch_transform(images, generator=generator, rank=rank, world_size=world)
        progress = min(1.0, self.global_step / max(1, self.total_steps))
        with training_attention(self.method, images.device):
            return self.method(images, progress=progress, rng=BatchRandom(train.seed, micro_step, rank, world))

    def training_step(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        micro_step = self.current_epoch * self.batches_per_epoch + batch_idx
        output = self.forward_method(images, micro_step)
        if not torch.isfinite(output.loss):
            raise NonFiniteLossError(
                f"loss became {output.loss.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                f"the last good checkpoint is untouched. These settings are part of the run's identity, so start a new "
                f"run from it: the same command with another --out, a lower --base-lr or a --grad-clip, and "
                f"--init-from {self.config.train.out}/checkpoints/last.ckpt")
        now = time.perf_counter()
        if self._last_step_time is not None:
            count = len(images[0] if isinstance(images, list) else images)  # a list: whole images and their sizes
            self.log("img_per_s", count * self.trainer.world_size / (now - self._last_step_time),
                     prog_bar=True, on_step=True, on_epoch=False)
        self._last_step_time = now
        self.log("loss", output.loss.detach(), prog_bar=True, on_step=True, on_epoch=True,
                 sync_dist=self.trainer.world_size > 1)  # the global mean, as one process would see it
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=True, on_step=True, on_epoch=False)
        for name, value in output.logs.items():
            self.log(name, value, on_step=True, on_epoch=False)
        return output.loss

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.method.after_optimizer_step(min(1.0, (self.global_step + 1) / max(1, self.total_steps)))

    def configure_optimizers(self):
        train = self.config.train
        optimizer = torch.optim.AdamW(parameter_groups(self.method, train.weight_decay), lr=self.learning_rate(),
                                      betas=(train.beta1, train.beta2))
        warmup = int(train.warmup_fraction * self.total_steps)
        min_ratio = train.min_lr / self.learning_rate() if self.learning_rate() > 0 else 0.0
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, self.total_steps, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def learning_rate(self) -> float:
        train = self.config.train
        if train.lr is not None:
            return train.lr
        world = self.trainer.world_size if self._trainer else 1
        return train.base_lr * train.batch_size * train.accumulate_grad_batches * world / 256

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # total_steps: the schedule's length, so that a probe or fine-tune can tell a finished pretraining from a stopped one
        checkpoint["leanmim"] = {"version": __version__, "config": self.config.to_dict(), "total_steps": self.total_steps}
        if getattr(self, "run_identity", None) is not None:  # the run's identity survives a deleted run.json
            checkpoint["leanmim"]["identity"] = self.run_identity
        checkpoint["leanmim_rng"] = {"torch": torch.get_rng_state()}  # drop path / dropout draws continue exactly

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.resume_at = resume_position(int(checkpoint.get("global_step", 0)), self.batches_per_epoch,
                                         self.config.train.accumulate_grad_batches)
        rng = checkpoint.get("leanmim_rng")
        if isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor):
            self._pending_rng_state = rng["torch"]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restored here, not on load: making the data iterator draws from the global generator in between
        if self._pending_rng_state is not None:
            torch.set_rng_state(self._pending_rng_state)
            self._pending_rng_state = None


def resume_position(global_step: int, batches_per_epoch: int, accumulate: int) -> tuple[int, int]:
    """(epoch, batches of it already trained) after ``global_step`` optimizer steps; (epoch, 0) at a boundary.

    Derived from the step count alone (checkpoints are only written after an optimizer step), with Lightning's
    convention that an epoch ends with a step even when its batches are not a multiple of ``accumulate``.
    """
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / accumulate))
    epoch, steps_into_epoch = divmod(global_step, steps_per_epoch)
    return epoch, steps_into_epoch * accumulate


class PretrainData(L.LightningDataModule):
    """Serves the pretraining images with a :class:`GlobalBatchSampler` for this process."""

    def __init__(self, data: MIMData, config: RunConfig):
        super().__init__()
        self.data, self.config = data, config

    def train_dataloader(self) -> DataLoader:
        train = self.config.train
        if isinstance(self.data.dataset, ShardSource):  # streamed shards: split per rank and worker by the stream
            return self.data.dataset.loader(train.batch_size, train.seed, self.trainer.global_rank,
                                            self.trainer.world_size, self.config.data.num_workers,
                                            epoch=lambda: self.trainer.current_epoch,
                                            resume_at=getattr(self.trainer.lightning_module, "resume_at", None))
        sampler = GlobalBatchSampler(len(self.data.dataset), train.batch_size, train.seed,
                                     self.trainer.global_rank, self.trainer.world_size)
        sampler.resume_at = getattr(self.trainer.lightning_module, "resume_at", None)
        if sampler.resume_at is not None:  # the first iterator is made before Lightning sets the epoch
            sampler.set_epoch(sampler.resume_at[0])
        workers = 0 if self.data.in_memory else self.config.data.num_workers
        return DataLoader(self.data.dataset, batch_sampler=sampler, num_workers=workers,
                          persistent_workers=workers > 0, multiprocessing_context=worker_start_method(workers))


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
    """Lightning's ModelCheckpoint for a run directory: ``epochNNN.ckpt`` every ``every_n_epochs`` epochs (the
    newest ``keep`` kept, -1: all) and ``last.ckpt`` at every epoch end, plus every ``every_n_steps`` optimizer
    steps (a rolling resume point for exact mid-epoch resume)."""

    def __init__(self, dirpath: Path, every_n_epochs: int = 1, keep: int = -1, every_n_steps: int = 0):
        periodic = every_n_epochs > 0 and keep != 0
        super().__init__(dirpath=dirpath, filename="epoch{epoch:03d}", auto_insert_metric_name=False, save_last=True,
                         every_n_epochs=every_n_epochs if periodic else None, save_top_k=-1 if periodic else 0,
                         enable_version_counter=False)
        self.keep, self.every_n_steps = keep, every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and not trainer.fit_loop._should_accumulate():
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
    trainer.save_checkpoint(path)
    return path


class StopOnSignal(Callback):
    """Ctrl-C, SIGTERM and SIGUSR1 (SLURM's pre-emption warning, ``#SBATCH --signal=USR1@90``) stop training at the
    end of the current optimizer step: save ``last.ckpt`` there, then raise :class:`TrainingInterrupted`.
    A second Ctrl-C stops at once (Lightning's own shutdown). Under DDP any process's signal stops all of them."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self):
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
        # arrived after the last training batch (a fine-tune's last validation): stop before its test evaluation;
        # a pretraining that has trained every step is finished and ends normally
        if self.received is not None and not isinstance(pl_module, PretrainModule):
            raise TrainingInterrupted(self.received, trainer.global_step, save_resume_point(trainer))

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and not trainer.fit_loop._should_accumulate():
            path = save_resume_point(trainer)
            raise TrainingInterrupted(self.received or signal.SIGTERM, trainer.global_step, path)


LOGGER_EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}


def build_loggers(names: str, run_dir: Path) -> list:
    """Lightning's own loggers by name: csv (RUN_DIR/logs), tensorboard (RUN_DIR/tensorboard), wandb (offline in
    RUN_DIR/wandb unless WANDB_MODE=online), mlflow (a local store RUN_DIR/mlruns unless MLFLOW_TRACKING_URI is set)."""
    import importlib.util

    chosen = [name.strip().lower() for name in str(names).split(",") if name.strip()]
    unknown = [name for name in chosen if name not in ("csv", "tensorboard", "wandb", "mlflow")]
    if unknown or not chosen:
        raise ConfigError(f"--logger: unknown logger '{', '.join(unknown) or names}': choose from csv, tensorboard, "
                          f"wandb, mlflow (comma-separated)")
    for name in chosen:
        if name in LOGGER_EXTRAS and importlib.util.find_spec(LOGGER_EXTRAS[name]) is None:
            raise ConfigError(f"--logger {name} needs the {LOGGER_EXTRAS[name]} package: pip install 'leanmim[{name}]'")
    loggers = []
    for name in dict.fromkeys(chosen):
        if name == "csv":
            # version "": one log per run (logs/metrics.csv), appended to by every resume instead of a new version_N
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            loggers.append(CSVLogger(run_dir, name="logs", version=""))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
        elif name == "wandb":
            from lightning.pytorch.loggers import WandbLogger
            loggers.append(WandbLogger(name=run_dir.name, save_dir=str(run_dir), project="leanmim",
                                       offline=os.environ.get("WANDB_MODE", "offline") != "online"))
        else:
            from lightning.pytorch.loggers import MLFlowLogger
            loggers.append(MLFlowLogger(experiment_name="leanmim", run_name=run_dir.name,
                                        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI",
                                                                    (run_dir / "mlruns").resolve().as_uri())))
    return [*loggers, ProgressLogger(run_dir)]


class ProgressLogger(Logger):
    """Keeps ``RUN_DIR/summary.json``'s ``progress`` entry current for ``leanmim status``: written when training
    starts, at every logging step (at most every 2 s) and at the end — process id and host, step, total steps,
    epoch, last loss, img/s, steps/s and the state (running, stopped, failed). Lightning hands each logger the
    module once at the start (``log_graph``), which gives the schedule's length. Global rank zero only."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir, self.module, self.progress = Path(run_dir), None, {}
        self._written_at = 0.0
        self._first: tuple[float, int] | None = None   # (time, step) of the first logged step of this session

    @property
    def name(self) -> str:
        return "progress"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_graph(self, model, input_array=None) -> None:
        import socket

        self.module = model
        self.progress = {"state": "running", "pid": os.getpid(), "host": socket.gethostname(),
                         "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._write(force=True)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = time.time()
        step = int(step if step is not None else 0) + 1   # Lightning logs step s for the (s + 1)-th optimizer step
        if self._first is None:
            self._first = (now, step)
        elif step > self._first[1]:
            self.progress["steps_per_second"] = round((step - self._first[1]) / (now - self._first[0]), 4)
        loss = metrics.get("loss_step", metrics.get("loss"))
        if loss is not None:
            self.progress["loss"] = float(loss)
        if metrics.get("img_per_s") is not None:
            self.progress["images_per_second"] = round(float(metrics["img_per_s"]), 1)
        self.progress["step"] = max(step, self.progress.get("step", 0))
        self._write()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.progress["state"] = "stopped" if status == "success" else status
        self._write(force=True)

    def _write(self, force: bool = False) -> None:
        if not force and time.time() - self._written_at < 2.0:
            return
        module = self.module
        if module is not None and getattr(module, "_trainer", None) is not None:
            self.progress.update(step=max(int(module.global_step), self.progress.get("step", 0)),
                                 epoch=int(module.current_epoch), total_steps=int(getattr(module, "total_steps", 0)))
        self.progress["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._written_at = time.time()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_summary(self.run_dir, {"progress": dict(self.progress)})


def build_trainer(config: RunConfig, run_dir: Path, callbacks: Sequence[Callback] = ()) -> L.Trainer:
    train = config.train
    checkpointing = RunCheckpoint(run_dir / CHECKPOINT_DIR, every_n_epochs=train.checkpoint_every_epochs,
                                  keep=train.keep_checkpoints, every_n_steps=train.checkpoint_every_steps)
    loggers = build_loggers(train.logger, run_dir)
    all_callbacks = [checkpointing, StopOnSignal(), *callbacks]
    if train.progress_bar:  # leanmim's one line for the whole run (console.py), not Lightning's bar per epoch
        from .console import RunProgress
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


def pretrain_identity(config: RunConfig, world_size: int, data_fingerprint_text: str | None) -> dict[str, Any]:
    """What defines a pretraining run (see :mod:`leanmim.run`): every non-operational setting, the data's
    fingerprint, the global batch and the resolved precision."""
    derived = {"train.global_batch_size": config.train.batch_size * world_size * config.train.accumulate_grad_batches,
               "train.precision": lightning_precision(config)}
    if data_fingerprint_text is not None:
        derived["data.fingerprint"] = data_fingerprint_text
    return identity_of(config.to_dict(), derived)


def legacy_identity(run_dir: Path, world_size: int) -> dict[str, Any] | None:
    """A run written before ``run.json`` existed: the identity its newest checkpoint's config implies."""
    if (run_dir / RUN_FILE).is_file():
        return None
    newest = newest_checkpoint(run_dir / CHECKPOINT_DIR, warn=False)
    if newest is None:
        return None
    entry = read_checkpoint(newest)["leanmim"]
    if isinstance(entry.get("identity"), dict):  # written with the identity (data fingerprint included)
        return entry["identity"]
    stored = RunConfig.from_dict(entry["config"], source=str(newest))
    return pretrain_identity(stored, world_size, None)


@quiet()  # leanmim's own lines only (console.py; --verbose shows the libraries' too)
def pretrain(config: RunConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Pretrain ``config.method``; resumes the run found in ``config.train.out`` when its identity matches.

    Returns the run summary (also written to ``RUN_DIR/summary.json``). A rerun of a finished run changes
    nothing and returns the stored summary. Raises :class:`TrainingInterrupted` after a signal (checkpoint saved).
    One writer per run directory: the launching process (global rank 0) holds ``RUN_DIR/.lock`` throughout.
    """
    config = resolve_config(config)
    lock = RunLock(config.train.out) if is_launcher_rank_zero() else None
    try:
        return _pretrain(config, callbacks, lock)
    except (ConfigError, ValueError):  # refused (DataError is a ValueError): leave even .lock as it was
        if lock is not None:
            lock.release_untouched()
        raise
    finally:
        if lock is not None:
            lock.release()


def _pretrain(config: RunConfig, callbacks: Sequence[Callback], lock: "RunLock | None") -> dict[str, Any]:
    run_dir = Path(config.train.out)
    throughput = ThroughputSummary()
    trainer = build_trainer(config, run_dir, [throughput, *callbacks])  # writes nothing yet
    identity = pretrain_identity(config, trainer.world_size, data_fingerprint(config.data.path, exclude=[run_dir]))
    record = None
    if trainer.is_global_zero:  # one process decides; under torchrun the others start at the same time
        record = check_run_directory(run_dir, "pretrain", identity, config.train.extend,
                                     legacy_identity(run_dir, trainer.world_size))
        remove_stale_temporaries(run_dir / CHECKPOINT_DIR)
    resume_from = newest_checkpoint(run_dir / CHECKPOINT_DIR)
    if resume_from is None and has_checkpoint(run_dir):  # never restart from step 0 over the user's checkpoints
        raise ConfigError(f"every checkpoint in '{run_dir / CHECKPOINT_DIR}' is unreadable (truncated or corrupt): "
                          f"nothing to resume from; restore one, or choose another --out for a new run")
    initial_weights = None
    if resume_from is None and config.train.init_from:  # a fresh run: read and check them before writing anything
        from .weights import check_init_from, read_weights
        initial_weights = read_weights(config.train.init_from)
        check_init_from(config.method, config.model, config.options, initial_weights)
    data = build_pretrain_data(config.data.path, config.model.img_size, config.model.in_chans,
                               crop_min_scale=config.data.crop_min_scale, hflip=config.data.hflip,
                               max_memory_bytes=int(config.data.max_memory_gb * (1 << 30)),
                               augment=config.data.augment, samples_per_epoch=config.data.samples_per_epoch,
                               shuffle_buffer=config.data.shuffle_buffer)
    per_process = config.train.batch_size * trainer.world_size
    batches_per_epoch = len(data.dataset) // per_process
    optimizer_steps_per_epoch = max(1, batches_per_epoch // config.train.accumulate_grad_batches)
    total_steps = (config.train.max_steps if config.train.max_steps > 0
                   else config.train.epochs * optimizer_steps_per_epoch)
    if batches_per_epoch == 0:  # checked before anything is recorded: the corrected command must not be "another run"
        raise ConfigError(f"the data has {len(data.dataset)} images per epoch, fewer than one global batch of "
                          f"{per_process}: lower --batch-size"
                          + (" or raise --samples-per-epoch" if isinstance(data.dataset, ShardSource) else ""))
    if resume_from is not None and (checkpoint_step(resume_from) or 0) >= total_steps:
        summary_path = run_dir / "summary.json"  # finished: change no file
        if lock is not None:
            lock.release_untouched()
        stored = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        return {**stored, "run_dir": str(run_dir), "already_finished": True}

    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        if record is None or record.get("legacy") or record.get("identity") != identity:  # new, legacy, --extend
            write_run_file(run_dir, "pretrain", identity,
                           {"data_path": str(Path(config.data.path).expanduser().resolve())
                            if Path(config.data.path).expanduser().exists() else config.data.path,
                            "world_size": trainer.world_size, "batch_size_per_process": config.train.batch_size})
        config.save_yaml(run_dir / "config.yaml")  # atomic; rewritten when damaged (only if its text differs)

    L.seed_everything(config.train.seed, workers=True, verbose=False)
    module = PretrainModule(config, data.batch_transform)
    if initial_weights is not None:
        from .weights import init_method_from, load_line, loaded_parts
        notes = init_method_from(module.method, initial_weights)
        warnings.warn(load_line(initial_weights, loaded_parts(module.method, initial_weights), notes))
    if config.train.compile:
        module.method = torch.compile(module.method)
    module.batches_per_epoch = batches_per_epoch
    module.total_steps = total_steps
    module.run_identity = identity

    if trainer.is_global_zero:
        from .console import emit, pretrain_summary_rows, start_summary
        emit(start_summary(pretrain_summary_rows(config, module.method, data, trainer, optimizer_steps_per_epoch,
                                                 total_steps, resume_from,
                                                 checkpoint_step(resume_from) if resume_from else None),
                           title=f"pretraining (leanmim {__version__})"))
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        # leanmim resumes mid-epoch itself (GlobalBatchSampler.resume_at), so Lightning's warning does not apply
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        trainer.fit(module, datamodule=PretrainData(data, config), ckpt_path=resume_from, weights_only=True)
    loss = trainer.callback_metrics.get("loss_epoch")
    summary = {
        "method": config.method, "model": config.model.name, "run_dir": str(run_dir),
        "resumed_from": str(resume_from) if resume_from else None,
        "global_step": trainer.global_step, "epochs_completed": trainer.current_epoch,
        "total_steps": module.total_steps, "train_seconds_this_session": round(time.perf_counter() - started, 1),
        "images_per_second": round(throughput.images / throughput.seconds, 1) if throughput.seconds else None,
        "final_loss": float(loss) if loss is not None else None,
        "precision": lightning_precision(config), "world_size": trainer.world_size,
        "dataset": {"name": data.name, "images": data.num_images, "mean": list(data.mean), "std": list(data.std), "skipped_files": len(data.skipped_files),
                    "skipped_examples": data.skipped_files[:20]},
    }
    if trainer.is_global_zero:
        write_summary(run_dir, summary)
    return summary


def write_summary(run_dir: Path, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into ``RUN_DIR/summary.json`` (written atomically)."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary.update(updates)
    atomic_write_text(path, dumps_strict(summary))
    return summary
