"""The masked ViT encoder, built from timm's ``PatchEmbed`` and ``Block``.

One encoder serves every method: MAE-style methods run it over ``[cls + visible]`` tokens,
teachers over a chosen subset or the full image, evaluation over the full image.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator, Sequence

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .compression import (DOWNSTREAM_BLOCKS_OF_12, check_token_drop, drop_fraction, rescale_blocks_of_12,
                          run_blocks_compressed)
from .tokens import gather_tokens


def sincos_pos_embed(grid_size: tuple[int, int], dim: int) -> Tensor:
    """Fixed 2D sin-cos position embedding, (L, dim), tokens in row-major grid order.

    The MAE reference's and transformers' ViTMAE layout, so their weights drop in: channels
    ``[sin(w·ω) | cos(w·ω) | sin(h·ω) | cos(h·ω)]``, w the column and h the row of the patch,
    ω_k = 1/10000^(k/(dim/4)), k = 0 … dim/4 − 1. (timm's ``build_sincos2d_pos_embed`` orders the
    channels differently; leanmim used it up to 0.1.0: see :func:`legacy_sincos_pos_embed`.)
    """
    if dim % 4:
        raise ValueError(f"a 2D sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_size[0], dtype=torch.float64),
                                torch.arange(grid_size[1], dtype=torch.float64), indexing="ij")
    halves = []
    for coordinate in (cols.flatten(), rows.flatten()):   # first half: column (w), second half: row (h)
        angles = coordinate[:, None] * omega[None, :]      # (L, dim/4)
        halves += [angles.sin(), angles.cos()]
    return torch.cat(halves, dim=1).float()


def legacy_sincos_pos_embed(grid_size: tuple[int, int], dim: int) -> Tensor:
    """The table leanmim ≤ 0.1.0 used (timm's channel order), (L, dim). Its checkpoints stored no table,
    so loading one rebuilds this (see :func:`keep_legacy_pos_embed`) and it computes what it was trained with."""
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    return build_sincos2d_pos_embed(list(grid_size), dim=dim, temperature=10000.0)


def keep_legacy_pos_embed(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: a state dict without ``pos_embed`` (leanmim ≤ 0.1.0) gets the legacy table."""
    key = prefix + "pos_embed"
    if key not in state_dict and any(name.startswith(prefix) for name in state_dict):
        grid = module.grid_size
        state_dict[key] = legacy_sincos_pos_embed(grid, module.pos_embed.shape[-1]).to(module.pos_embed.dtype)


# Which attention kernel a CPU training step runs (benchmarks/attention_kernels.py, AMD EPYC, 2 cores): under
# bf16 autocast, timm's explicit path (q·kᵀ, softmax, ·v as plain matmuls; ``fused_attn = False``) trains
# 1.3–1.8× faster than torch's fused flash kernel, whose CPU backward is slow, and 1.1–1.3× faster than the
# SDPA math kernel, which upcasts bf16 to fp32 on CPU. In fp32 the three are within a few per cent of each
# other, so fp32 keeps torch's default, as does CUDA (flash / memory-efficient kernels) and evaluation.


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every timm ``Attention`` in ``model`` (subclasses included: LoMaR's relative-position attention)."""
    from timm.layers import Attention

    return [module for module in model.modules() if isinstance(module, Attention)]


@contextlib.contextmanager
def training_attention(model: nn.Module, device: torch.device | str) -> Iterator[None]:
    """Select the attention kernel for a training forward of ``model`` (its backward follows the graph it built).

    On CPU under bf16 autocast every timm ``Attention`` of ``model`` runs its explicit path inside the block
    and is restored after; elsewhere nothing changes. Explicit and fused attention compute the same function
    (tests/test_attention_kernel.py).
    """
    if torch.device(device).type != "cpu" or not (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        yield
        return
    modules = attention_modules(model)
    before = [module.fused_attn for module in modules]
    for module in modules:
        module.fused_attn = False
    try:
        yield
    finally:
        for module, fused in zip(modules, before):
            module.fused_attn = fused


def init_mae_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier_uniform Linear weights, zero biases, LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_encoder_weights(encoder: nn.Module) -> None:
    """MAE initialisation of a ViT encoder with ``patch_embed`` and ``cls_token``."""
    encoder.apply(init_mae_weights)
    # The patch embedding is a Linear over flattened patches: xavier on that view.
    weight = encoder.patch_embed.proj.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    nn.init.normal_(encoder.cls_token, std=0.02)


def make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path_rate: float = 0.0,
                rising: bool = True) -> nn.ModuleList:
    """``depth`` timm ViT blocks (fused attention, LayerNorm eps 1e-6).

    Drop path (stochastic depth) rises linearly from 0 at the first block to ``drop_path_rate`` at the last
    (``rising``, timm's and MAE's encoders), or is ``drop_path_rate`` in every block (``rising=False``, PCAE's
    released decoder). Its draws come from torch's global generator, which checkpoints save and restore.
    """
    if not rising:
        rates = [drop_path_rate] * depth
    else:
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist() if depth else []
    return nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=rate,
              norm_layer=partial(nn.LayerNorm, eps=1e-6))
        for rate in rates
    )


