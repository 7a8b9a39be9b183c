"""Typed run configuration: defaults, validation, YAML in and out, CLI flag generation.

A run is described by four sections plus the method's own options:

    method: mae
    model:   ModelConfig   (architecture, image geometry)
    data:    DataConfig    (where images come from, augmentation)
    train:   TrainConfig   (optimisation, precision, devices, checkpoints)
    options: the method's options dataclass (see ``leanmim methods``)

Every field is also a CLI flag: ``--field-name`` (``model.name`` is ``--model``,
``data.path`` is ``--data``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad setting; its message is one line that says what is wrong and how to fix it."""


def option(default: Any, help: str, cli: str | None = None, choices: tuple | None = None):
    """A config field with a one-line meaning (shown by ``--help`` and ``leanmim methods``)."""
    return field(default=default, metadata={"help": help, "cli": cli, "choices": choices})


# Encoder presets by timm-style name: (patch_size, embed_dim, depth, num_heads).
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "vit_tiny_patch16": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


class _TimmNames(dict):
    """Preset -> the timm model it exports to; a timm plain-ViT name (``--model vit_base_patch16_224``) maps to
    itself."""

    def __missing__(self, name: str) -> str:
        if name in self.values() or timm_vit_architecture(name, check=False) is not None:
            return name
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or (isinstance(name, str) and name in self.values()) or (
            isinstance(name, str) and timm_vit_architecture(name, check=False) is not None)


# The timm model each preset exports to (``timm.create_model`` name).
TIMM_NAMES = _TimmNames({
    "vit_tiny_patch16": "vit_tiny_patch16_224",
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
    "vit_huge_patch14": "vit_huge_patch14_224",
})
# timm names checked to build a plain ViT (tests/test_first_contact.py); any other plain one is accepted too.
TIMM_EXAMPLES = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
                 "vit_huge_patch14_224", "vit_base_patch32_224", "vit_base_patch16_384", "deit_tiny_patch16_224",
                 "deit_small_patch16_224", "deit_base_patch16_224")
MODEL_HELP = (f"encoder: a preset ({', '.join(MODEL_PRESETS)}) or a timm name that builds a plain ViT (patch "
              f"embedding, blocks, absolute positions), e.g. {', '.join(TIMM_EXAMPLES[2:3] + TIMM_EXAMPLES[7:8])}; "
              f"its width, depth, heads, MLP ratio, patch and image size are taken, no weights downloaded")

_TIMM_CACHE: dict[str, dict[str, Any] | str] = {}


def timm_vit_architecture(name: str, check: bool = True) -> dict[str, Any] | None:
    """The architecture of timm model ``name`` as ModelConfig fields (patch_size, embed_dim, depth, num_heads,
    mlp_ratio, img_size, in_chans), read from the model timm builds on the meta device (no weights, no download).

    A name timm does not know, or a model that is not a plain ViT (leanmim's encoder: patch embedding, pre-norm
    blocks with a plain MLP, a class token and absolute position embeddings), raises a one-line ConfigError
    (``check``) or returns None.
    """
    if name not in _TIMM_CACHE:
        _TIMM_CACHE[name] = _read_timm_vit(name)
    found = _TIMM_CACHE[name]
    if isinstance(found, str):
        if check:
            raise ConfigError(found)
        return None
    return dict(found)


