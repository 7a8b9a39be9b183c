"""Targets and reconstruction / distillation losses shared by the methods.

Per-token losses are returned as (B, N) so that methods can weight tokens before averaging.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def normalized_pixels(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Standardize each patch over its own p²·C values: (B, N, P) -> (B, N, P)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def per_token_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per token: (B, N, P), (B, N, P) -> (B, N), computed in fp32."""
    return (prediction.float() - target.float()).pow(2).mean(dim=-1)


def per_token_cosine_distance(prediction: Tensor, target: Tensor) -> Tensor:
    """1 − cosine similarity per token: (B, N, D), (B, N, D) -> (B, N), in fp32."""
    return 1 - F.cosine_similarity(prediction.float(), target.float(), dim=-1)


def weighted_mean(per_token: Tensor, weights: Tensor) -> Tensor:
    """Σ loss·w / Σ w over all tokens: (B, N), (B, N) -> scalar. A 0/1 mask as weights averages over the 1s."""
    return (per_token * weights).sum() / weights.sum().clamp_min(1e-12)


def standardize_tokens(features: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm without affine over the feature dimension: (B, N, D) -> (B, N, D)."""
    return F.layer_norm(features.float(), features.shape[-1:], eps=eps)


def reconstruction_loss(prediction: Tensor, patches: Tensor, weights: Tensor, normalize_target: bool = True) -> Tensor:
    """Weighted MSE against (normalized) pixel patches.

    prediction, patches: (B, N, P); weights: (B, N), e.g. the MAE mask (1 = masked).
    """
    target = normalized_pixels(patches) if normalize_target else patches
    return weighted_mean(per_token_mse(prediction, target), weights)


def denormalize_prediction(prediction: Tensor, patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Map normalized-pixel predictions back to pixels using each target patch's own mean and variance."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return prediction * (var + eps) ** 0.5 + mean