class ViTEncoder(nn.Module):
    """Vision Transformer that can run on any subset of its patch tokens.

    Attributes: ``patch_embed`` (timm), ``cls_token`` (1, 1, D), ``pos_embed`` buffer (L, D),
    ``blocks`` (timm ``Block`` list), ``norm`` (LayerNorm eps 1e-6).
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed (never trained) but stored with the weights: a table loaded from other weights (--init-from) stays.
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid_size, embed_dim))
        self.register_load_state_dict_pre_hook(keep_legacy_pos_embed)
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio, drop_path_rate)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_encoder_weights(self)

    def embed_patches(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, D) patch tokens with their position embedding, grid order."""
        return self.patch_embed(images) + self.pos_embed.to(images.dtype if images.is_floating_point() else torch.float32)

    def with_cls(self, patch_tokens: Tensor) -> Tensor:
        """(B, N, D) -> (B, 1 + N, D); the cls token's position embedding is zero."""
        return torch.cat([self.cls_token.expand(patch_tokens.shape[0], -1, -1), patch_tokens], dim=1)

    def run_blocks(self, tokens: Tensor, return_layers: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        """Run all blocks then the final norm.

        tokens: (B, N, D). return_layers: 1-indexed block numbers whose raw outputs to keep.
        Returns (normed output (B, N, D), [raw output of each requested block (B, N, D)]).
        """
        kept = []
        for number, block in enumerate(self.blocks, start=1):
            tokens = block(tokens)
            if number in return_layers:
                kept.append(tokens)
        return self.norm(tokens), kept

    def forward_visible(self, images: Tensor, ids_keep: Tensor,
                        return_layers: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        """Encode ``[cls + visible]``: images (B, C, H, W), ids_keep (B, K) -> (B, 1 + K, D), intermediates."""
        visible = gather_tokens(self.embed_patches(images), ids_keep)
        return self.run_blocks(self.with_cls(visible), return_layers)

    def forward_features(self, images: Tensor, token_drop: float = 0.0,
                         drop_after: Sequence[int] | None = None) -> Tensor:
        """The full image, as fine-tuning and feature extraction see it: (B, C, H, W) -> (B, 1 + L', D) normed.

        token_drop: PCAE token compression (``compression.py``): after each block in ``drop_after``
        (1-indexed; default 3, 6, 9 of 12, scaled to the depth) drop ⌊n·token_drop⌋ of the n patch
        tokens, those most similar to their mean; cls is kept. 0 (default): the plain encoder, L' = L.
        """
        tokens = self.with_cls(self.embed_patches(images))
        if not token_drop:
            return self.run_blocks(tokens)[0]
        check_token_drop(token_drop)
        stage_blocks = rescale_blocks_of_12(DOWNSTREAM_BLOCKS_OF_12, self.depth) if drop_after is None else drop_after
        ids = torch.arange(self.num_patches, device=tokens.device).expand(tokens.shape[0], -1)
        tokens, _ = run_blocks_compressed(self.blocks, tokens, ids, stage_blocks, drop_fraction(token_drop),
                                          num_fixed=1)
        return self.norm(tokens)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(images)


def pool_features(features: Tensor, pool: str = "mean") -> Tensor:
    """(B, 1 + L, D) -> (B, D') image feature.

    ``cls``; ``mean`` of patch tokens; ``cls+mean`` concatenated; ``tokens``: every patch token in grid
    order, flattened (B, L·D) — keeps the spatial layout, which matters for small aligned images
    such as Fashion-MNIST, at the price of L·D-dimensional features.
    """
    if pool == "cls":
        return features[:, 0]
    if pool == "mean":
        return features[:, 1:].mean(dim=1)
    if pool == "cls+mean":
        return torch.cat([features[:, 0], features[:, 1:].mean(dim=1)], dim=-1)
    if pool == "tokens":
        return features[:, 1:].flatten(1)
    raise ValueError(f"unknown pooling '{pool}': use cls, mean, cls+mean or tokens")
