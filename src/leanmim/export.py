"""Export a pretrained encoder as safetensors in timm's ``VisionTransformer`` key layout.

Load it with::

    timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=10, img_size=28, patch_size=4,
                      in_chans=1, pretrained_cfg_overlay=dict(file="encoder.safetensors"))
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import TIMM_NAMES, ConfigError, ModelConfig
from .encoder import ViTEncoder


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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {key: str(value) for key, value in timm_create_kwargs(model).items()}
    metadata["format"] = "timm.VisionTransformer"
    tmp = out.with_name(out.name + ".tmp")
    save_file(timm_state_dict(encoder), str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out
