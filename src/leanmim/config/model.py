"""ModelConfig: the ViT encoder and decoder sizes, the presets (``vit_tiny_patch4`` …) and the timm model names
``--model`` accepts (read from timm's own registry, without building a model).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from .fields import ConfigError, ImageSize, format_img_size, image_hw, option, parse_img_size

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
    if patch[0] != patch[1]:
        return f"--model {name} has non-square patches {patch[0]}x{patch[1]}: leanmim's patches are square"
    block = model.blocks[0]
    return {"patch_size": int(patch[0]), "embed_dim": int(model.embed_dim), "depth": len(model.blocks),
            "num_heads": int(block.attn.num_heads),
            "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
            "in_chans": int(model.patch_embed.proj.in_channels),
            "img_size": parse_img_size(list(model.patch_embed.img_size))}


# Stochastic depth of a method's released pretraining recipe, (encoder, decoder), where it is not 0: PCAE's
# main_pretrain.py defaults to --drop_path 0.25, rising linearly over the student encoder's blocks and the same
# 0.25 in every decoder block (its teacher has none). MAE, LoMaR: 0. Used for --drop-path / --decoder-drop-path
# left unset (None).
RECIPE_DROP_PATH: dict[str, tuple[float, float]] = {"pcae": (0.25, 0.25)}
DROP_PATH_DEFAULTS = ", ".join(f"{method} {encoder}" for method, (encoder, _) in RECIPE_DROP_PATH.items())
DECODER_DROP_PATH_DEFAULTS = ", ".join(f"{method} {decoder}" for method, (_, decoder) in RECIPE_DROP_PATH.items())


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
    img_size: ImageSize | None = option(None, "input image size in pixels: N (square) or HEIGHTxWIDTH such as 64x96 "
                                              "(default: the data's native size, else the timm model's, else 224)")
    patch_size: int | None = option(None, "patch size in pixels (default: the preset's)")
    in_chans: int | None = option(None, "image channels, 1 or 3 (default: the data's)")
    embed_dim: int | None = option(None, "encoder width (default: the preset's)")
    depth: int | None = option(None, "encoder blocks (default: the preset's)")
    num_heads: int | None = option(None, "encoder attention heads (default: the preset's)")
    mlp_ratio: float = option(4.0, "MLP hidden width / token width")
    decoder_embed_dim: int | None = option(None, "decoder width (default: min(encoder width, 512); MAE: 512)")
    decoder_depth: int | None = option(None, "decoder blocks (default: 8 at width 512 as MAE, else 4)")
    decoder_num_heads: int | None = option(None, "decoder attention heads (default: width / 32, MAE's head size)")
    drop_path: float | None = option(None, "stochastic depth of the encoder, rising linearly over its blocks to this "
                                           f"rate at the last (default: the method's released recipe: "
                                           f"{DROP_PATH_DEFAULTS}, the others 0)")
    decoder_drop_path: float | None = option(None, "stochastic depth of every decoder block, the same rate in each "
                                                   f"(default: the method's released recipe: "
                                                   f"{DECODER_DROP_PATH_DEFAULTS}, the others 0)")

    def __post_init__(self) -> None:
        if self.img_size is not None:  # 224 / "64x96" / (64, 96) -> 224 or [64, 96]; a bad value is one line
            self.img_size = parse_img_size(self.img_size)

    def with_method_defaults(self, method: str) -> "ModelConfig":
        """This configuration with ``drop_path`` and ``decoder_drop_path`` left at None set to ``method``'s released
        recipe (:data:`RECIPE_DROP_PATH`; 0 for a method without one). Values the user gave are kept."""
        encoder, decoder = RECIPE_DROP_PATH.get(method, (0.0, 0.0))
        return dataclasses.replace(
            self, drop_path=encoder if self.drop_path is None else self.drop_path,
            decoder_drop_path=decoder if self.decoder_drop_path is None else self.decoder_drop_path)

    def resolved(self, native_img_size: int | None = None, native_chans: int | None = None,
                 method: str | None = None) -> "ModelConfig":
        """Fill the ``None`` fields from the preset and the data (and, given the ``method``, the drop path rates
        from its recipe: :meth:`with_method_defaults`), and validate the geometry."""
        preset: dict[str, Any] = dict(MODEL_PRESETS.get(self.name) or model_from_timm_name(self.name))
        values = dataclasses.asdict(self)
        for key, default in preset.items():
            if key in ("img_size", "in_chans", "mlp_ratio"):
                continue  # a timm name's image size and channels are defaults below the user's and the data's
            if values[key] is None:
                values[key] = default
        if "mlp_ratio" in preset and self.mlp_ratio == 4.0:  # the field's default: the timm model's ratio
            values["mlp_ratio"] = preset["mlp_ratio"]
        values["img_size"] = values["img_size"] or native_img_size or preset.get("img_size") or 224  # parsed by ModelConfig()
        if "in_chans" in preset and values["in_chans"] is None and native_chans is None:
            values["in_chans"] = preset["in_chans"]
        values["in_chans"] = values["in_chans"] or native_chans or 3
        values.update({key: value for key, value in default_decoder(values["embed_dim"]).items() if values[key] is None})
        model = ModelConfig(**values)
        if method is not None:
            model = model.with_method_defaults(method)
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
        for key in ("patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
                    "decoder_depth", "decoder_num_heads"):
            value = getattr(self, key)
            if value is not None and value <= 0 and not (key == "decoder_depth" and value == 0):
                raise ConfigError(f"{key} must be positive, got {value}")
        size = format_img_size(self.img_size)
        if any(side % self.patch_size for side in self.img_hw):
            raise ConfigError(f"image size {size} is not divisible by patch size {self.patch_size}: "
                              f"choose --img-size (each side) as a multiple of --patch-size")
        if self.embed_dim % self.num_heads or self.decoder_embed_dim % self.decoder_num_heads:
            raise ConfigError("embed_dim must be divisible by num_heads (and decoder_embed_dim by decoder_num_heads)")
        if self.embed_dim % 4 or self.decoder_embed_dim % 4:
            raise ConfigError("embed_dim and decoder_embed_dim must be multiples of 4 (2D sin-cos position embedding)")
        if self.num_patches < 2:
            raise ConfigError(f"image size {size} with patch size {self.patch_size} gives a single patch, so "
                              f"nothing can be masked and reconstructed: use a patch size at most half the image size")
        for key in ("drop_path", "decoder_drop_path"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"{key} must lie in [0, 1), got {value}")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"mlp_ratio must be positive, got {self.mlp_ratio}")

    @property
    def img_hw(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return image_hw(self.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid."""
        height, width = self.img_hw
        return (height // self.patch_size, width // self.patch_size)

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid_size
        return rows * cols

    @property
    def patch_dim(self) -> int:
        """p²·C, the length of a flattened pixel patch."""
        return self.patch_size ** 2 * self.in_chans


def model_from_timm_name(name: str) -> dict[str, Any]:
    """ModelConfig defaults for a timm plain-ViT name (see :func:`timm_vit_architecture`); one-line error else."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"--model is empty: choose a preset ({', '.join(MODEL_PRESETS)}) or a timm ViT name")
    return timm_vit_architecture(name)
