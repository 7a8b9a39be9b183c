"""Pretraining: a Lightning module around a method, its data module, and the ``pretrain`` entry point.

leanmim adds to Lightning: the MAE optimiser recipe, a data order and per-step randomness that survive resumption
and do not depend on the number of processes, and a NaN/inf guard. What both tasks share is in
:mod:`leanmim.train.trainer`, :mod:`leanmim.train.run` and :mod:`leanmim.train.optim`.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from .. import __version__
from ..config import ConfigError, RunConfig, as_user_meant
from ..data import MIMData, ShardSource, build_pretrain_data, default_channels, default_img_size
from ..data.common import worker_start_method
from ..data.sampler import GlobalBatchSampler
from ..files import CHECKPOINT_DIR, RUN_FILE, read_json_object, remove_stale_temporaries
from ..methods import build_method, build_options
from ..methods.base import options_to_dict
from ..parts.encoder import training_attention
from ..parts.tokens import BatchRandom
from ..weights import (check_init_from, checkpoint_step, init_method_from, load_line, loaded_parts, newest_checkpoint,
                       read_checkpoint, read_weights)
from .console import emit, pretrain_summary_rows, quiet, start_summary
from .lock import RunLock, is_launcher_rank_zero
from .optim import adamw_warmup_cosine, parameter_groups
from .precision import lightning_precision, pin_memory
from .run import check_run_directory, data_fingerprint, has_checkpoint, identity_of, write_run_file, write_summary
from .trainer import FiniteLossGuard, ThroughputSummary, align_loops, build_trainer, fitting, session_record


def resolve_config(config: RunConfig) -> RunConfig:
    """Fill model geometry from the data, validate the method options, pick the run directory."""
    config.train.validate()
    config.data.validate()
    model = config.model.resolved(default_img_size(config.data.path), default_channels(config.data.path),
                                  method=config.method)
    options = options_to_dict(build_options(config.method, config.options))
    train = config.train
    out = train.out if train.out is not None else f"runs/{config.method}-{model.name}"
    # stored absolute in config.yaml (the data path as the user meant it, the run directory resolved), so that
    # --config RUN/config.yaml resumes that run from any directory instead of starting one beside the caller
    train = dataclasses.replace(train, out=os.path.abspath(os.path.expanduser(out)))
    data = dataclasses.replace(config.data, path=as_user_meant(config.data.path))
    return RunConfig(config.method, model, data, train, options)


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
        self.finite_loss = FiniteLossGuard(
            f"These settings are part of the run's identity, so start a new run from it: the same command with "
            f"another --out, a lower --base-lr or a --grad-clip, and --init-from {config.train.out}/checkpoints/last.ckpt")
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches of it trained), set when a checkpoint is loaded

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
        self.finite_loss.update(output.loss, self.global_step, self.current_epoch, self.config.train.log_every_steps)
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
        # global_step is still k here (the step just taken): progress k/K, what this step's forward saw (the released
        # EMA schedules index their momentum by the step from 0)
        self.method.after_optimizer_step(min(1.0, self.global_step / max(1, self.total_steps)))

    def configure_optimizers(self):
        train = self.config.train
        return adamw_warmup_cosine(parameter_groups(self.method, train.weight_decay), self.learning_rate(),
                                   (train.beta1, train.beta2), train.warmup_fraction, self.total_steps, train.min_lr)

    def learning_rate(self) -> float:
        train = self.config.train
        if train.lr is not None:
            return train.lr
        world = self.trainer.world_size if self._trainer else 1
        return train.base_lr * train.batch_size * train.accumulate_grad_batches * world / 256

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.finite_loss.check(self.global_step, self.current_epoch)   # raising here writes nothing
        # total_steps: the schedule's length, so that a probe or fine-tune can tell a finished pretraining from a stopped one
        checkpoint["leanmim"] = {"version": __version__, "config": self.config.to_dict(), "total_steps": self.total_steps}
        if getattr(self, "run_identity", None) is not None:  # the run's identity survives a deleted run.json
            checkpoint["leanmim"]["identity"] = self.run_identity

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the data skip the batches already trained (resume_at) and Lightning's counters say the same; drop path and
        # dropout draws are seeded per batch (trainer.SeedEachBatch), so nothing of the global generator is restored
        self.resume_at = align_loops(checkpoint, self.batches_per_epoch, self.config.train.accumulate_grad_batches)


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
                          persistent_workers=workers > 0, multiprocessing_context=worker_start_method(workers),
                          pin_memory=pin_memory(self.trainer))


def pretrain_identity(config: RunConfig, world_size: int, data_fingerprint_text: str | None) -> dict[str, Any]:
    """What defines a pretraining run (see :mod:`leanmim.train.run`): every non-operational setting, the data's
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
        initial_weights = read_weights(config.train.init_from)
        check_init_from(config.method, config.model, config.options, initial_weights)
    data = build_pretrain_data(config.data.path, config.model.img_size, config.model.in_chans,
                               crop_min_scale=config.data.crop_min_scale, hflip=config.data.hflip,
                               max_memory_bytes=int(config.data.max_memory_gb * (1 << 30)),
                               augment=config.data.augment, samples_per_epoch=config.data.samples_per_epoch,
                               shuffle_buffer=config.data.shuffle_buffer)
    per_process = config.train.batch_size * trainer.world_size
    batches_per_epoch = len(data.dataset) // per_process
    # Lightning ends every epoch with an optimizer step, also after a partial accumulation (optim.resume_position)
    optimizer_steps_per_epoch = max(1, -(-batches_per_epoch // config.train.accumulate_grad_batches))
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
        stored = read_json_object(summary_path)
        return {**stored, "run_dir": str(run_dir), "already_finished": True}

    # the method is built (and its options checked against the geometry) before anything is recorded: a refused
    # start leaves the directory as it was; building it consumes no random draw that writing would change
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    module = PretrainModule(config, data.batch_transform)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        if record is None or record.get("legacy") or record.get("identity") != identity:  # new, legacy, --extend
            write_run_file(run_dir, "pretrain", identity,
                           {"data_path": str(Path(config.data.path).expanduser().resolve())
                            if Path(config.data.path).expanduser().exists() else config.data.path,
                            "world_size": trainer.world_size, "batch_size_per_process": config.train.batch_size})
        config.save_yaml(run_dir / "config.yaml")  # atomic; rewritten when damaged (only if its text differs)
    if initial_weights is not None:
        notes = init_method_from(module.method, initial_weights)
        warnings.warn(load_line(initial_weights, loaded_parts(module.method, initial_weights), notes))
    if config.train.compile:
        module.method = torch.compile(module.method)
    module.batches_per_epoch = batches_per_epoch
    module.total_steps = total_steps
    module.run_identity = identity

    if trainer.is_global_zero:
        emit(start_summary(pretrain_summary_rows(config, module.method, data, trainer, optimizer_steps_per_epoch,
                                                 total_steps, resume_from,
                                                 checkpoint_step(resume_from) if resume_from else None),
                           title=f"pretraining (leanmim {__version__})"))
    started = time.perf_counter()
    # leanmim resumes mid-epoch itself (GlobalBatchSampler.resume_at), so Lightning's warning does not apply
    with fitting(trainer, resume_from, ".*resuming from a checkpoint that ended before the epoch ended.*"):
        trainer.fit(module, datamodule=PretrainData(data, config), ckpt_path=resume_from, weights_only=True)
    loss = trainer.callback_metrics.get("loss_epoch")
    summary = {
        "method": config.method, "model": config.model.name, "run_dir": str(run_dir),
        **session_record(trainer, resume_from, started), "total_steps": module.total_steps,
        "images_per_second": round(throughput.images / throughput.seconds, 1) if throughput.seconds else None,
        "final_loss": float(loss) if loss is not None else None,
        "precision": lightning_precision(config), "world_size": trainer.world_size,
        "dataset": {"name": data.name, "images": data.num_images, "mean": list(data.mean), "std": list(data.std), "skipped_files": len(data.skipped_files),
                    "skipped_examples": data.skipped_files[:20]},
    }
    if trainer.is_global_zero:
        write_summary(run_dir, summary)
    return summary
