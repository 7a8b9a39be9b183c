"""Classifier: a pretrained encoder, a pooling and a linear head — what fine-tuning trains, export writes and
predict runs.

- Each head is built as timm builds ``VisionTransformer`` for the matching ``global_pool``, so the
  fine-tuned model exports to timm exactly: ``mean`` removes the encoder's final norm and adds a fresh
  ``fc_norm`` after pooling (``global_pool='avg'``); ``cls`` keeps the pretrained final norm and reads
  the cls token (``'token'``). ``tokens`` has no timm pooling: it exports as ``global_pool=''`` (the
  features) plus ``token_head.*``, the layout written in the metadata (see :func:`export_finetuned`).
- Drop path is set on the loaded encoder's blocks (timm ``Block.drop_path1/2``), rising linearly
  from 0 to ``drop_path`` with depth, so any method's encoder can be fine-tuned as loaded.
"""

from __future__ import annotations

import inspect

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from ..config import POOLS, ConfigError
from .encoder import pool_features

TIMM_GLOBAL_POOL = {"mean": "avg", "cls": "token", "tokens": ""}   # timm VisionTransformer(global_pool=…)


def initial_encoder(loaded, from_scratch: bool, seed: int) -> nn.Module:
    """The encoder fine-tuning starts from: the run's pretrained one, or (``from_scratch``) the same method's
    encoder freshly initialised from ``seed`` — as the method itself initialises it before pretraining."""
    return loaded.untrained_method(seed).encoder if from_scratch else loaded.method.encoder


def prepare_encoder(encoder: nn.Module, drop_path: float, pool: str = "mean") -> nn.Module:
    """Make a pretrained encoder fine-tunable in place: drop path rising linearly from 0 (first block) to
    ``drop_path`` (last block) in ``encoder.blocks``; for ``pool='mean'`` the final norm is removed (``fc_norm``
    replaces it after pooling, as timm's ``global_pool='avg'``), for ``cls`` and ``tokens`` it is kept.
    The absolute position table (a fixed buffer during pretraining) becomes a trained parameter, as in MAE's
    fine-tuning (timm's learnable ``pos_embed``, no weight decay, the patch embedding's layer-decay group)."""
    if not hasattr(encoder, "norm") or not hasattr(encoder, "blocks"):
        raise ConfigError(f"the {type(encoder).__name__} encoder has no 'norm' and 'blocks': it cannot be fine-tuned")
    table = encoder._buffers.get("pos_embed")
    if table is not None:
        del encoder._buffers["pos_embed"]
        encoder.pos_embed = nn.Parameter(table.detach().clone())
    if pool == "mean":
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
    """encoder → pooling (``pool``) → head: images (B, C, H, W) -> logits (B, K).

    ``mean``: patch-token mean (B, D) → ``fc_norm`` → ``head``; ``cls``: cls token (B, D) → ``head``;
    ``tokens``: patch tokens in grid order flattened (B, L·D) → ``head`` (a Linear(L·D, K)).
    ``encoder`` must have gone through :func:`prepare_encoder` with the same ``pool``. ``token_drop`` > 0
    runs the encoder with token compression (``forward_features(images, token_drop=R)``).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, token_drop: float = 0.0, pool: str = "mean"):
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"unknown fine-tuning pool '{pool}': use {', '.join(POOLS)}")
        if token_drop > 0 and not supports_token_drop(encoder):
            raise ConfigError(f"the {type(encoder).__name__} encoder has no token compression: drop --token-drop")
        if token_drop > 0 and pool == "tokens":
            raise ConfigError("--pool tokens needs every patch token: drop --token-drop or use --pool mean/cls")
        self.encoder, self.token_drop, self.pool = encoder, token_drop, pool
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6) if pool == "mean" else nn.Identity()
        features = encoder.embed_dim * (encoder.num_patches if pool == "tokens" else 1)
        self.head = nn.Linear(features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, F) pooled image feature (F = D, or L·D for ``tokens``)."""
        encoder_kwargs = {"token_drop": self.token_drop} if self.token_drop > 0 else {}
        return self.fc_norm(pool_features(self.encoder.forward_features(images, **encoder_kwargs), self.pool))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.forward_features(images))


def class_scores(classifier: nn.Module, images: Tensor, mirror: bool) -> Tensor:
    """(B, K) scores whose arg-max is the prediction for images (B, C, S, S): the logits, or with ``mirror``
    (test-time augmentation) the sum of the softmax of each image and of its mirror image."""
    if not mirror:
        return classifier(images)
    return classifier(images).float().softmax(-1) + classifier(images.flip(-1)).float().softmax(-1)
