"""End-to-end fine-tuning of a pretrained encoder for classification: the MAE protocol, on Lightning.

One batch, from image to loss::

    images (B, C, H, W) uint8 ─ RandomResizedCrop + flip + normalize (BatchMIMAugment)
      ─▶ encoder.forward_features          (B, 1 + L', D)   drop path in every block, no final norm,
                                                              optional token compression (--token-drop)
      ─▶ mean of the patch tokens          (B, D)
      ─▶ fc_norm (LayerNorm) ─▶ head (Linear)   (B, K) logits
      ─▶ cross-entropy with label smoothing

The recipe is MAE's (He et al. 2022, appendix A.2 / ``main_finetune.py``) without mixup, cutmix,
RandAugment and random erasing: AdamW (β 0.9, 0.999, weight decay 0.05, none on biases, norms and
tokens), lr = base_lr × batch / 256 with base_lr 5e-4, per-step linear warmup (5% of the steps, as
MAE's 5 of 100 epochs) then cosine to min_lr 1e-6, layer-wise lr decay, drop path 0.1, label
smoothing 0.1, head initialised with std 2e-5. The test split is evaluated after every epoch.

DESIGN CHOICES
- ``layer_decay`` 0.75 by default for every depth. MAE uses 0.65 for ViT-B (12 blocks) and 0.75 for
  ViT-L/H (and as ``main_finetune.py``'s default); our default targets the small encoders this
  library pretrains on a CPU (e.g. 8 blocks, where 0.65 would give the patch embedding 0.65⁹ ≈ 2% of
  the head's lr). Pass ``--layer-decay 0.65`` to reproduce the ViT-B recipe.
- The encoder's final norm is removed and a fresh ``fc_norm`` applied after pooling, as MAE does with
  global pooling and as timm's ``VisionTransformer(global_pool='avg')`` is built, so the fine-tuned
  model exports to timm exactly (``fc_norm.*``, ``head.*``; see :func:`export_finetuned`).
- ``crop_min_scale`` defaults to 0.08 (ImageNet's RandomResizedCrop) from 128 px up and to 0.5 for
  smaller images, where a crop of 8% of a 28 px image keeps almost nothing of the object.
- Drop path is set on the loaded encoder's blocks (timm ``Block.drop_path1/2``), rising linearly
  from 0 to ``drop_path`` with depth, so any method's encoder can be fine-tuned as loaded.

Output directory (default ``RUN_DIR/finetune``): ``finetune.json`` (accuracy after every epoch,
best and last), ``checkpoints/last.ckpt``, CSV and TensorBoard logs. Running the same command again
resumes from ``checkpoints/last.ckpt``. The checkpoint's ``leanmim`` entry holds the pretraining
run's config (``config``) and a ``finetune`` entry; its weights are ``classifier.encoder.*``,
``classifier.fc_norm.*`` and ``classifier.head.*``. ``leanmim export`` recognises it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.data import DataLoader

from . import __version__
from .checkpoint import CHECKPOINT_DIR, LAST_CHECKPOINT, find_checkpoint, load_run
from .config import ConfigError, DataConfig, RunConfig, TrainConfig, dataclass_from_dict, option
from .data import BatchMIMAugment, LabelledSplits, build_labelled_splits
from .encoder import ViTEncoder, pool_features
from .engine import (GlobalBatchSampler, NonFiniteLossError, build_trainer, lightning_precision, warmup_cosine,
                     write_summary)
from .methods import build_method

RESULTS_FILE = "finetune.json"


@dataclass
class FinetuneConfig:
    """Every setting of ``leanmim finetune`` (one flag each)."""

    out: str | None = option(None, "output directory (default: RUN_DIR/finetune); a last checkpoint there resumes")
    data: str | None = option(None, "labelled data with train/test splits (default: the run's data)", cli="data")
    epochs: int = option(10, "fine-tuning epochs (MAE: 100 on ImageNet)")
    batch_size: int = option(256, "images per device per step")
    base_lr: float = option(5e-4, "learning rate per 256 images (MAE ViT-B: 5e-4)")
    lr: float | None = option(None, "absolute learning rate (default: base_lr × batch / 256)")
    min_lr: float = option(1e-6, "learning rate at the end of the cosine schedule")
    warmup_fraction: float = option(0.05, "fraction of the steps in linear warmup (MAE: 5 of 100 epochs)")
    weight_decay: float = option(0.05, "AdamW weight decay (never on biases, norms, tokens)")
    layer_decay: float = option(0.75, "layer-wise lr decay: block i of N gets lr × decay^(N + 1 − i) (MAE ViT-B: 0.65)")
    drop_path: float = option(0.1, "stochastic depth rate of the last block (rising linearly from 0)")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy")
    token_drop: float = option(0.0, "token compression (PCAE) at fine-tuning and evaluation: drop ratio per stage")
    from_scratch: bool = option(False, "ignore the pretrained weights: the run's architecture freshly initialised "
                                "(seeded by --seed), i.e. the supervised baseline under the same recipe")
    crop_min_scale: float | None = option(None, "smallest RandomResizedCrop area (default: 0.08 from 128 px up, else 0.5)")
    hflip: bool = option(True, "random horizontal flips")
    grad_clip: float | None = option(None, "clip the gradient norm to this value")
    precision: str = option("auto", "bf16 (mixed), 32, or auto = bf16 where the hardware supports it",
                            choices=("auto", "bf16", "32"))
    accelerator: str = option("auto", "cpu, gpu or auto")
    devices: str = option("1", "devices (a number, or 'auto')")
    seed: int = option(0, "seed for the head, data order and augmentation")
    log_every_steps: int = option(10, "log metrics every N steps")
    progress_bar: bool = option(True, "show a progress bar")

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("finetune: epochs and batch_size must be at least 1")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"layer_decay must lie in (0, 1], got {self.layer_decay}")
        for name in ("drop_path", "label_smoothing", "token_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.crop_min_scale is not None and not 0.0 < self.crop_min_scale <= 1.0:
            raise ConfigError(f"crop_min_scale must lie in (0, 1], got {self.crop_min_scale}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "finetune") -> "FinetuneConfig":
        return dataclass_from_dict(cls, values, source)

    def min_scale_for(self, img_size: int) -> float:
        if self.crop_min_scale is not None:
            return self.crop_min_scale
        return 0.08 if img_size >= 128 else 0.5

    def train_config(self, out: Path) -> TrainConfig:
        """The engine's view of these settings (for ``build_trainer`` and ``lightning_precision``)."""
        return TrainConfig(out=str(out), epochs=self.epochs, batch_size=self.batch_size, base_lr=self.base_lr,
                           lr=self.lr, min_lr=self.min_lr, warmup_fraction=self.warmup_fraction,
                           weight_decay=self.weight_decay, beta1=0.9, beta2=0.999, grad_clip=self.grad_clip,
                           precision=self.precision, accelerator=self.accelerator, devices=self.devices,
                           seed=self.seed, checkpoint_every_epochs=0, log_every_steps=self.log_every_steps,
                           progress_bar=self.progress_bar)


