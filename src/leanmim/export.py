"""Export a pretrained encoder as safetensors in timm's ``VisionTransformer`` key layout.

Load it with::

    timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=10, img_size=28, patch_size=4,
                      in_chans=1, pretrained_cfg_overlay=dict(file="encoder.safetensors"))

Encoders with relative positions (LoMaR's ``RelPosViTEncoder``) have no timm counterpart: they are
written with their own key layout and rebuilt by :func:`load_relpos_encoder`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import TIMM_NAMES, ConfigError, ModelConfig
from .encoder import ViTEncoder
from .relpos import RelPosViTEncoder


def timm_state_dict(encoder: ViTEncoder) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm's names; ``pos_embed`` gets timm's (1, 1 + L, D) shape with a zero cls row."""
    state = {name: tensor.detach().float().contiguous().clone() for name, tensor in encoder.state_dict().items()}
    cls_row = torch.zeros(1, encoder.embed_dim)
    state["pos_embed"] = torch.cat([cls_row, encoder.pos_embed.float()], dim=0).unsqueeze(0).contiguous()
    return state


def timm_create_kwargs(model: ModelConfig) -> dict:
    """Arguments that make ``timm.create_model`` build the matching architecture."""
    if model.name not in TIMM_NAMES:
        raise ConfigError(f"model '{model.name}' has no timm counterpart")
    return dict(model_name=TIMM_NAMES[model.name], img_size=model.img_size, patch_size=model.patch_size,
                in_chans=model.in_chans, embed_dim=model.embed_dim, depth=model.depth, num_heads=model.num_heads,
                mlp_ratio=model.mlp_ratio)


def export_encoder(encoder: ViTEncoder, model: ModelConfig, out: str | Path) -> Path:
    """Write the encoder (atomically) to ``out``; the metadata records how to rebuild it in timm."""
    if isinstance(encoder, RelPosViTEncoder):
        return export_relpos_encoder(encoder, out)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {key: str(value) for key, value in timm_create_kwargs(model).items()}
    metadata["format"] = "timm.VisionTransformer"
    tmp = out.with_name(out.name + ".tmp")
    save_file(timm_state_dict(encoder), str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out


RELPOS_FORMAT = "leanmim.RelPosViTEncoder"


def export_relpos_encoder(encoder: RelPosViTEncoder, out: str | Path) -> Path:
    """Write a relative-position encoder's state dict (atomically); the metadata holds its architecture."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {key: str(value) for key, value in encoder.architecture().items()}
    metadata["format"] = RELPOS_FORMAT
    state = {name: tensor.detach().float().contiguous().clone() for name, tensor in encoder.state_dict().items()}
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out


def load_relpos_encoder(path: str | Path, img_size: int | None = None) -> RelPosViTEncoder:
    """Rebuild an exported ``RelPosViTEncoder``, optionally for another ``img_size`` (same weights: no absolute
    position embedding, and the relative buckets saturate)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != RELPOS_FORMAT:
            raise ConfigError(f"'{path}' is not a {RELPOS_FORMAT} export (format: {metadata.get('format')})")
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    sizes = {key: int(metadata[key]) for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")}
    if img_size is not None:
        sizes["img_size"] = img_size
    # exports written before the "relative_term" key existed used the "scaled" form
    encoder = RelPosViTEncoder(**sizes, mlp_ratio=float(metadata["mlp_ratio"]),
                               relative_term=metadata.get("relative_term", "scaled"))
    encoder.load_state_dict(state)
    return encoder
