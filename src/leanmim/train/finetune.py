"""End-to-end fine-tuning of a pretrained encoder for classification, on Lightning, with selection on validation.

One batch, from image to loss::

    images (B, C, H, W) uint8
      ─ RandAugment / TrivialAugment, per image (optional, torchvision)          uint8 (B, C, H, W)
      ─ RandomResizedCrop + flip + normalize (BatchMIMAugment)                    (B, C, S, S) float
      ─ random erasing (optional, timm, per-pixel normal noise: any channel count)
      ─ mixup / cutmix (optional, timm): images and labels mixed with one drawn λ → soft targets (B, K)
      ─▶ encoder.forward_features          (B, 1 + L', D)   drop path in every block,
                                                              optional token compression (--token-drop)
      ─▶ head, by --pool:  mean  patch-token mean → fc_norm (LayerNorm) → Linear   (B, K)   (MAE; timm 'avg')
                           cls   final norm → cls token → Linear                  (B, K)   (timm 'token')
                           tokens final norm → patch tokens flattened (B, L·D) → Linear (B, K)  (keeps the layout)
      ─▶ cross-entropy (label smoothing), or soft-target cross-entropy under mixup/cutmix

Selection, honestly: a validation split is carved from the training split (seeded, stratified,
``--val-fraction``; or the folder's own ``DIR/val/``; :mod:`leanmim.data.splits`). After every epoch the
validation top-1 is measured; the first epoch with the highest one is *selected* and written to
``checkpoints/best.ckpt``. Once training has finished, the test split is evaluated exactly twice — for
the selected checkpoint and for the last — and never used to choose anything. With ``--ema-decay`` the
evaluated (and selected, and exported) weights are the exponential moving average (timm ``ModelEmaV3``).
``--labels-per-class`` / ``--label-fraction`` train on a stratified subset of what remains after the
validation split (label efficiency).

The default recipe is MAE's (He et al. 2022, appendix A.2 / ``main_finetune.py``) without mixup,
cutmix, RandAugment and random erasing (each one flag away): AdamW (β 0.9, 0.999, weight decay 0.05,
none on biases, norms and tokens), lr = base_lr × batch / 256 with base_lr 5e-4, per-step linear warmup
(5% of the steps, as MAE's 5 of 100 epochs) then cosine to min_lr 1e-6, layer-wise lr decay, drop path
0.1, label smoothing 0.1, head initialised with std 2e-5, mean pooling.

DESIGN CHOICES
- ``layer_decay`` 0.75 by default for every depth. MAE uses 0.65 for ViT-B (12 blocks) and 0.75 for
  ViT-L/H (and as ``main_finetune.py``'s default); our default targets the small encoders this
  library pretrains on a CPU (e.g. 8 blocks, where 0.65 would give the patch embedding 0.65⁹ ≈ 2% of
  the head's lr). Pass ``--layer-decay 0.65`` to reproduce the ViT-B recipe.
- Each head is built as timm builds ``VisionTransformer`` for its pooling, and drop path rises with depth on the
  loaded encoder's blocks: see :mod:`leanmim.parts.classifier`.
- ``crop_min_scale`` defaults to 0.08 (ImageNet's RandomResizedCrop) from 128 px up and to 0.5 for
  smaller images, where a crop of 8% of a 28 px image keeps almost nothing of the object.
- RandAugment runs before the crop (MAE: after it), on the stored uint8 images, one image at a time
  (torchvision draws one operation per call); every random draw of a step comes from a seed of
  (``--seed``, step), so an interrupted run resumes exactly.
- Ties in validation accuracy keep the earlier epoch (fewer steps, same evidence).

Output directory (default ``RUN_DIR/finetune``): ``finetune.json`` (validation top-1 after every
epoch; the selected epoch; test top-1 of the selected and of the last checkpoint), ``checkpoints/last.ckpt``
(resume point), ``checkpoints/best.ckpt`` (the selected epoch: what ``leanmim export`` writes), CSV and
TensorBoard logs. Running the same command again resumes from ``checkpoints/last.ckpt``. A checkpoint's
``leanmim`` entry holds the pretraining run's config (``config``) and a ``finetune`` entry; its weights
are ``classifier.*`` (and ``ema.module.*`` with ``--ema-decay``).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__
from ..config import ConfigError, DataConfig, FinetuneConfig, RunConfig
from ..data import BatchMIMAugment
from ..files import BEST_CHECKPOINT, CHECKPOINT_DIR, LAST_CHECKPOINT, RESULTS_FILE, remove_stale_temporaries
from ..parts.classifier import Classifier, class_scores, initial_encoder, prepare_encoder
from ..parts.encoder import training_attention
from ..weights import (eval_crop_pct, load_run, newest_checkpoint, read_finetune_entry, run_at_img_size,
                       run_from_weights)
from .console import emit, finetune_summary_rows, quiet, start_summary
from .finetune_data import FinetuneData, TrainAugment, finetune_splits
from .lock import _HELD, hold_directory, is_launcher_rank_zero
from .optim import adamw_warmup_cosine, layer_decay_groups
from .precision import lightning_precision
from .run import (check_run_directory, data_fingerprint, has_checkpoint, identity_of, read_run_file, write_json,
                  write_run_file, write_summary)
from .trainer import FiniteLossGuard, align_loops, build_trainer, fitting, session_record


class FinetuneModule(L.LightningModule):
    """Trains a :class:`Classifier`; measures top-1 on the validation split after every epoch (``eval_split``
    'val'), or on the test split when asked (``eval_split`` 'test', see :func:`finetune`)."""

    def __init__(self, classifier: Classifier, settings: FinetuneConfig, run_config: RunConfig, source: str,
                 train_transform: TrainAugment | None, eval_transform: nn.Module | None):
        super().__init__()
        self.classifier, self.settings, self.run_config, self.source = classifier, settings, run_config, source
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.ema = None
        if settings.ema_decay > 0:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(classifier, decay=settings.ema_decay, use_warmup=True)
            self.ema.requires_grad_(False)
        self.total_steps = 1          # set by finetune() once the data size is known
        self.batches_per_epoch = 1
        self.finite_loss = FiniteLossGuard(
            "These settings are part of the fine-tune's identity: run it again with another --out and a lower "
            "--base-lr or a --grad-clip")
        self.history: list[dict[str, Any]] = []   # one entry per validated epoch
        self.data_description: dict[str, Any] = {}
        self.class_names: list[str] = []           # label i's name (folder / shard classes), set by finetune()
        self.eval_crop_pct: float = 1.0            # evaluation view: image side / resized shorter side
        self.on_epoch_evaluated = None            # callback(module) after each validation (writes the JSON)
        self.eval_split = "val"
        self.last_eval_top1: float | None = None
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches of it trained), set when resuming
        self._correct = self._seen = 0

    @property
    def evaluated(self) -> Classifier:
        """The weights that are validated, selected, tested and exported: the EMA when on, else the trained ones."""
        return self.ema.module if self.ema is not None else self.classifier

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        if self.train_transform is not None:
            micro_step = self.current_epoch * self.batches_per_epoch + batch_idx
            images, labels = self.train_transform(images, labels, seed=self.settings.seed * 1_000_003 + micro_step * 7
                                                  + self.global_rank * 104_729 + 1)
        with training_attention(self.classifier, images.device):
            logits = self.classifier(images)
        if labels.ndim == 2:  # soft targets (mixup/cutmix; smoothing already in them)
            loss = torch.sum(-labels * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            hard = labels.argmax(1)
        else:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.settings.label_smoothing)
            hard = labels
        self.finite_loss.update(loss, self.global_step, self.current_epoch, self.settings.log_every_steps)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True)
        self.log("train_top1", (logits.argmax(1) == hard).float().mean(), on_step=True, on_epoch=True)
        self.log("lr", self.optimizers().param_groups[-1]["lr"], prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.classifier, step=self.global_step)

    def on_validation_epoch_start(self) -> None:
        self._correct = self._seen = 0

    def validation_due(self) -> bool:
        """A test evaluation, or validation after every ``val_every_epochs``-th epoch and after the last."""
        epoch, settings = self.current_epoch + 1, self.settings
        return self.eval_split == "test" or epoch % settings.val_every_epochs == 0 or epoch >= settings.epochs

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if not self.validation_due():
            return
        images, labels = batch
        if self.eval_transform is not None:
            images = self.eval_transform(images)
        scores = class_scores(self.evaluated, images, self.settings.eval_hflip)
        self._correct += int((scores.argmax(1) == labels).sum())
        self._seen += labels.numel()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._seen:
            return
        top1 = self._correct / self._seen
        self.last_eval_top1 = top1
        if self.eval_split == "test":
            self.log("test_top1", top1)
            return
        self.log("val_top1", top1, prog_bar=True)
        self.history.append({"epoch": self.current_epoch + 1, "step": self.global_step, "val_top1": top1})
        if self.on_epoch_evaluated is not None and self.trainer.is_global_zero:
            self.on_epoch_evaluated(self)

    def configure_optimizers(self):
        train = self.settings
        base = self.learning_rate()
        groups = layer_decay_groups(self.classifier, train.weight_decay, train.layer_decay)
        for group in groups:
            group["lr"] = base * group["lr_scale"]
        return adamw_warmup_cosine(groups, base, (0.9, 0.999), train.warmup_fraction, self.total_steps, train.min_lr)

    def learning_rate(self) -> float:
        if self.settings.lr is not None:
            return self.settings.lr
        world = self.trainer.world_size if self._trainer else 1
        return self.settings.base_lr * self.settings.batch_size * world / 256

    def selected(self) -> dict[str, Any] | None:
        """The history entry of the selected epoch: the first with the highest validation top-1."""
        return max(self.history, key=lambda entry: entry["val_top1"]) if self.history else None

    def results(self) -> dict[str, Any]:
        """Validation-side results (the test figures are added by :func:`finetune` once training is done)."""
        selected = self.selected()
        return {"selected_epoch": selected["epoch"] if selected else None,
                "selected_val_top1": selected["val_top1"] if selected else None,
                "last_val_top1": self.history[-1]["val_top1"] if self.history else None,
                "history": list(self.history)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.finite_loss.check(self.global_step, self.current_epoch)   # raising here writes nothing
        checkpoint["leanmim"] = {
            "version": __version__, "config": self.run_config.to_dict(),
            "finetune": {"settings": dataclasses.asdict(self.settings), "source": self.source,
                         "num_classes": self.classifier.head.out_features, "pool": self.classifier.pool,
                         "class_names": list(self.class_names), "eval_crop_pct": self.eval_crop_pct,
                         "weights": "ema" if self.ema is not None else "trained", **self.data_description,
                         **self.results()}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.eval_split == "val":  # resuming; a test evaluation of best.ckpt keeps the full history
            self.history = list(checkpoint["leanmim"]["finetune"]["history"])
            # where the resumed run stands, for the data (FinetuneData) and Lightning's counters alike
            self.resume_at = align_loops(checkpoint, self.batches_per_epoch, 1)


class KeepSelected(L.Callback):
    """Writes ``best.ckpt`` when the epoch just validated is the selected one (first highest validation top-1).

    It runs in ``on_validation_end`` before the run's ``last.ckpt`` is written there (Lightning calls checkpoint
    callbacks last), so a kill in between leaves a ``last.ckpt`` whose history selects the epoch ``best.ckpt`` holds
    or an earlier resume point that recomputes it.
    """

    def __init__(self, path: Path):
        self.path = path

    def on_validation_end(self, trainer: L.Trainer, module: FinetuneModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking or module.eval_split != "val" or not module.history:
            return
        if module.history[-1]["epoch"] == trainer.current_epoch + 1 and module.selected() is module.history[-1]:
            trainer.save_checkpoint(self.path)


def default_output_dir(source: Path) -> Path:
    """RUN_DIR/finetune for a run directory or a checkpoint inside RUN_DIR/checkpoints."""
    if source.is_dir():
        return source / "finetune"
    run_dir = source.parent.parent if source.parent.name == CHECKPOINT_DIR else source.parent
    return run_dir / "finetune"


def finetune_identity(settings: FinetuneConfig, loaded, data: str, precision: str, from_weights: bool) -> dict[str, Any]:
    """What defines a fine-tuning (see :mod:`leanmim.train.run`): every non-operational setting, the encoder it starts
    from (the pretraining run and its step, or the weights file), the labelled data's fingerprint and the
    resolved precision."""

    source = loaded.checkpoint_path.resolve() if from_weights else loaded.checkpoint_path.resolve().parent.parent
    return identity_of(dataclasses.asdict(settings), {
        "source.path": str(source), "source.global_step": loaded.global_step, "source.method": loaded.config.method,
        "data.fingerprint": data_fingerprint(data), "precision": precision})


def check_finetune_resume(out: Path, identity: dict[str, Any], extend: bool = False) -> Path | None:
    """The newest checkpoint in ``out`` when it continues this fine-tuning; a one-line ConfigError when ``out``
    holds anything else (another fine-tuning, other data or settings, a user's files, an older leanmim's
    test-selected fine-tuning) — the rule of :func:`leanmim.train.run.check_run_directory`."""

    last = out / CHECKPOINT_DIR / LAST_CHECKPOINT
    if out.is_dir() and not (out / "run.json").is_file() and last.is_file():
        entry = read_finetune_entry(last)
        if entry is None or any("val_top1" not in epoch for epoch in entry["finetune"].get("history", [])):
            raise ConfigError(f"'{out}' holds a fine-tuning by an older leanmim (no run record; it measured the test "
                              f"split every epoch): choose another --out")
    check_run_directory(out, "finetune", identity, extend)
    remove_stale_temporaries(out / CHECKPOINT_DIR)
    newest = newest_checkpoint(out / CHECKPOINT_DIR, warn=True) if (out / CHECKPOINT_DIR).is_dir() else None
    if newest is None and has_checkpoint(out):  # never restart from epoch 0 over the user's checkpoints
        raise ConfigError(f"every checkpoint in '{out / CHECKPOINT_DIR}' is unreadable (truncated or corrupt): nothing "
                          f"to resume from; restore one, or choose another --out for a new fine-tuning")
    return newest


@quiet()  # leanmim's own lines only (console.py; --verbose shows the libraries' too)
def finetune(run: str | Path | None, settings: FinetuneConfig | None = None, callbacks=()) -> dict[str, Any]:
    """Fine-tune the encoder of a pretraining run (directory or checkpoint); resumes from ``OUT/checkpoints/last.ckpt``.

    Selects the epoch on the validation split; once all epochs are done, evaluates the test split for the
    selected checkpoint and the last. Returns the results (also in ``OUT/finetune.json``; the main figures in
    the run's ``summary.json``).
    """
    settings = settings or FinetuneConfig()
    settings.validate()  # before anything is read or written
    if (run is None) == (settings.init_from is None):
        raise ConfigError("finetune starts from a pretraining run or from --init-from WEIGHTS: pass exactly one")
    if run is None:  # published weights without a leanmim run (weights.py: any layout --init-from reads)
        loaded = run_from_weights(settings.init_from, settings.data or DataConfig().path, settings.num_heads,
                                  settings.img_size)   # warns its one load line
        source = Path("runs") / f"finetune-{Path(settings.init_from).name.split('.')[0]}"
    else:
        source = Path(run)
        if read_finetune_entry(source) is not None:
            raise ConfigError(f"'{source}' is a fine-tuning result: pass the pretraining run directory or checkpoint")
        loaded = load_run(source)
        if settings.num_heads not in (None, loaded.config.model.num_heads):
            raise ConfigError(f"'{source}' states its {loaded.config.model.num_heads} encoder heads: --num-heads is for "
                              f"--init-from weights that do not")
        if not settings.from_scratch:
            loaded.warn_if_unfinished("the fine-tune")
    adapted: list[str] = []   # what the start summary says was changed in the run's model
    if run is not None and settings.img_size is not None:
        loaded, adapted = run_at_img_size(loaded, settings.img_size)
    model = loaded.config.model
    out = Path(settings.out) if settings.out else source if run is None else default_output_dir(source)
    data = settings.data or loaded.config.data.path
    precision = lightning_precision(RunConfig(train=settings.train_config(out)))
    identity = finetune_identity(settings, loaded, data, precision, from_weights=run is None)
    already_held = any(held._fd is not None and Path(key) == out.expanduser().resolve() for key, held in _HELD.items())
    lock = hold_directory(out) if is_launcher_rank_zero() else None  # one writer per output directory, for life
    if already_held:
        lock = None   # taken by an earlier call in this process: a refusal here must not undo it
    try:
        resume_from = check_finetune_resume(out, identity, settings.extend)
        splits, subsets = finetune_splits(settings, data, model)
        if len(subsets.train) < settings.batch_size:  # checked before anything is written
            raise ConfigError(f"the labelled training split has {len(subsets.train)} images, fewer than one batch of "
                              f"{settings.batch_size}: lower --batch-size")
    except Exception:
        if lock is not None:   # refused: leave the directory as it was found
            lock.release_untouched()
        raise
    in_memory = splits.batch_transform is not None

    train_transform = None
    if in_memory:  # augment whole batches
        crop = BatchMIMAugment(model.img_size, splits.mean, splits.std,
                               scale=(settings.min_scale_for(model.img_size), 1.0), hflip=settings.hflip)
        train_transform = TrainAugment(crop, splits.num_classes, settings.auto_augment, settings.random_erasing,
                                       settings.mixup, settings.cutmix, settings.label_smoothing)
    else:
        warnings.warn("images are streamed from disk: fine-tuning uses the evaluation transform (no augmentation)")
    out.mkdir(parents=True, exist_ok=True)
    record = read_run_file(out)
    if record is None or record["identity"] != identity:  # new, or extended
        write_run_file(out, "finetune", identity, {"source_checkpoint": str(loaded.checkpoint_path), "data": data})
    trainer_config = RunConfig(loaded.config.method, model, DataConfig(path=data), settings.train_config(out),
                               loaded.config.options)

    L.seed_everything(settings.seed, workers=True, verbose=False)
    encoder = prepare_encoder(initial_encoder(loaded, settings.from_scratch, settings.seed), settings.drop_path,
                              settings.pool)
    # load_run leaves the encoder in eval mode; Lightning keeps modes
    classifier = Classifier(encoder, splits.num_classes, settings.token_drop, settings.pool).train()
    module = FinetuneModule(classifier, settings, loaded.config, str(loaded.checkpoint_path), train_transform,
                            splits.batch_transform)
    module.data_description = {"validation": subsets.val_source, **subsets.counts()}
    module.class_names, module.eval_crop_pct = list(splits.class_names), eval_crop_pct(splits, model.img_size)
    best_path = out / CHECKPOINT_DIR / BEST_CHECKPOINT
    trainer = build_trainer(trainer_config, out, [KeepSelected(best_path), *callbacks],
                            stop_after_last_batch=True)
    module.batches_per_epoch = len(subsets.train) // (settings.batch_size * trainer.world_size)
    module.total_steps = settings.epochs * max(1, module.batches_per_epoch)
    if trainer.is_global_zero:
        emit(start_summary(finetune_summary_rows(settings, loaded, classifier, data, splits, subsets, trainer,
                                                 max(1, module.batches_per_epoch), module.total_steps, out,
                                                 resume_from, precision, adapted),
                           title=f"fine-tuning (leanmim {__version__})"))

    def describe(current: FinetuneModule) -> dict[str, Any]:
        return {"source": str(loaded.checkpoint_path), "source_global_step": loaded.global_step,
                "source_pretraining_finished": loaded.unfinished is None, "method": loaded.config.method, "model": model.name,
                "data": data, "out": str(out), "num_classes": splits.num_classes, "class_names": list(splits.class_names),
                "eval_crop_pct": module.eval_crop_pct, "pool": settings.pool,
                "token_drop": settings.token_drop, **current.data_description,
                "data_stats": {"mean": list(splits.mean), "std": list(splits.std)},
                "settings": dataclasses.asdict(settings), "precision": lightning_precision(trainer_config),
                **current.results(), "selected_test_top1": None, "last_test_top1": None}

    module.on_epoch_evaluated = lambda current: write_json(out / RESULTS_FILE, describe(current))
    datamodule = FinetuneData(subsets, settings, in_memory)
    started = time.perf_counter()
    # the EMA copy is in eval mode by design; a mid-epoch resume skips the batches trained (FinetuneData.resume_at)
    with fitting(trainer, resume_from, ".*module\\(s\\) in eval mode.*",
                 ".*resuming from a checkpoint that ended before the epoch ended.*"):
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        results = {**describe(module), **session_record(trainer, resume_from, started)}
        if trainer.current_epoch >= settings.epochs and module.history:  # finished: the test split, once each
            results["last_test_top1"] = evaluate_test(trainer, module, datamodule, None)
            results["selected_test_top1"] = evaluate_test(trainer, module, datamodule, best_path)
            results["selected_checkpoint"] = str(best_path)
    if trainer.is_global_zero:
        write_json(out / RESULTS_FILE, results)
        run_dir = loaded.checkpoint_path.parent.parent
        if (run_dir / "config.yaml").is_file():
            write_summary(run_dir, {"finetune": {key: results[key] for key in
                                                 ("out", "pool", "selected_epoch", "selected_val_top1",
                                                  "selected_test_top1", "last_val_top1", "last_test_top1",
                                                  "epochs_completed", "num_train", "token_drop")}})
    return results


def evaluate_test(trainer: L.Trainer, module: FinetuneModule, datamodule: FinetuneData,
                  checkpoint: Path | None) -> float:
    """Top-1 on the test split of the module's evaluated weights as they are (None) or as in ``checkpoint``."""
    module.eval_split = "test"
    try:
        trainer.validate(module, dataloaders=datamodule.evaluation_loader(datamodule.splits.test),
                         ckpt_path=checkpoint, weights_only=True, verbose=False)
    finally:
        module.eval_split = "val"
    return module.last_eval_top1
