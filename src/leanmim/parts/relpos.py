"""A ViT encoder with relative positions instead of an absolute position embedding (LoMaR, docs/methods.md §4).

Every attention block adds a *contextual relative position term on keys* (iRPE, Wu et al. 2021,
the variant LoMaR uses). By default the logit of query i for key j is, as in the authors' code,

    scale · qᵢ · kⱼ  +  qᵢ · r[bucket(i, j)]                         (relative_term = "added")

with one learned table r of (50, head_dim) per block, shared over heads, zero at initialisation.
The ablation form ``relative_term = "scaled"`` (leanmim's earlier default) scales the position
term too, scale · qᵢ · (kⱼ + r[bucket(i, j)]): the same functions, but in logit units the table
then moves ``scale`` times (1/8 at head width 64) more slowly under AdamW.

The bucket of a pair of patches is a saturating function of their row and column offsets
(|Δ| = 0, 1, 2, 3, ≥4 → 0, 1, 2, 2, 3 per axis, sign kept: 7 × 7 = 49 buckets) plus one bucket
for every pair involving the cls token. Because the buckets saturate, the same weights run on any
grid size: a 7×7 pretraining window, the 14×14 grid at 224 px or the 28×28 grid at 448 px,
without interpolation.

DESIGN CHOICE: the contextual term (the authors' choice) rather than a per-head bias table: the
iRPE ablations favour it, and it costs one (N × 50 × head_dim) product per block. It is passed
to ``F.scaled_dot_product_attention`` as an additive ``attn_mask`` of shape (B, H, N, N), so the
fused kernels stay in use (on CUDA the memory-efficient kernel, which back-propagates into the
bias; on CPU torch falls back to its math kernel whenever the bias needs a gradient).

DESIGN CHOICE: no weight decay on the tables (``engine.parameter_groups`` exempts names with
"relative", as it exempts tokens and position embeddings; fine-tuning's layer-decay groups follow
the same rule). The authors' optimizer setup decays them, as a side effect of timm's old
``add_weight_decay`` rule (only 1-D parameters and biases exempt, which also decays the cls and
mask tokens). We follow the Swin / BEiT practice of exempting relative position tables: here the
table is the encoder's *only* position information, and decay pulls it toward a position-blind
model. To reproduce the authors' optimizer exactly, drop the "relative" rule in
``engine.parameter_groups``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Attention, PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..config import ConfigError
from .encoder import init_encoder_weights
from .tokens import grid_coordinates

# |Δ| = 0, 1, 2, 3, ≥4  ->  0, 1, 2, 2, 3 (per axis, sign kept)
_BUCKET_OF_DISTANCE = (0, 1, 2, 2, 3)
AXIS_BUCKETS = 2 * _BUCKET_OF_DISTANCE[-1] + 1          # 7 signed buckets per axis: −3 … 3
CLS_BUCKET = AXIS_BUCKETS * AXIS_BUCKETS                 # 49: any pair involving the cls token
NUM_BUCKETS = CLS_BUCKET + 1                             # 50
# "added": scale·q·kᵀ + q·rᵀ (the authors' iRPE); "scaled": scale·q·(k + r)ᵀ (ablation)
RELATIVE_TERMS = ("added", "scaled")


def axis_bucket(offset: Tensor) -> Tensor:
    """Signed saturating bucket of integer offsets (any shape): 0, ±1, ±2, ±3, ±4, ±5… -> 0, ±1, ±2, ±2, ±3, ±3…"""
    table = torch.tensor(_BUCKET_OF_DISTANCE, device=offset.device)
    return offset.sign() * table[offset.abs().clamp(max=len(_BUCKET_OF_DISTANCE) - 1)]


def relative_buckets(grid_size: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """(1 + L, 1 + L) int64 bucket of every (query, key) pair of ``[cls + patches]`` on an h × w grid."""
    coords = grid_coordinates(grid_size, device).long()                      # (L, 2) row, col
    offsets = coords[:, None, :] - coords[None, :, :]                        # (L, L, 2) query − key
    shift = AXIS_BUCKETS // 2
    patch_buckets = (axis_bucket(offsets[..., 0]) + shift) * AXIS_BUCKETS + axis_bucket(offsets[..., 1]) + shift
    return F.pad(patch_buckets, (1, 0, 1, 0), value=CLS_BUCKET)


def check_relative_term(relative_term: str) -> str:
    if relative_term not in RELATIVE_TERMS:
        raise ConfigError(f"relative_term must be one of {', '.join(RELATIVE_TERMS)}, got '{relative_term}'")
    return relative_term


class RelPosAttention(Attention):
    """timm's ``Attention`` plus a contextual relative position term on keys, shared over heads.

    ``relative_table``: (NUM_BUCKETS, head_dim), zero at initialisation (the block then equals a
    plain timm ``Block`` with no position information, as in iRPE). ``relative_term``: "added"
    (qᵢ · r added to the scaled logits, the authors' form) or "scaled" (scale · qᵢ · r).
    """

    def __init__(self, dim: int, num_heads: int = 8, relative_term: str = "added", **kwargs):
        super().__init__(dim, num_heads, **kwargs)
        self.relative_term = check_relative_term(relative_term)
        self.relative_table = nn.Parameter(torch.zeros(NUM_BUCKETS, self.head_dim))

    def relative_bias(self, queries: Tensor, buckets: Tensor) -> Tensor:
        """qᵢ · r[bucket(i, j)] ("added") or scale · qᵢ · r[bucket(i, j)] ("scaled"):
        queries (B, H, N, d), buckets (N, N) -> (B, H, N, N) additive bias to the scaled logits."""
        if self.relative_term == "scaled":
            queries = queries * self.scale
        per_bucket = queries @ self.relative_table.to(queries.dtype).t()                  # (B, H, N, NUM_BUCKETS)
        return torch.gather(per_bucket, -1, buckets.expand(*per_bucket.shape[:2], -1, -1))

    def forward(self, x: Tensor, buckets: Tensor) -> Tensor:
        """x: (B, N, D), buckets: (N, N) int64 from :func:`relative_buckets` -> (B, N, D)."""
        batch, length, _ = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        queries, keys, values = qkv.unbind(0)                                 # (B, H, N, d) each
        queries, keys = self.q_norm(queries), self.k_norm(keys)
        bias = self.relative_bias(queries, buckets)
        if self.fused_attn:
            attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=bias,
                                                      dropout_p=self.attn_drop.p if self.training else 0.0)
        else:  # timm's explicit path (see encoder.training_attention): the same function as plain matmuls
            weights = ((queries * self.scale) @ keys.transpose(-2, -1) + bias).softmax(dim=-1)
            attended = self.attn_drop(weights) @ values
        attended = self.norm(attended.transpose(1, 2).reshape(batch, length, self.attn_dim))
        return self.proj_drop(self.proj(attended))


class RelPosBlock(Block):
    """timm's pre-norm ``Block`` whose attention is :class:`RelPosAttention`; same parameter names plus
    ``attn.relative_table``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 relative_term: str = "added"):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6), attn_layer=RelPosAttention)
        self.attn.relative_term = check_relative_term(relative_term)   # timm's Block takes an attention class only

    def forward(self, x: Tensor, buckets: Tensor) -> Tensor:
        """x: (B, N, D), buckets: (N, N) -> (B, N, D)."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), buckets)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class RelPosViTEncoder(nn.Module):
    """ViT without absolute position embedding; relative positions in every block.

    Same interface as :class:`~leanmim.encoder.ViTEncoder` for evaluation and export:
    ``forward_features(images) -> (B, 1 + L, D)`` normed, ``patch_embed``, ``cls_token``,
    ``blocks``, ``norm``, ``embed_dim``, ``grid_size``, ``img_size``, ``patch_size``, ``in_chans``.
    It accepts images of any size divisible by the patch size; :meth:`resized` builds the encoder for
    another ``img_size`` with the same, unchanged state dict.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0, relative_term: str = "added"):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.mlp_ratio, self.drop_path_rate = mlp_ratio, drop_path_rate
        self.relative_term = check_relative_term(relative_term)
        # strict_img_size=False: LoMaR embeds window crops, fine-tuning may use another resolution.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist() if depth else []
        self.blocks = nn.ModuleList(RelPosBlock(embed_dim, num_heads, mlp_ratio, rate, relative_term)
                                    for rate in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE initialisation (as ViTEncoder); relative tables start at zero."""
        init_encoder_weights(self)

    def architecture(self) -> dict:
        """Keyword arguments that rebuild this encoder (export metadata)."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    relative_term=self.relative_term)

    def resized(self, img_size: int) -> "RelPosViTEncoder":
        """The same encoder (same weights, copied) for images of ``img_size`` pixels."""
        encoder = RelPosViTEncoder(**{**self.architecture(), "img_size": img_size},
                                   drop_path_rate=self.drop_path_rate)
        encoder.load_state_dict(self.state_dict())
        return encoder.to(self.cls_token.device)

    def embed_patches(self, images: Tensor) -> Tensor:
        """(B, C, h·p, w·p) -> (B, h·w, D) patch tokens, grid order, no position embedding."""
        return self.patch_embed(images)

    def with_cls(self, patch_tokens: Tensor) -> Tensor:
        """(B, N, D) -> (B, 1 + N, D)."""
        return torch.cat([self.cls_token.expand(patch_tokens.shape[0], -1, -1).to(patch_tokens.dtype), patch_tokens],
                         dim=1)

    def run_blocks(self, tokens: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """tokens: (B, 1 + h·w, D) ``[cls + patches]`` of an h × w grid, grid order -> (B, 1 + h·w, D) normed."""
        buckets = relative_buckets(grid_size, tokens.device)
        for block in self.blocks:
            tokens = block(tokens, buckets)
        return self.norm(tokens)

    def forward_features(self, images: Tensor) -> Tensor:
        """The full image: (B, C, H, W) -> (B, 1 + L, D) normed, L = (H/p)·(W/p)."""
        grid_size = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return self.run_blocks(self.with_cls(self.embed_patches(images)), grid_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(images)
