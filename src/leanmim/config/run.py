"""One pretraining run's settings, and their YAML:



    method: mae
    model:   ModelConfig   (architecture, image geometry)
    data:    DataConfig    (where images come from, augmentation)
    train:   TrainConfig   (optimisation, precision, devices, checkpoints)
    options: the method's options dataclass (see ``leanmim methods``)

The YAML reader is bounded (no alias bombs) and every value is coerced to its field's type with a one-line error.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .fields import ConfigError, dataclass_from_dict, launched_by_cluster, option
from .model import ModelConfig


@dataclass
class DataConfig:
    path: str = option("fashion-mnist", "'fashion-mnist' or a directory of images (searched recursively)", cli="data")
    augment: bool = option(True, "MIM augmentation (RandomResizedCrop + flip); off: resize only")
    crop_min_scale: float = option(0.2, "smallest RandomResizedCrop area fraction")
    hflip: bool = option(True, "random horizontal flips")
    max_memory_gb: float = option(4.0, "hold the decoded dataset in memory when it fits in this many GiB")
    num_workers: int = option(2, "loader processes when images are streamed from disk")
    samples_per_epoch: int = option(0, "shards: samples per epoch (0: the shards' count from their manifest)")
    shuffle_buffer: int = option(5000, "shards: samples held in the shuffle buffer of each loader worker")

    def validate(self) -> None:
        if not str(self.path).strip():
            raise ConfigError("--data is empty: pass 'fashion-mnist' or a directory of images")
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ConfigError(f"crop_min_scale must lie in (0, 1] (the smallest crop's area fraction), "
                              f"got {self.crop_min_scale}")
        if not self.max_memory_gb >= 0:
            raise ConfigError(f"max_memory_gb must be 0 or more, got {self.max_memory_gb}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be 0 (load in the main process) or more, got {self.num_workers}")
        if self.samples_per_epoch < 0:
            raise ConfigError(f"samples_per_epoch must be 0 (the shards' own count) or more, got {self.samples_per_epoch}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"shuffle_buffer must be at least 1 sample, got {self.shuffle_buffer}")


@dataclass
class TrainConfig:
    out: str | None = option(None, "run directory (default: runs/<method>-<model>); an existing run there resumes")
    epochs: int = option(10, "training epochs (ignored when max_steps > 0)")
    max_steps: int = option(-1, "optimizer steps to train; overrides epochs when > 0")
    batch_size: int = option(256, "images per device per forward pass")
    accumulate_grad_batches: int = option(1, "forward passes per optimizer step")
    base_lr: float = option(1.5e-4, "learning rate per 256 images of effective batch")
    lr: float | None = option(None, "absolute learning rate (default: base_lr × effective_batch / 256)")
    min_lr: float = option(0.0, "learning rate at the end of the cosine schedule")
    warmup_fraction: float = option(0.05, "fraction of the steps spent in linear warmup (MAE: 40/800)")
    weight_decay: float = option(0.05, "AdamW weight decay (never on biases, norms, tokens)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float | None = option(None, "clip the gradient norm to this value")
    precision: str = option("auto", "bf16 (mixed), 32, or auto = bf16 where the hardware supports it",
                            choices=("auto", "bf16", "32"))
    accelerator: str = option("auto", "cpu, gpu or auto")
    devices: str = option("1", "devices per node (a number, or 'auto')")
    num_nodes: int = option(1, "nodes (start with torchrun or SLURM)")
    strategy: str = option("auto", "auto, ddp or fsdp (fsdp untested, see README)", choices=("auto", "ddp", "fsdp"))
    seed: int = option(0, "seed for weights, data order, augmentation and masking")
    compile: bool = option(False, "torch.compile the method")
    checkpoint_every_epochs: int = option(1, "write a periodic checkpoint every N epochs (0: only last)")
    keep_checkpoints: int = option(2, "periodic (per-epoch) checkpoints kept besides last.ckpt; older ones are "
                                      "deleted (-1: keep all)")
    checkpoint_every_steps: int = option(0, "also update last.ckpt every N optimizer steps, for exact mid-epoch "
                                            "resume (0: only at epoch ends)")
    extend: bool = option(False, "allow resuming this run with more epochs / max_steps (the warmup-cosine "
                                 "schedule is recomputed over the new length)")
    log_every_steps: int = option(10, "log metrics every N steps")
    progress_bar: bool = option(True, "show a progress bar")
    init_from: str | None = option(None, "start a new run from these weights: MAE reference .pth, timm .pth/"
                                         ".safetensors, transformers directory, leanmim run or export (ignored on "
                                         "resume)")
    logger: str = option("csv,tensorboard", "metrics loggers, comma-separated: csv, tensorboard, wandb, mlflow "
                                            "(wandb/mlflow: optional extras, offline unless configured)")


    def validate(self) -> None:
        """Range checks on the values as the user typed them (before any scaling)."""
        if self.epochs < 1 and self.max_steps <= 0:
            raise ConfigError(f"epochs must be at least 1 (or set max_steps), got {self.epochs}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps must be positive, or -1 to train by epochs; got {self.max_steps}")
        if self.batch_size < 1 or self.accumulate_grad_batches < 1:
            raise ConfigError(f"batch_size and accumulate_grad_batches must be at least 1, got "
                              f"{self.batch_size} and {self.accumulate_grad_batches}")
        for name in ("base_lr", "lr", "min_lr", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.lr is None and self.base_lr == 0:
            raise ConfigError("base_lr is 0: nothing would be learned; pass a positive --base-lr")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise ConfigError(f"warmup_fraction must lie in [0, 1] (a fraction of the steps), got {self.warmup_fraction}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be positive (or omitted), got {self.grad_clip}")
        if self.accelerator not in ("auto", "cpu", "gpu", "cuda", "mps", "tpu"):
            raise ConfigError(f"accelerator '{self.accelerator}' is not one of auto, cpu, gpu")
        if self.accelerator in ("gpu", "cuda"):
            import torch
            if not torch.cuda.is_available():
                raise ConfigError(f"--accelerator {self.accelerator} but no GPU is visible to torch: "
                                  f"use --accelerator cpu (or auto)")
        if not (str(self.devices) == "auto" or (str(self.devices).isdigit() and int(self.devices) >= 1)):
            raise ConfigError(f"devices must be a positive number or 'auto', got '{self.devices}'")
        if self.num_nodes < 1:
            raise ConfigError(f"num_nodes must be at least 1, got {self.num_nodes}")
        if self.num_nodes > 1 and not launched_by_cluster():
            raise ConfigError(f"--num-nodes {self.num_nodes} needs a launcher that starts one process per device on "
                              f"every node (torchrun --nnodes {self.num_nodes} ..., or srun under SLURM); started "
                              f"alone it would wait for the other nodes for ever")
        if self.seed < 0:
            raise ConfigError(f"seed must be 0 or more, got {self.seed}")
        for name in ("checkpoint_every_epochs", "checkpoint_every_steps", "log_every_steps"):
            if getattr(self, name) < 0 or (name == "log_every_steps" and getattr(self, name) == 0):
                raise ConfigError(f"{name} must be {'positive' if name == 'log_every_steps' else '0 or more'}, "
                                  f"got {getattr(self, name)}")
        if self.keep_checkpoints < -1:
            raise ConfigError(f"keep_checkpoints must be -1 (keep all), 0 or more, got {self.keep_checkpoints}")
        if self.strategy == "fsdp":
            warnings.warn("--strategy fsdp is passed to Lightning untested: sharded parameters with the EMA teachers "
                          "(pcae, ddae) and leanmim's checkpoints are not verified; --strategy ddp is tested")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    method: str = "mae"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train), "options": dict(self.options)}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "RunConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping with keys method, model, data, train, options")
        unknown = set(values) - {"method", "model", "data", "train", "options"}
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; "
                              f"allowed: method, model, data, train, options")
        sections = {name: dataclass_from_dict(section, values.get(name) or {}, f"{source}: {name}")
                    for name, section in SECTIONS.items()}
        options = values.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{source}: options must be a mapping")
        return cls(method=str(values.get("method", "mae")), options=dict(options), **sections)

    def save_yaml(self, path: Path) -> None:
        """Write atomically (a kill leaves the old file or the new one), and only when the text changes: a
        truncated or hand-damaged ``config.yaml`` is repaired by the next start of the run."""
        from ..files import atomic_write_text

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        path = Path(path)
        try:
            if path.is_file() and not path.is_symlink() and path.read_text() == text:
                return
        except (OSError, UnicodeDecodeError):
            pass
        atomic_write_text(path, text)

    @classmethod
    def load_yaml(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            values = yaml.load(path.read_text(), Loader=BoundedLoader)
        except AliasBomb as err:
            raise ConfigError(f"config file '{path}' {err}: write the values out instead of through aliases") from None
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{line}: fix the syntax") from None
        return cls.from_dict(values or {}, source=str(path))


MAX_YAML_NODES = 100_000  # nodes of a config once its aliases are expanded (a real config has a few hundred)


class AliasBomb(Exception):
    """A YAML document whose aliases expand beyond MAX_YAML_NODES nodes, or refer to themselves."""


class BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a document whose aliases expand past MAX_YAML_NODES nodes (a "billion
    laughs" bomb composes in microseconds as shared nodes, then explodes when the values are walked) or form a
    cycle. The expanded size is counted over the node graph once per distinct node (linear time)."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, {}, set())
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], active: set[int]) -> int:
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in active:
        raise AliasBomb("holds an alias that refers to itself")
    active.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, sizes, active) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, active) + _expanded_size(v, sizes, active) for k, v in node.value)
    active.discard(key)
    if size > MAX_YAML_NODES:
        raise AliasBomb(f"expands to more than {MAX_YAML_NODES} values through YAML aliases (an alias bomb?)")
    sizes[key] = size
    return size