def _read_timm_vit(name: str) -> dict[str, Any] | str:
    """The architecture dict, or the reason (one line) why ``name`` is not usable."""
    import timm
    import torch
    from timm.layers import Attention, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    presets = ", ".join(MODEL_PRESETS)
    if not timm.is_model(name):
        return (f"unknown model '{name}': choose a preset ({presets}) or a timm ViT name such as "
                f"vit_base_patch16_224 or deit_tiny_patch16_224 (see 'leanmim methods')")
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception as err:  # noqa: BLE001 - any failure of timm's constructor is one line
        return f"--model {name}: timm could not build it ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    why = None
    if type(model) is not VisionTransformer:
        why = f"it is a {type(model).__name__}, not timm's plain VisionTransformer"
    elif model.pos_embed is None or getattr(model, "no_embed_class", False):
        why = "it has no absolute position embedding over the class token and patches"
    elif model.cls_token is None or getattr(model, "num_reg_tokens", 0):
        why = "it has no class token, or has register tokens"
    elif type(model.patch_embed) is not PatchEmbed or not isinstance(model.patch_embed.norm, torch.nn.Identity):
        why = "its patch embedding is not a plain convolution"
    elif not isinstance(model.norm_pre, torch.nn.Identity):
        why = "it normalises the tokens before the blocks (CLIP-style)"
    else:
        block = model.blocks[0]
        if not all(type(b) is Block for b in model.blocks) or type(block.attn) is not Attention:
            why = "its blocks are not plain ViT blocks"
        elif not isinstance(block.ls1, torch.nn.Identity) or not isinstance(block.attn.q_norm, torch.nn.Identity):
            why = "its blocks use layer scale or q/k normalisation"
        elif type(block.mlp) is not Mlp or not isinstance(block.mlp.act, torch.nn.GELU) or block.attn.qkv.bias is None:
            why = "its blocks use another MLP (SwiGLU, ...) or no qkv bias"
        elif not isinstance(block.norm1, torch.nn.LayerNorm):
            why = "its blocks use another normalisation than LayerNorm"
    if why:
        return (f"--model {name} is not a plain ViT ({why}); leanmim's encoder is one: use a preset ({presets}) "
                f"or e.g. vit_base_patch16_224, deit_tiny_patch16_224")
    patch = model.patch_embed.patch_size
    height, width = model.patch_embed.img_size
    if patch[0] != patch[1]:
        return f"--model {name} has non-square patches {patch[0]}x{patch[1]}: leanmim's patches are square"
    block = model.blocks[0]
    return {"patch_size": int(patch[0]), "embed_dim": int(model.embed_dim), "depth": len(model.blocks),
            "num_heads": int(block.attn.num_heads),
            "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
            "in_chans": int(model.patch_embed.proj.in_channels),
            **({"img_size": int(height)} if height == width else {})}  # non-square: the data's size or 224


def default_decoder(embed_dim: int) -> dict[str, int]:
    """The decoder fitted to the encoder: MAE's 512 × 8 (16 heads) from width 512 up (ViT-B/L/H); narrower encoders
    get a decoder as wide as themselves with 4 blocks, heads of 32 channels — about 1/3 of the encoder's per-token
    cost for a 12-block encoder, as MAE's ViT-B decoder (8·512² / 12·768² ≈ 0.30)."""
    width = min(embed_dim, 512)
    heads = max(1, width // 32)
    while width % heads:
        heads -= 1
    return {"decoder_embed_dim": width, "decoder_depth": 8 if width == 512 else 4, "decoder_num_heads": heads}


@dataclass
class ModelConfig:
    name: str = option("vit_tiny_patch16", MODEL_HELP, cli="model")
    img_size: int | None = option(None, "input image size in pixels (default: the data's native size, else 224)")
    patch_size: int | None = option(None, "patch size in pixels (default: the preset's)")
    in_chans: int | None = option(None, "image channels, 1 or 3 (default: the data's)")
    embed_dim: int | None = option(None, "encoder width (default: the preset's)")
    depth: int | None = option(None, "encoder blocks (default: the preset's)")
    num_heads: int | None = option(None, "encoder attention heads (default: the preset's)")
    mlp_ratio: float = option(4.0, "MLP hidden width / token width")
    decoder_embed_dim: int | None = option(None, "decoder width (default: min(encoder width, 512); MAE: 512)")
    decoder_depth: int | None = option(None, "decoder blocks (default: 8 at width 512 as MAE, else 4)")
    decoder_num_heads: int | None = option(None, "decoder attention heads (default: width / 32, MAE's head size)")
    drop_path: float = option(0.0, "stochastic depth rate of the encoder")

    def resolved(self, native_img_size: int | None = None, native_chans: int | None = None) -> "ModelConfig":
        """Fill the ``None`` fields from the preset and the data, and validate the geometry."""
        preset: dict[str, Any] = dict(MODEL_PRESETS.get(self.name) or model_from_timm_name(self.name))
        values = dataclasses.asdict(self)
        for key, default in preset.items():
            if key in ("img_size", "in_chans", "mlp_ratio"):
                continue  # a timm name's image size and channels are defaults below the user's and the data's
            if values[key] is None:
                values[key] = default
        if "mlp_ratio" in preset and self.mlp_ratio == 4.0:  # the field's default: the timm model's ratio
            values["mlp_ratio"] = preset["mlp_ratio"]
        values["img_size"] = values["img_size"] or native_img_size or preset.get("img_size") or 224
        if "in_chans" in preset and values["in_chans"] is None and native_chans is None:
            values["in_chans"] = preset["in_chans"]
        values["in_chans"] = values["in_chans"] or native_chans or 3
        values.update({key: value for key, value in default_decoder(values["embed_dim"]).items() if values[key] is None})
        model = ModelConfig(**values)
        model.validate()
        if model.decoder_depth * model.decoder_embed_dim ** 2 > model.depth * model.embed_dim ** 2:
            warnings.warn(f"the decoder ({model.decoder_embed_dim} wide, {model.decoder_depth} blocks) costs more per "
                          f"token than the encoder ({model.embed_dim} wide, {model.depth} blocks); MAE's ViT-B decoder "
                          f"costs 0.3x its encoder per token: consider a smaller --decoder-embed-dim/--decoder-depth "
                          f"(see 'leanmim cost')")
        return model

    def validate(self) -> None:
        if self.in_chans not in (1, 3):
            raise ConfigError(f"in_chans must be 1 or 3, got {self.in_chans}")
        for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
                    "decoder_depth", "decoder_num_heads"):
            value = getattr(self, key)
            if value is not None and value <= 0 and not (key == "decoder_depth" and value == 0):
                raise ConfigError(f"{key} must be positive, got {value}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"image size {self.img_size} is not divisible by patch size {self.patch_size}: "
                              f"choose --img-size as a multiple of --patch-size")
        if self.embed_dim % self.num_heads or self.decoder_embed_dim % self.decoder_num_heads:
            raise ConfigError("embed_dim must be divisible by num_heads (and decoder_embed_dim by decoder_num_heads)")
        if self.embed_dim % 4 or self.decoder_embed_dim % 4:
            raise ConfigError("embed_dim and decoder_embed_dim must be multiples of 4 (2D sin-cos position embedding)")
        if self.img_size // self.patch_size < 2:
            raise ConfigError(f"image size {self.img_size} with patch size {self.patch_size} gives a single patch, so "
                              f"nothing can be masked and reconstructed: use a patch size at most half the image size")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"drop_path must lie in [0, 1), got {self.drop_path}")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"mlp_ratio must be positive, got {self.mlp_ratio}")

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size // self.patch_size, self.img_size // self.patch_size)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        """p²·C, the length of a flattened pixel patch."""
        return self.patch_size ** 2 * self.in_chans


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