# ----------------------------------------------------------------------------- the model

def initial_encoder(loaded, from_scratch: bool, seed: int) -> nn.Module:
    """The encoder fine-tuning starts from: the run's pretrained one, or (``from_scratch``) the same method's
    encoder freshly initialised from ``seed`` — as the method itself initialises it before pretraining."""
    return loaded.untrained_method(seed).encoder if from_scratch else loaded.method.encoder


def prepare_encoder(encoder: nn.Module, drop_path: float) -> nn.Module:
    """Make a pretrained encoder fine-tunable in place: final norm removed (``fc_norm`` replaces it) and drop
    path rising linearly from 0 (first block) to ``drop_path`` (last block) in ``encoder.blocks``."""
    if not hasattr(encoder, "norm") or not hasattr(encoder, "blocks"):
        raise ConfigError(f"the {type(encoder).__name__} encoder has no 'norm' and 'blocks': it cannot be fine-tuned")
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
    """encoder → mean of the patch tokens → ``fc_norm`` → ``head``: images (B, C, H, W) -> logits (B, K).

    ``encoder`` must have gone through :func:`prepare_encoder`. ``token_drop`` > 0 runs the encoder
    with token compression (``forward_features(images, token_drop=R)``).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, token_drop: float = 0.0):
        super().__init__()
        if token_drop > 0 and not supports_token_drop(encoder):
            raise ConfigError(f"the {type(encoder).__name__} encoder has no token compression: drop --token-drop")
        self.encoder, self.token_drop = encoder, token_drop
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D) pooled, normed image feature."""
        encoder_kwargs = {"token_drop": self.token_drop} if self.token_drop > 0 else {}
        return self.fc_norm(pool_features(self.encoder.forward_features(images, **encoder_kwargs), "mean"))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.forward_features(images))


