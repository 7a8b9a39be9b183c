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
``--val-fraction``; or the folder's own ``DIR/val/``; :mod:`leanmim.splits`). After every epoch the
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
- Each head is built as timm builds ``VisionTransformer`` for the matching ``global_pool``, so the
  fine-tuned model exports to timm exactly: ``mean`` removes the encoder's final norm and adds a fresh
  ``fc_norm`` after pooling (``global_pool='avg'``); ``cls`` keeps the pretrained final norm and reads
  the cls token (``'token'``). ``tokens`` has no timm pooling: it exports as ``global_pool=''`` (the
  features) plus ``token_head.*``, the layout written in the metadata (see :func:`export_finetuned`).
- ``crop_min_scale`` defaults to 0.08 (ImageNet's RandomResizedCrop) from 128 px up and to 0.5 for
  smaller images, where a crop of 8% of a 28 px image keeps almost nothing of the object.
- RandAugment runs before the crop (MAE: after it), on the stored uint8 images, one image at a time
  (torchvision draws one operation per call); every random draw of a step comes from a seed of
  (``--seed``, step), so an interrupted run resumes exactly.
- Drop path is set on the loaded encoder's blocks (timm ``Block.drop_path1/2``), rising linearly
  from 0 to ``drop_path`` with depth, so any method's encoder can be fine-tuned as loaded.
- Ties in validation accuracy keep the earlier epoch (fewer steps, same evidence).

Output directory (default ``RUN_DIR/finetune``): ``finetune.json`` (validation top-1 after every
epoch; the selected epoch; test top-1 of the selected and of the last checkpoint), ``checkpoints/last.ckpt``
(resume point), ``checkpoints/best.ckpt`` (the selected epoch: what ``leanmim export`` writes), CSV and
TensorBoard logs. Running the same command again resumes from ``checkpoints/last.ckpt``. A checkpoint's
``leanmim`` entry holds the pretraining run's config (``config``) and a ``finetune`` entry; its weights
are ``classifier.*`` (and ``ema.module.*`` with ``--ema-decay``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.data import DataLoader

from . import __version__
from .checkpoint import CHECKPOINT_DIR, LAST_CHECKPOINT, find_checkpoint, load_run
from .console import quiet
from .config import POOLS, ConfigError, DataConfig, FinetuneConfig, ModelConfig, RunConfig  # noqa: F401 (FinetuneConfig re-exported)
from .data import BatchMIMAugment, DataError, build_labelled_splits
from .data.common import worker_start_method
from .encoder import ViTEncoder, pool_features, training_attention
from .data.sampler import GlobalBatchSampler
from .engine import (NonFiniteLossError, build_trainer, lightning_precision, warmup_cosine,
                     write_summary)
from .methods import build_method
from .splits import TrainValTest, carve_splits, folder_val_split

RESULTS_FILE = "finetune.json"
BEST_CHECKPOINT = "best.ckpt"
TIMM_GLOBAL_POOL = {"mean": "avg", "cls": "token", "tokens": ""}   # timm VisionTransformer(global_pool=…)


# ----------------------------------------------------------------------------- the model

def initial_encoder(loaded, from_scratch: bool, seed: int) -> nn.Module:
    """The encoder fine-tuning starts from: the run's pretrained one, or (``from_scratch``) the same method's
    encoder freshly initialised from ``seed`` — as the method itself initialises it before pretraining."""
    return loaded.untrained_method(seed).encoder if from_scratch else loaded.method.encoder


def prepare_encoder(encoder: nn.Module, drop_path: float, pool: str = "mean") -> nn.Module:
    """Make a pretrained encoder fine-tunable in place: drop path rising linearly from 0 (first block) to
    ``drop_path`` (last block) in ``encoder.blocks``; for ``pool='mean'`` the final norm is removed (``fc_norm``
    replaces it after pooling, as timm's ``global_pool='avg'``), for ``cls`` and ``tokens`` it is kept.
    The absolute position table (a fixed buffer during pretraining) becomes a trained parameter, as in MAE's
    fine-tuning (timm's learnable ``pos_embed``, no weight decay, the patch embedding's layer-decay group)."""
    if not hasattr(encoder, "norm") or not hasattr(encoder, "blocks"):
        raise ConfigError(f"the {type(encoder).__name__} encoder has no 'norm' and 'blocks': it cannot be fine-tuned")
    table = encoder._buffers.get("pos_embed")
    if table is not None:
        del encoder._buffers["pos_embed"]
        encoder.pos_embed = nn.Parameter(table.detach().clone())
    if pool == "mean":
        encoder.norm = nn.Identity()
    rates = torch.linspace(0, drop_path, len(encoder.blocks)).tolist()
    for number, (block, rate) in enumerate(zip(encoder.blocks, rates)):
        for name in ("drop_path1", "drop_path2"):
            if not hasattr(block, name):
                raise ConfigError(f"block {number} of the {type(encoder).__name__} encoder has no {name}: "
                                  f"it is not a timm Block, so drop path cannot be set (use --drop-path 0)")
            setattr(block, name, DropPath(rate) if rate > 0 else nn.Identity())
    return encoder


def supports_token_drop(encoder: nn.Module) -> bool:
    return "token_drop" in inspect.signature(encoder.forward_features).parameters


class Classifier(nn.Module):
    """encoder → pooling (``pool``) → head: images (B, C, H, W) -> logits (B, K).

    ``mean``: patch-token mean (B, D) → ``fc_norm`` → ``head``; ``cls``: cls token (B, D) → ``head``;
    ``tokens``: patch tokens in grid order flattened (B, L·D) → ``head`` (a Linear(L·D, K)).
    ``encoder`` must have gone through :func:`prepare_encoder` with the same ``pool``. ``token_drop`` > 0
    runs the encoder with token compression (``forward_features(images, token_drop=R)``).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, token_drop: float = 0.0, pool: str = "mean"):
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"unknown fine-tuning pool '{pool}': use {', '.join(POOLS)}")
        if token_drop > 0 and not supports_token_drop(encoder):
            raise ConfigError(f"the {type(encoder).__name__} encoder has no token compression: drop --token-drop")
        if token_drop > 0 and pool == "tokens":
            raise ConfigError("--pool tokens needs every patch token: drop --token-drop or use --pool mean/cls")
        self.encoder, self.token_drop, self.pool = encoder, token_drop, pool
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6) if pool == "mean" else nn.Identity()
        features = encoder.embed_dim * (encoder.num_patches if pool == "tokens" else 1)
        self.head = nn.Linear(features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, F) pooled image feature (F = D, or L·D for ``tokens``)."""
        encoder_kwargs = {"token_drop": self.token_drop} if self.token_drop > 0 else {}
        return self.fc_norm(pool_features(self.encoder.forward_features(images, **encoder_kwargs), self.pool))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.forward_features(images))


def layer_decay_groups(classifier: Classifier, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with an ``lr_scale`` each: layer 0 = embeddings (patch_embed, cls_token, …), layer i = block i,
    layer N + 1 = the encoder's final norm (when kept), fc_norm and head; scale = layer_decay^(N + 1 − layer).
    No weight decay on 1-D parameters, tokens and position tables (the rule of ``engine.parameter_groups``)."""
    depth = len(classifier.encoder.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in classifier.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith("encoder.") and not name.startswith("encoder.norm."):
            layer = 0
        else:
            layer = depth + 1
        decay = not (parameter.ndim <= 1 or "token" in name or "pos_embed" in name or "relative" in name)
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


# ----------------------------------------------------------------------------- augmentation

@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch (CPU), NumPy and Python's ``random`` inside the block and restore them after: timm's Mixup,
    RandomErasing and torchvision's policies draw from these global generators."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class TrainAugment(nn.Module):
    """The training view of a batch: (images uint8 (B, C, H, W), labels (B,)) -> (normalized (B, C, S, S),
    targets): labels (B,) int64, or soft targets (B, K) float under mixup/cutmix (label smoothing folded in).

    Order: auto-augment policy (per image, uint8) → crop + flip + normalize → random erasing → mixup/cutmix.
    ``forward(..., seed=s)`` makes every draw a function of ``s``.
    """

    def __init__(self, crop: BatchMIMAugment, num_classes: int, auto_augment: str = "none",
                 random_erasing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing
        from torchvision.transforms import v2

        self.crop = crop
        self.policy = {"none": None, "randaugment": v2.RandAugment(), "trivialaugment": v2.TrivialAugmentWide()}[
            auto_augment]
        self.erasing = RandomErasing(random_erasing, mode="pixel", device="cpu") if random_erasing > 0 else None
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                               num_classes=num_classes)

    def forward(self, images: Tensor, labels: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(seed)
        with seeded(seed + 1):
            if self.policy is not None:
                images = torch.stack([self.policy(image) for image in images])
            images = self.crop(images, generator=generator)
            if self.erasing is not None:
                images = self.erasing(images)
            if self.mixup is not None:
                images, labels = self.mixup(images, labels)
        return images, labels


# ----------------------------------------------------------------------------- Lightning

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
        self.history: list[dict[str, Any]] = []   # one entry per validated epoch
        self.data_description: dict[str, Any] = {}
        self.class_names: list[str] = []           # label i's name (folder / shard classes), set by finetune()
        self.eval_crop_pct: float = 1.0            # evaluation view: image side / resized shorter side
        self.on_epoch_evaluated = None            # callback(module) after each validation (writes the JSON)
        self.eval_split = "val"
        self.last_eval_top1: float | None = None
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
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); the last good "
                f"checkpoint is untouched: lower --base-lr or set --grad-clip, then rerun to resume")
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
        optimizer = torch.optim.AdamW(groups, lr=base, betas=(0.9, 0.999))
        warmup = int(train.warmup_fraction * self.total_steps)
        min_ratio = train.min_lr / base if base > 0 else 0.0
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, self.total_steps, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

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


class FinetuneData(L.LightningDataModule):
    """Labelled train split in :class:`GlobalBatchSampler` order; the whole validation split for validation."""

    def __init__(self, splits: TrainValTest, settings: FinetuneConfig, in_memory: bool):
        super().__init__()
        self.splits, self.settings = splits, settings
        self.workers = 0 if in_memory else min(4, os.cpu_count() or 1)

    def train_dataloader(self) -> DataLoader:
        sampler = GlobalBatchSampler(len(self.splits.train), self.settings.batch_size, self.settings.seed,
                                     self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(self.splits.train, batch_sampler=sampler, num_workers=self.workers,
                          persistent_workers=self.workers > 0, multiprocessing_context=worker_start_method(self.workers))

    def evaluation_loader(self, dataset) -> DataLoader:
        # Every process evaluates the whole split: exact, and the split is small next to training.
        return DataLoader(dataset, batch_size=self.settings.batch_size, shuffle=False, num_workers=self.workers,
                          persistent_workers=False, multiprocessing_context=worker_start_method(self.workers))

    def val_dataloader(self) -> DataLoader:
        return self.evaluation_loader(self.splits.val)


# ----------------------------------------------------------------------------- checkpoints

def read_finetune_entry(path: str | Path) -> dict[str, Any] | None:
    """The ``leanmim`` entry of a fine-tuning checkpoint, or None for any other file (memory-mapped: cheap)."""
    try:
        checkpoint = torch.load(find_checkpoint(path), map_location="cpu", weights_only=True, mmap=True)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - not a (zip) torch checkpoint: let the regular reader explain
        return None
    entry = checkpoint.get("leanmim") if isinstance(checkpoint, dict) else None
    return entry if isinstance(entry, dict) and "finetune" in entry else None


def selected_checkpoint(path: str | Path) -> Path:
    """A fine-tuning output directory's selected checkpoint (``checkpoints/best.ckpt``; ``last.ckpt`` only when
    no epoch has been validated yet), or the checkpoint file given."""
    path = Path(path)
    if path.is_dir() and (path / CHECKPOINT_DIR / BEST_CHECKPOINT).is_file():
        return path / CHECKPOINT_DIR / BEST_CHECKPOINT
    return find_checkpoint(path)


@dataclass
class FinetunedRun:
    config: RunConfig            # the pretraining run's (resolved) config
    settings: FinetuneConfig
    classifier: Classifier       # in eval mode, the evaluated weights (EMA when on) loaded
    checkpoint_path: Path
    results: dict[str, Any]


def load_finetuned(path: str | Path) -> FinetunedRun:
    """Rebuild the classifier of a fine-tuning output directory (its selected checkpoint) or checkpoint file."""
    checkpoint_path = selected_checkpoint(path)
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    entry = checkpoint.get("leanmim", {}) if isinstance(checkpoint, dict) else {}
    if "finetune" not in entry:
        raise ConfigError(f"'{checkpoint_path}' is not a fine-tuning checkpoint (made by 'leanmim finetune')")
    config = RunConfig.from_dict(entry["config"], source=str(checkpoint_path))
    settings = FinetuneConfig.from_dict(entry["finetune"]["settings"], source=str(checkpoint_path))
    encoder = prepare_encoder(build_method(config.method, config.model, config.options).encoder, 0.0, settings.pool)
    classifier = Classifier(encoder, entry["finetune"]["num_classes"], settings.token_drop, settings.pool)
    prefix = "ema.module." if entry["finetune"].get("weights") == "ema" else "classifier."
    state = {key[len(prefix):]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    try:
        classifier.load_state_dict(state)
    except RuntimeError:
        raise ConfigError(f"checkpoint '{checkpoint_path}' does not fit the {config.method}/{config.model.name} "
                          f"classifier: it was written by another version") from None
    results = {key: entry["finetune"].get(key) for key in ("selected_epoch", "selected_val_top1", "history")}
    results["global_step"] = int(checkpoint.get("global_step", 0))
    recorded = finetune_data_stats(checkpoint_path, "class_names") or []
    names = entry["finetune"].get("class_names") or recorded
    if len(names) != classifier.head.out_features:   # a fine-tuning made before class names were kept
        names = [str(i) for i in range(classifier.head.out_features)]
        warnings.warn(f"'{checkpoint_path}' records no class names (an older fine-tuning): classes are named by "
                      f"their index 0..{len(names) - 1}; rerun 'leanmim finetune' to keep the folder's names")
    results["class_names"] = list(names)
    results["eval_crop_pct"] = float(entry["finetune"].get("eval_crop_pct")
                                     or finetune_data_stats(checkpoint_path, "eval_crop_pct") or 1.0)
    return FinetunedRun(config, settings, classifier.eval(), checkpoint_path, results)


def class_scores(classifier: nn.Module, images: Tensor, mirror: bool) -> Tensor:
    """(B, K) scores whose arg-max is the prediction for images (B, C, S, S): the logits, or with ``mirror``
    (test-time augmentation) the sum of the softmax of each image and of its mirror image."""
    if not mirror:
        return classifier(images)
    return classifier(images).float().softmax(-1) + classifier(images.flip(-1)).float().softmax(-1)


def evaluate_finetuned(path: str | Path, split: str = "val", hflip: bool | None = None, batch_size: int = 256) -> float:
    """Top-1 of a fine-tuning's selected classifier on its own ``split`` ('val' or 'test'), rebuilt exactly as the
    fine-tuning carved it (same data, validation fraction, split seed, label subset) and evaluated in its precision.

    ``hflip``: test-time augmentation (:func:`class_scores` with ``mirror``); None: as the fine-tuning validated
    (``--eval-hflip``). Decide on it with ``split='val'``; the test split is for reporting the protocol chosen there.
    """
    if split not in ("val", "test"):
        raise ConfigError(f"split must be 'val' or 'test', got '{split}'")
    run = load_finetuned(path)
    settings = run.settings
    splits, subsets = finetune_splits(settings, settings.data or run.config.data.path, run.config.model)
    dataset = subsets.val if split == "val" else subsets.test
    if dataset is None or len(dataset) == 0:
        raise ConfigError(f"the fine-tuning in '{path}' has no {split} split (--val-fraction 0?)")
    normalize = splits.batch_transform   # None when streamed: the dataset yields normalized tensors
    bf16 = lightning_precision(RunConfig(train=settings.train_config(run.checkpoint_path.parent))) == "bf16-mixed"
    correct = seen = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for images, labels in DataLoader(dataset, batch_size=batch_size):
            images = normalize(images) if normalize is not None else images
            scores = class_scores(run.classifier, images, settings.eval_hflip if hflip is None else hflip)
            correct += int((scores.argmax(1) == labels).sum())
            seen += labels.numel()
    return correct / seen


def export_finetuned(path: str | Path, out: str | Path) -> Path:
    """Export a fine-tuned classifier (a directory: its selected checkpoint, ``best.ckpt``).

    For a :class:`ViTEncoder`: timm ``VisionTransformer(global_pool=G, num_classes=K)`` safetensors with G
    'avg' (``--pool mean``: encoder keys without ``norm.*``, plus ``fc_norm.*``, ``head.*``) or 'token' (``cls``:
    encoder keys with ``norm.*``, plus ``head.*``). ``--pool tokens`` has no timm pooling: the encoder is written
    for ``global_pool='', num_classes=0`` (its ``forward_features`` gives (B, 1 + L, D) normed tokens) and the
    head as ``token_head.weight`` (K, L·D) / ``token_head.bias``, applied to ``features[:, 1:].flatten(1)``
    (patch tokens in row-major grid order); the metadata says so. Other encoders (relative positions): their
    own state dict plus the head, architecture in the metadata. The metadata names the checkpoint and epoch.
    """
    from safetensors.torch import save_file

    from .weights import timm_create_kwargs, timm_pretrained_cfg, timm_state_dict

    loaded = load_finetuned(path)
    classifier = loaded.classifier
    encoder = classifier.encoder
    if isinstance(encoder, ViTEncoder):
        state = timm_state_dict(encoder)
        metadata = {**timm_create_kwargs(loaded.config.model), "format": "timm.VisionTransformer"}
        stats = finetune_data_stats(loaded.checkpoint_path)   # timm's pretrained_cfg: input size, mean/std
        metadata["pretrained_cfg"] = json.dumps(timm_pretrained_cfg(
            loaded.config.model, stats.get("mean"), stats.get("std"),
            0 if classifier.pool == "tokens" else classifier.head.out_features, loaded.results["eval_crop_pct"],
            None if classifier.pool == "tokens" else loaded.results["class_names"]))
    else:
        state = {name: tensor.detach().float().contiguous().clone() for name, tensor in encoder.state_dict().items()}
        architecture = encoder.architecture() if hasattr(encoder, "architecture") else {}
        metadata = {**architecture, "format": f"leanmim.{type(encoder).__name__}+head",
                    "final_norm": classifier.pool != "mean"}
    head_name = "token_head" if classifier.pool == "tokens" else "head"
    for prefix, module in (("fc_norm", classifier.fc_norm), (head_name, classifier.head)):
        state.update({f"{prefix}.{name}": tensor.detach().float().contiguous().clone()
                      for name, tensor in module.state_dict().items()})
    num_classes = classifier.head.out_features
    metadata.update(global_pool=TIMM_GLOBAL_POOL[classifier.pool], pool=classifier.pool, token_drop=classifier.token_drop,
                    num_classes=0 if classifier.pool == "tokens" else num_classes,
                    checkpoint=loaded.checkpoint_path.name, global_step=loaded.results["global_step"],
                    selected_epoch=loaded.results["selected_epoch"],
                    selected_val_top1=loaded.results["selected_val_top1"],
                    weights=("exponential moving average" if loaded.settings.ema_decay > 0 else "trained"))
    if classifier.pool == "tokens":
        metadata.update(head_classes=num_classes, head_input="token_head applies to forward_features(x)[:, 1:]"
                        ".flatten(1): the patch tokens (B, L, D) after the final norm, cls excluded, row-major "
                        "grid order")
    metadata["class_names"] = json.dumps(loaded.results["class_names"])
    out = Path(out)
    if out.suffix != ".safetensors":
        return write_finetuned_folder(loaded, state, metadata, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from .run import publish, temporary_path

    tmp = temporary_path(out)
    try:
        save_file(state, str(tmp), metadata={key: str(value) for key, value in metadata.items()})
        publish(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_finetuned_folder(loaded: FinetunedRun, state: dict[str, Tensor], metadata: dict[str, Any], out: Path) -> Path:
    """A timm ``local-dir`` folder: ``model.safetensors``, ``config.json`` (architecture, ``model_args``, and the
    ``pretrained_cfg`` with ``label_names``, ``crop_pct``/``crop_mode``, mean/std) and a model card ``README.md``:
    ``timm.create_model("local-dir:OUT", pretrained=True)`` gives the classifier with its labels."""
    from .modelcard import write_model_card
    from .run import atomic_write_text
    from .weights import TIMM_NAMES, timm_model_args, write_safetensors

    classifier = loaded.classifier
    if not isinstance(classifier.encoder, ViTEncoder) or classifier.pool == "tokens":
        raise ConfigError("a --pool tokens (or relative-position) classifier has no timm counterpart: export it to a "
                          "FILE.safetensors (the metadata describes its layout)")
    model = loaded.config.model
    pretrained_cfg = json.loads(metadata["pretrained_cfg"])
    args = timm_model_args(model, finetuned=classifier.pool == "mean")
    args.update(global_pool=TIMM_GLOBAL_POOL[classifier.pool], num_classes=classifier.head.out_features)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, out / "model.safetensors", metadata)
    config = {"architecture": TIMM_NAMES[model.name], "num_classes": classifier.head.out_features,
              "num_features": model.embed_dim, "global_pool": args["global_pool"], "model_args": args,
              "label_names": loaded.results["class_names"], "pretrained_cfg": pretrained_cfg}
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    write_model_card(out, loaded.checkpoint_path, "timm", classifier=True)
    return out


def eval_crop_pct(splits, img_size: int) -> float:
    """The evaluation view as timm's ``crop_pct`` (crop side / resized shorter side): folders and folder shards are
    resized to stored_size(img_size) (8/7) and centre-cropped; idx data (and shards of it) only resized (1.0)."""
    from .data import stored_size

    transform = splits.batch_transform
    if transform is not None and getattr(transform, "crop_size", None) is None:
        return 1.0
    return img_size / stored_size(img_size)


def finetune_data_stats(checkpoint_path: Path, key: str = "data_stats") -> Any:
    """The fine-tuning data's mean/std (or another ``key``) recorded in ``OUT/finetune.json`` ({} when absent)."""
    results = checkpoint_path.parent.parent / RESULTS_FILE
    try:
        return json.loads(results.read_text()).get(key) or {}
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------------------- entry point

def default_output_dir(source: Path) -> Path:
    """RUN_DIR/finetune for a run directory or a checkpoint inside RUN_DIR/checkpoints."""
    if source.is_dir():
        return source / "finetune"
    run_dir = source.parent.parent if source.parent.name == CHECKPOINT_DIR else source.parent
    return run_dir / "finetune"


def finetune_identity(settings: FinetuneConfig, loaded, data: str, precision: str, from_weights: bool) -> dict[str, Any]:
    """What defines a fine-tuning (see :mod:`leanmim.run`): every non-operational setting, the encoder it starts
    from (the pretraining run and its step, or the weights file), the labelled data's fingerprint and the
    resolved precision."""
    from .run import data_fingerprint, identity_of

    source = loaded.checkpoint_path.resolve() if from_weights else loaded.checkpoint_path.resolve().parent.parent
    return identity_of(dataclasses.asdict(settings), {
        "source.path": str(source), "source.global_step": loaded.global_step, "source.method": loaded.config.method,
        "data.fingerprint": data_fingerprint(data), "precision": precision})


def check_finetune_resume(out: Path, identity: dict[str, Any], extend: bool = False) -> Path | None:
    """The newest checkpoint in ``out`` when it continues this fine-tuning; a one-line ConfigError when ``out``
    holds anything else (another fine-tuning, other data or settings, a user's files, an older leanmim's
    test-selected fine-tuning) — the rule of :func:`leanmim.run.check_run_directory`."""
    from .checkpoint import newest_checkpoint
    from .run import check_run_directory, has_checkpoint, remove_stale_temporaries

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


def labelled_data(data: str, img_size: int, in_chans: int, val_fraction: float, split_seed: int,
                  labels_per_class: int | None = None, label_fraction: float | None = None):
    """(labelled splits as built, train/val/test subsets): the validation split is the folder's val/ when it has
    train/, val/ and test/, else ``val_fraction`` of each class of train (0: none); then the label subset."""
    splits = build_labelled_splits(data, img_size, in_chans)
    val = folder_val_split(data, img_size, in_chans)
    if val is not None and type(val) is not type(splits.test):
        raise DataError(f"'{data}/val' and '{data}/test' were loaded differently (one in memory, one streamed): "
                        f"pass data whose splits fit in memory together, or drop val/ (--val-fraction carves one)")
    subsets = carve_splits(splits.train, splits.test, val_fraction, split_seed, labels_per_class, label_fraction, val)
    return splits, subsets


def finetune_splits(settings: FinetuneConfig, data: str, model: ModelConfig):
    """The labelled splits a fine-tuning with ``settings`` uses on ``data`` for ``model`` (a ModelConfig): see
    :func:`labelled_data`."""
    return labelled_data(data, model.img_size, model.in_chans, settings.val_fraction, settings.split_seed,
                         settings.labels_per_class, settings.label_fraction)


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
        from .weights import run_from_weights
        loaded = run_from_weights(settings.init_from, settings.data or DataConfig().path)
        source = Path("runs") / f"finetune-{Path(settings.init_from).name.split('.')[0]}"
    else:
        source = Path(run)
        if read_finetune_entry(source) is not None:
            raise ConfigError(f"'{source}' is a fine-tuning result: pass the pretraining run directory or checkpoint")
        loaded = load_run(source)
        if not settings.from_scratch:
            loaded.warn_if_unfinished("the fine-tune")
    model = loaded.config.model
    out = Path(settings.out) if settings.out else source if run is None else default_output_dir(source)
    data = settings.data or loaded.config.data.path
    precision = lightning_precision(RunConfig(train=settings.train_config(out)))
    identity = finetune_identity(settings, loaded, data, precision, from_weights=run is None)
    from .run import hold_directory, is_launcher_rank_zero
    from .run import _HELD
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
    from .run import read_run_file, write_run_file
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
    trainer = build_trainer(trainer_config, out, [KeepSelected(best_path), *callbacks])
    module.batches_per_epoch = len(subsets.train) // (settings.batch_size * trainer.world_size)
    module.total_steps = settings.epochs * max(1, module.batches_per_epoch)

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
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")   # the EMA copy, by design
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        results = {**describe(module), "resumed_from": str(resume_from) if resume_from else None,
                   "global_step": trainer.global_step, "epochs_completed": trainer.current_epoch,
                   "train_seconds_this_session": round(time.perf_counter() - started, 1)}
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


def write_json(path: Path, values: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(values, indent=2))
    tmp.replace(path)