def launched_by_cluster() -> bool:
    """Whether this process was started by torchrun (``WORLD_SIZE``, ``TORCHELASTIC_RUN_ID``) or by SLURM's srun
    (``SLURM_NTASKS`` and ``SLURM_PROCID``): the launchers Lightning detects for multi-node runs."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or "WORLD_SIZE" in env or ("SLURM_NTASKS" in env and "SLURM_PROCID" in env)


def as_user_meant(path: str | None) -> str | None:
    """A path the user typed, made absolute against the current directory when it names something on disk (or a
    shard pattern in an existing directory), so that a run's ``config.yaml`` works from any directory; names such
    as ``fashion-mnist`` and URLs are kept as typed. ``~`` is expanded."""
    if path is None or "://" in str(path):
        return path
    expanded = os.path.expanduser(str(path))
    parent = os.path.dirname(expanded)
    if os.path.exists(expanded) or (parent and os.path.isdir(parent)):
        return os.path.abspath(expanded)
    return path


def model_from_timm_name(name: str) -> dict[str, Any]:
    """ModelConfig defaults for a timm plain-ViT name (see :func:`timm_vit_architecture`); one-line error else."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"--model is empty: choose a preset ({', '.join(MODEL_PRESETS)}) or a timm ViT name")
    return timm_vit_architecture(name)


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
        from .run import atomic_write_text

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


def field_type(annotation: Any) -> type:
    """The concrete scalar type of a field annotation such as ``int | None``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing})  # annotations are strings under `from __future__`
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert ``value`` to the field's type, or raise a one-line ConfigError."""
    kind = field_type(annotation)
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "yes", "1", "on"):
            return True
        if str(value).lower() in ("false", "no", "0", "off"):
            return False
    elif kind is tuple or kind is list:
        return list(value) if isinstance(value, (list, tuple)) else [int(v) for v in str(value).split(",") if v]
    else:
        try:
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return kind(value)
        except (TypeError, ValueError):
            pass
    raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")


def dataclass_from_dict(cls: type, values: dict[str, Any], source: str):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and checking types and choices."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(fields)}")
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = coerce(value, fields[key].type, f"{source}.{key}")
        choices = fields[key].metadata.get("choices")
        if choices and kwargs[key] not in choices:
            raise ConfigError(f"{source}.{key}: '{kwargs[key]}' is not one of {', '.join(map(str, choices))}")
    return cls(**kwargs)


# Fine-tuning settings live here, torch-free, so that `leanmim finetune --help` starts instantly;
# leanmim.finetune uses them (and re-exports FinetuneConfig).
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

    def min_scale_for(self, img_size: int) -> float:
        if self.crop_min_scale is not None:
            return self.crop_min_scale
        return 0.08 if img_size >= 128 else 0.5

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