def layer_decay_groups(classifier: Classifier, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with an ``lr_scale`` each: layer 0 = embeddings (patch_embed, cls_token, …), layer i = block i,
    layer N + 1 = fc_norm and head; scale = layer_decay^(N + 1 − layer). No weight decay on 1-D parameters,
    tokens and position tables (the rule of ``engine.parameter_groups``)."""
    depth = len(classifier.encoder.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in classifier.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith("encoder."):
            layer = 0
        else:
            layer = depth + 1
        decay = not (parameter.ndim <= 1 or "token" in name or "pos_embed" in name or "relative" in name)
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


# ----------------------------------------------------------------------------- Lightning

class FinetuneModule(L.LightningModule):
    """Trains a :class:`Classifier`; evaluates top-1 on the test split after every epoch."""

    def __init__(self, classifier: Classifier, settings: FinetuneConfig, run_config: RunConfig, source: str,
                 train_transform: nn.Module | None, eval_transform: nn.Module | None):
        super().__init__()
        self.classifier, self.settings, self.run_config, self.source = classifier, settings, run_config, source
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.total_steps = 1          # set by finetune() once the data size is known
        self.batches_per_epoch = 1
        self.history: list[dict[str, Any]] = []   # one entry per evaluated epoch
        self.on_epoch_evaluated = None            # callback(module) after each evaluation (writes the JSON)
        self._correct = self._seen = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        if self.train_transform is not None:
            micro_step = self.current_epoch * self.batches_per_epoch + batch_idx
            generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + micro_step * 7
                                                      + self.global_rank * 104_729 + 1)
            images = self.train_transform(images, generator=generator)
        logits = self.classifier(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.settings.label_smoothing)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {self.global_step} (epoch {self.current_epoch}); the last good "
                f"checkpoint is untouched: lower --base-lr or set --grad-clip, then rerun to resume")
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True)
        self.log("train_top1", (logits.argmax(1) == labels).float().mean(), on_step=True, on_epoch=True)
        self.log("lr", self.optimizers().param_groups[-1]["lr"], prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._correct = self._seen = 0

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        if self.eval_transform is not None:
            images = self.eval_transform(images)
        self._correct += int((self.classifier(images).argmax(1) == labels).sum())
        self._seen += labels.numel()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._seen:
            return
        top1 = self._correct / self._seen
        self.log("test_top1", top1, prog_bar=True)
        self.history.append({"epoch": self.current_epoch + 1, "step": self.global_step, "test_top1": top1})
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

    def results(self) -> dict[str, Any]:
        scores = [entry["test_top1"] for entry in self.history]
        return {"best_top1": max(scores) if scores else None, "last_top1": scores[-1] if scores else None,
                "history": list(self.history)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["leanmim"] = {
            "version": __version__, "config": self.run_config.to_dict(),
            "finetune": {"settings": dataclasses.asdict(self.settings), "source": self.source,
                         "num_classes": self.classifier.head.out_features, **self.results()}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint["leanmim"]["finetune"]["history"])


class FinetuneData(L.LightningDataModule):
    """Labelled train split in :class:`GlobalBatchSampler` order; the whole test split for evaluation."""

    def __init__(self, splits: LabelledSplits, settings: FinetuneConfig):
        super().__init__()
        self.splits, self.settings = splits, settings
        self.workers = 0 if splits.batch_transform is not None else min(4, os.cpu_count() or 1)

    def train_dataloader(self) -> DataLoader:
        sampler = GlobalBatchSampler(len(self.splits.train), self.settings.batch_size, self.settings.seed,
                                     self.trainer.global_rank, self.trainer.world_size)
        return DataLoader(self.splits.train, batch_sampler=sampler, num_workers=self.workers,
                          persistent_workers=self.workers > 0)

    def val_dataloader(self) -> DataLoader:
        # Every process evaluates the whole test split: exact, and the split is small next to training.
        return DataLoader(self.splits.test, batch_size=self.settings.batch_size, shuffle=False,
                          num_workers=self.workers, persistent_workers=self.workers > 0)


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


@dataclass
class FinetunedRun:
    config: RunConfig            # the pretraining run's (resolved) config
    settings: FinetuneConfig
    classifier: Classifier       # in eval mode, weights loaded
    checkpoint_path: Path
    results: dict[str, Any]


def load_finetuned(path: str | Path) -> FinetunedRun:
    """Rebuild the classifier of a fine-tuning output directory or checkpoint."""
    checkpoint_path = find_checkpoint(path)
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    entry = checkpoint.get("leanmim", {}) if isinstance(checkpoint, dict) else {}
    if "finetune" not in entry:
        raise ConfigError(f"'{checkpoint_path}' is not a fine-tuning checkpoint (made by 'leanmim finetune')")
    config = RunConfig.from_dict(entry["config"], source=str(checkpoint_path))
    settings = FinetuneConfig.from_dict(entry["finetune"]["settings"], source=str(checkpoint_path))
    encoder = prepare_encoder(build_method(config.method, config.model, config.options).encoder, 0.0)
    classifier = Classifier(encoder, entry["finetune"]["num_classes"], settings.token_drop)
    state = {key[len("classifier."):]: value for key, value in checkpoint["state_dict"].items()
             if key.startswith("classifier.")}
    try:
        classifier.load_state_dict(state)
    except RuntimeError:
        raise ConfigError(f"checkpoint '{checkpoint_path}' does not fit the {config.method}/{config.model.name} "
                          f"classifier: it was written by another version") from None
    results = {key: entry["finetune"].get(key) for key in ("best_top1", "last_top1", "history")}
    return FinetunedRun(config, settings, classifier.eval(), checkpoint_path, results)


def export_finetuned(path: str | Path, out: str | Path) -> Path:
    """Export a fine-tuned classifier: for a :class:`ViTEncoder`, timm ``VisionTransformer(global_pool='avg',
    num_classes=K)`` safetensors (encoder keys plus ``fc_norm.*`` and ``head.*``, no ``norm.*``); other encoders
    (relative positions) as their own state dict plus ``fc_norm.*`` / ``head.*``, architecture in the metadata."""
    from safetensors.torch import save_file

    from .export import timm_create_kwargs, timm_state_dict

    loaded = load_finetuned(path)
    classifier = loaded.classifier
    encoder = classifier.encoder
    if isinstance(encoder, ViTEncoder):
        state = timm_state_dict(encoder)
        metadata = {**timm_create_kwargs(loaded.config.model), "format": "timm.VisionTransformer"}
    else:
        state = {name: tensor.detach().float().contiguous().clone() for name, tensor in encoder.state_dict().items()}
        architecture = encoder.architecture() if hasattr(encoder, "architecture") else {}
        metadata = {**architecture, "format": f"leanmim.{type(encoder).__name__}+head", "final_norm": False}
    for prefix, module in (("fc_norm", classifier.fc_norm), ("head", classifier.head)):
        state.update({f"{prefix}.{name}": tensor.detach().float().contiguous().clone()
                      for name, tensor in module.state_dict().items()})
    metadata.update(global_pool="avg", num_classes=classifier.head.out_features, token_drop=classifier.token_drop)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata={key: str(value) for key, value in metadata.items()})
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------- entry point

def default_output_dir(source: Path) -> Path:
    """RUN_DIR/finetune for a run directory or a checkpoint inside RUN_DIR/checkpoints."""
    if source.is_dir():
        return source / "finetune"
    run_dir = source.parent.parent if source.parent.name == CHECKPOINT_DIR else source.parent
    return run_dir / "finetune"


def check_finetune_resume(out: Path, run_config: RunConfig) -> Path | None:
    """The last checkpoint in ``out`` when it continues this fine-tuning; ConfigError when it belongs elsewhere."""
    last = out / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not last.is_file():
        return None
    entry = read_finetune_entry(last)
    if entry is None:
        raise ConfigError(f"'{last}' is not a fine-tuning checkpoint: choose another --out")
    stored = RunConfig.from_dict(entry["config"], source=str(last))
    if stored.method != run_config.method or stored.model != run_config.model:
        raise ConfigError(f"'{out}' holds a fine-tuning of a {stored.method}/{stored.model.name} encoder, not of this "
                          f"{run_config.method}/{run_config.model.name} one: choose another --out")
    return last


def finetune(run: str | Path, settings: FinetuneConfig | None = None, callbacks=()) -> dict[str, Any]:
    """Fine-tune the encoder of a pretraining run (directory or checkpoint); resumes from ``OUT/checkpoints/last.ckpt``.

    Returns the results (also in ``OUT/finetune.json``; best and last accuracy in the run's ``summary.json``).
    """
    settings = settings or FinetuneConfig()
    source = Path(run)
    if read_finetune_entry(source) is not None:
        raise ConfigError(f"'{source}' is a fine-tuning result: pass the pretraining run directory or checkpoint")
    loaded = load_run(source)
    model = loaded.config.model
    out = Path(settings.out) if settings.out else default_output_dir(source)
    resume_from = check_finetune_resume(out, loaded.config)
    data = settings.data or loaded.config.data.path
    splits = build_labelled_splits(data, model.img_size, model.in_chans)

    train_transform = None
    if splits.batch_transform is not None:  # in-memory data: augment whole batches
        train_transform = BatchMIMAugment(model.img_size, splits.mean, splits.std,
                                          scale=(settings.min_scale_for(model.img_size), 1.0), hflip=settings.hflip)
    else:
        warnings.warn("images are streamed from disk: fine-tuning uses the evaluation transform (no augmentation)")
    out.mkdir(parents=True, exist_ok=True)
    trainer_config = RunConfig(loaded.config.method, model, DataConfig(path=data), settings.train_config(out),
                               loaded.config.options)

    L.seed_everything(settings.seed, workers=True, verbose=False)
    classifier = Classifier(prepare_encoder(initial_encoder(loaded, settings.from_scratch, settings.seed),
                                            settings.drop_path), splits.num_classes,
                            settings.token_drop).train()  # load_run leaves the encoder in eval mode; Lightning keeps modes
    module = FinetuneModule(classifier, settings, loaded.config, str(loaded.checkpoint_path), train_transform,
                            splits.batch_transform)
    trainer = build_trainer(trainer_config, out, callbacks)
    module.batches_per_epoch = len(splits.train) // (settings.batch_size * trainer.world_size)
    module.total_steps = settings.epochs * max(1, module.batches_per_epoch)

    def describe(current: FinetuneModule) -> dict[str, Any]:
        return {"source": str(loaded.checkpoint_path), "method": loaded.config.method, "model": model.name,
                "data": data, "out": str(out), "num_classes": splits.num_classes, "token_drop": settings.token_drop,
                "settings": dataclasses.asdict(settings), "precision": lightning_precision(trainer_config),
                **current.results()}

    module.on_epoch_evaluated = lambda current: write_json(out / RESULTS_FILE, describe(current))
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=FinetuneData(splits, settings), ckpt_path=resume_from, weights_only=True)
    results = {**describe(module), "resumed_from": str(resume_from) if resume_from else None,
               "global_step": trainer.global_step, "epochs_completed": trainer.current_epoch,
               "train_seconds_this_session": round(time.perf_counter() - started, 1)}
    if trainer.is_global_zero:
        write_json(out / RESULTS_FILE, results)
        run_dir = loaded.checkpoint_path.parent.parent
        if (run_dir / "config.yaml").is_file():
            write_summary(run_dir, {"finetune": {key: results[key] for key in
                                                 ("out", "best_top1", "last_top1", "epochs_completed", "token_drop")}})
    return results


def write_json(path: Path, values: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(values, indent=2))
    tmp.replace(path)
