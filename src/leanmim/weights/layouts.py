"""Every weights layout leanmim reads or writes, as a small key mapping to one canonical layout.

The canonical layout is the MAE reference's (facebookresearch/mae ``models_mae.py``), whose encoder
names are timm's ``VisionTransformer`` names::

    patch_embed.proj.{weight,bias}  cls_token (1, 1, D)  pos_embed (1, 1 + L, D)  norm.*
    blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*
    decoder_embed.*  mask_token (1, 1, D_d)  decoder_pos_embed (1, 1 + L, D_d)  decoder_norm.*  decoder_pred.*
    decoder_blocks.i.* (as blocks.i.*)

Each layout is a small key mapping to it:

- MAE reference checkpoint (``{"model": …}``) and timm ViT state dicts (.pth / .safetensors): canonical already;
- transformers ``ViTMAEForPreTraining`` / ``ViTMAEModel`` / ``ViTModel`` directories: :data:`HF_RENAMES`, with
  the separate q/k/v projections fused into ``qkv`` (both the 4.x names files hold and the 5.x in-memory names);
- leanmim: a method's modules (``ViTEncoder`` keeps ``pos_embed`` (L, D) without the cls row;
  ``MaskedDecoder`` names in :data:`DECODER_NAMES`); its runs, checkpoints and exports.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from ..config import ConfigError
from ..parts.decoder import MaskedDecoder
from ..parts.encoder import ViTEncoder

# Keys a classifier or a wrapper adds that no pretraining encoder uses: ignored when reading.
IGNORED = re.compile(r"^(head|fc_norm|pooler|classifier|embeddings\.mask_token)(\.|$)")

# transformers -> canonical, applied in order to every key (4.x file names and 5.x module names alike).
HF_RENAMES: list[tuple[str, str]] = [
    (r"^vit\.", ""),
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.", r"blocks.\1."),
    (r"^decoder\.decoder_(?:layers|encoder\.layer)\.(\d+)\.", r"decoder_blocks.\1."),
    (r"^layernorm\.", "norm."),
    (r"^decoder\.(decoder_embed|decoder_pos_embed|decoder_norm|decoder_pred|mask_token)", r"\1"),
    (r"\.attention\.(?:attention\.query|q_proj)\.", ".attn.q."),
    (r"\.attention\.(?:attention\.key|k_proj)\.", ".attn.k."),
    (r"\.attention\.(?:attention\.value|v_proj)\.", ".attn.v."),
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.layernorm_before\.", ".norm1."),
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.(?:intermediate\.dense|mlp\.fc1)\.", ".mlp.fc1."),
    (r"\.(?:output\.dense|mlp\.fc2)\.", ".mlp.fc2."),
]
QKV = ("q", "k", "v")

# leanmim MaskedDecoder name -> canonical name.
DECODER_NAMES = {"embed": "decoder_embed", "mask_token": "mask_token", "pos_embed": "decoder_pos_embed",
                 "blocks": "decoder_blocks", "norm": "decoder_norm", "head": "decoder_pred"}


def hf_to_canonical_name(key: str) -> str:
    for pattern, replacement in HF_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def from_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers names -> canonical; q, k, v stacked into timm's ``qkv`` (3·D, D)."""
    renamed = {hf_to_canonical_name(key): value for key, value in state.items()}
    canonical = {}
    for key, value in renamed.items():
        match = re.match(r"^(.*\.attn)\.([qkv])\.(weight|bias)$", key)
        if match is None:
            canonical[key] = value
        elif match.group(2) == "q":
            prefix, kind = match.group(1), match.group(3)
            parts = [renamed.get(f"{prefix}.{name}.{kind}") for name in QKV]
            if any(part is None for part in parts):
                raise ConfigError(f"transformers weights have {prefix}.q.{kind} without its k and v: the file is incomplete")
            canonical[f"{prefix}.qkv.{kind}"] = torch.cat(parts, dim=0)
    return canonical


def canonical_to_hf(canonical: dict[str, Tensor], hf_keys: list[str]) -> dict[str, Tensor]:
    """Fill every key of a transformers model's state dict from canonical weights (q, k, v split from ``qkv``)."""
    state = {}
    for key in hf_keys:
        name = hf_to_canonical_name(key)
        match = re.match(r"^(.*\.attn)\.([qkv])\.(weight|bias)$", name)
        if match:
            fused = canonical[f"{match.group(1)}.qkv.{match.group(3)}"]
            state[key] = fused.chunk(3, dim=0)[QKV.index(match.group(2))].contiguous()
        elif name in canonical:
            state[key] = canonical[name].contiguous()
        else:
            raise ConfigError(f"no weight for transformers' '{key}' (canonical '{name}'): this model cannot be exported")
    return state


def from_leanmim_method(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A method's state dict (``encoder.*``, ``decoder.*``; Lightning's ``method.`` prefix allowed) -> canonical."""
    canonical = {}
    for key, value in state.items():
        key = key.removeprefix("method.")
        if key.startswith("encoder."):
            name = key[len("encoder."):]
            canonical[name] = with_cls_row(value) if name == "pos_embed" else value
        elif key.startswith("decoder."):
            first, _, rest = key[len("decoder."):].partition(".")
            name = DECODER_NAMES.get(first, first) + (f".{rest}" if rest else "")
            canonical[name] = with_cls_row(value) if first == "pos_embed" else value
    return canonical


def with_cls_row(table: Tensor) -> Tensor:
    """(L, D) leanmim table -> (1, 1 + L, D) with the zero cls row the MAE reference, timm and ViTMAE store."""
    table = table.detach().float()
    return torch.cat([torch.zeros(1, table.shape[-1]), table], dim=0).unsqueeze(0).contiguous()


def encoder_canonical(encoder: ViTEncoder) -> dict[str, Tensor]:
    """The encoder's weights under canonical (= timm) names, float32, ``pos_embed`` (1, 1 + L, D)."""
    state = {name: tensor.detach().float().contiguous().clone() for name, tensor in encoder.state_dict().items()}
    state["pos_embed"] = with_cls_row(encoder.pos_embed)
    return state


def decoder_canonical(decoder: MaskedDecoder) -> dict[str, Tensor]:
    return from_leanmim_method({f"decoder.{name}": tensor.detach().float().contiguous().clone()
                                for name, tensor in decoder.state_dict().items()})


def is_decoder_key(key: str) -> bool:
    return key.startswith("decoder_") or key == "mask_token"


def grid_of(table: Tensor) -> int:
    """Side of the square grid of a (1, 1 + L, D) table."""
    side = math.isqrt(table.shape[1] - 1)
    if side * side != table.shape[1] - 1:
        raise ConfigError(f"a position table with {table.shape[1]} rows is not cls + a square grid of patches")
    return side
