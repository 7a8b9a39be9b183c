"""FinetuneConfig: the fine-tuning recipe (MAE's by default; see :mod:`leanmim.train.finetune`), and its checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fields import ConfigError, ImageSize, dataclass_from_dict, image_hw, option, parse_img_size
from .run import TrainConfig

# Fine-tuning settings live here, torch-free, so that `leanmim finetune --help` starts instantly;
# leanmim.train.finetune uses them.
POOLS = ("mean", "cls", "tokens")
AUTO_AUGMENTS = ("none", "randaugment", "trivialaugment")


@dataclass
class FinetuneConfig:
    """Every setting of ``leanmim finetune`` (one flag each)."""

    out: str | None = option(None, "output directory (default: RUN_DIR/finetune); a last checkpoint there resumes")
    data: str | None = option(None, "labelled data with train/test splits (default: the run's data)", cli="data")
    val_fraction: float = option(0.1, "fraction of each class of the training split held out to select the epoch "
                                      "(ignored when DATA has train/, val/ and test/ folders: val/ is used)")
    split_seed: int = option(0, "seed of the validation split and of the label subset")
    labels_per_class: int | None = option(None, "train on this many labelled images per class (after the "
                                                "validation split; label efficiency)")
    label_fraction: float | None = option(None, "train on this fraction of each class's labelled images (after "
                                                "the validation split; label efficiency)")
    epochs: int = option(10, "fine-tuning epochs (MAE: 100 on ImageNet)")
    val_every_epochs: int = option(1, "measure validation top-1 (and select) every N epochs, and after the last")
    batch_size: int = option(256, "images per device per step")
    base_lr: float = option(5e-4, "learning rate per 256 images (MAE ViT-B: 5e-4)")
    lr: float | None = option(None, "absolute learning rate (default: base_lr × batch / 256)")
    min_lr: float = option(1e-6, "learning rate at the end of the cosine schedule")
    warmup_fraction: float = option(0.05, "fraction of the steps in linear warmup (MAE: 5 of 100 epochs)")
    weight_decay: float = option(0.05, "AdamW weight decay (never on biases, norms, tokens)")
    layer_decay: float = option(0.75, "layer-wise lr decay: block i of N gets lr × decay^(N + 1 − i) (MAE ViT-B: 0.65)")
    drop_path: float = option(0.1, "stochastic depth rate of the last block (rising linearly from 0)")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy (also of mixup's targets)")
    pool: str = option("mean", "head: mean of patch tokens + fc_norm (MAE), cls token, or all patch tokens "
                               "flattened (keeps the layout)", choices=POOLS)
    mixup: float = option(0.0, "mixup alpha (timm Mixup; MAE: 0.8; 0: off)")
    cutmix: float = option(0.0, "cutmix alpha (timm Mixup; MAE: 1.0; 0: off); with --mixup, one of the two per "
                                "batch")
    auto_augment: str = option("none", "per-image augmentation policy from torchvision (MAE: RandAugment m9 n2)",
                               choices=AUTO_AUGMENTS)
    random_erasing: float = option(0.0, "probability of erasing a random box with per-pixel noise (timm; MAE: 0.25)")
    ema_decay: float = option(0.0, "exponential moving average of the weights (timm ModelEmaV3, with warmup); "
                                   "the average is evaluated, selected and exported (0: off)")
    token_drop: float = option(0.0, "token compression (PCAE) at fine-tuning and evaluation: drop ratio per stage")
    from_scratch: bool = option(False, "ignore the pretrained weights: the run's architecture freshly initialised "
                                "(seeded by --seed), i.e. the supervised baseline under the same recipe")
    init_from: str | None = option(None, "fine-tune published weights instead of a leanmim run (MAE reference .pth, "
                                         "timm .pth/.safetensors, transformers directory); architecture from the file")
    num_heads: int | None = option(None, "encoder attention heads of --init-from weights whose file does not state "
                                         "them (default: the file's, else the preset's of that width, with a note)")
    img_size: ImageSize | None = option(None, "fine-tune at this image size in pixels, N or HEIGHTxWIDTH (default: the "
                                              "pretraining's); the position table is resized as when loading, the "
                                              "data are read at this size")
    crop_min_scale: float | None = option(None, "smallest RandomResizedCrop area (default: 0.08 from 128 px up, else 0.5)")
    hflip: bool = option(True, "random horizontal flips")
    eval_hflip: bool = option(False, "test-time mirror averaging: validate and test on the mean softmax of each image and "
                              "its mirror image, so the epoch is also selected with it (off: the MAE protocol)")
    grad_clip: float | None = option(None, "clip the gradient norm to this value")
    precision: str = option("auto", "bf16 (mixed), 32, or auto = bf16 where the hardware supports it",
                            choices=("auto", "bf16", "32"))
    accelerator: str = option("auto", "cpu, gpu or auto")
    devices: str = option("1", "devices (a number, or 'auto')")
    seed: int = option(0, "seed for the head, data order and augmentation")
    log_every_steps: int = option(10, "log metrics every N steps")
    progress_bar: bool = option(True, "show a progress bar")
    extend: bool = option(False, "allow resuming this fine-tuning with more epochs (the warmup-cosine schedule is "
                                 "recomputed over the new length)")

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.val_every_epochs < 1:
            raise ConfigError("finetune: epochs, batch_size and val_every_epochs must be at least 1")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"layer_decay must lie in (0, 1], got {self.layer_decay}")
        for name in ("drop_path", "label_smoothing", "token_drop", "ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must lie in (0, 1), got {self.val_fraction}: the epoch is selected "
                              f"on the validation split, never on the test split")
        if self.labels_per_class is not None and self.label_fraction is not None:
            raise ConfigError("give --labels-per-class or --label-fraction, not both")
        if self.labels_per_class is not None and self.labels_per_class < 1:
            raise ConfigError(f"labels_per_class must be at least 1, got {self.labels_per_class}")
        if self.label_fraction is not None and not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"label_fraction must lie in (0, 1], got {self.label_fraction}")
        if self.num_heads is not None and self.num_heads < 1:
            raise ConfigError(f"num_heads must be at least 1, got {self.num_heads}")
        if self.img_size is not None:
            self.img_size = parse_img_size(self.img_size)   # one line for 0, -3, 64x0, 1.5
        if self.crop_min_scale is not None and not 0.0 < self.crop_min_scale <= 1.0:
            raise ConfigError(f"crop_min_scale must lie in (0, 1], got {self.crop_min_scale}")
        if not (math.isfinite(self.mixup) and math.isfinite(self.cutmix) and self.mixup >= 0 and self.cutmix >= 0):
            raise ConfigError(f"mixup and cutmix are Beta alphas: 0 (off) or positive, got {self.mixup}, {self.cutmix}")
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ConfigError(f"random_erasing is a probability in [0, 1], got {self.random_erasing}")
        if self.mixes and self.batch_size % 2:
            raise ConfigError(f"mixup/cutmix pair each image with the batch reversed: use an even --batch-size "
                              f"(got {self.batch_size})")
        if self.pool == "tokens" and self.token_drop > 0:
            raise ConfigError("--pool tokens needs every patch token: drop --token-drop or use --pool mean/cls")

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "finetune") -> "FinetuneConfig":
        return dataclass_from_dict(cls, values, source)

    def min_scale_for(self, img_size) -> float:
        """--crop-min-scale, else 0.08 from 128 px up (the shorter side), else 0.5."""
        if self.crop_min_scale is not None:
            return self.crop_min_scale
        return 0.08 if min(image_hw(img_size)) >= 128 else 0.5

    def validate(self) -> None:
        """The checks pretraining makes on the shared settings (learning rates, weight decay, warmup, grad clip,
        accelerator, devices, seed), made before anything is read or written. Not in ``__post_init__``: a stored
        fine-tuning made on a GPU must still load for evaluation on a CPU."""
        self.train_config(Path(self.out or ".")).validate()

    def train_config(self, out: Path) -> TrainConfig:
        """The engine's view of these settings (for ``build_trainer`` and ``lightning_precision``)."""
        return TrainConfig(out=str(out), epochs=self.epochs, batch_size=self.batch_size, base_lr=self.base_lr,
                           lr=self.lr, min_lr=self.min_lr, warmup_fraction=self.warmup_fraction,
                           weight_decay=self.weight_decay, beta1=0.9, beta2=0.999, grad_clip=self.grad_clip,
                           precision=self.precision, accelerator=self.accelerator, devices=self.devices,
                           seed=self.seed, checkpoint_every_epochs=0, log_every_steps=self.log_every_steps,
                           progress_bar=self.progress_bar)
