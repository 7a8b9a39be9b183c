"""DDAE: Deep Dynamic AutoEncoder. docs/methods.md §5.

MAE with its two plug-ins switched on, plus feature self-distillation from a momentum teacher:

    patches    = patchify(images)                                   (B, L, p²C)
    masking    = random_masking(B, L, r)                             as MAE
    encoded, block outputs = encoder([cls + visible], blocks l ∈ S)  (B, 1+K, D), raw (B, 1+K, D) per l
    main loss  = MAE's decoder, normalized-pixel MSE, dynamically weighted (β of the last block)
    teacher    = EMA encoder over the *full, unmasked* image, no gradient: LayerNorm (no affine) of its
                 raw block-l outputs = feature targets (B, L, D) per l
    per l ∈ S  = light shared decoder (own LayerNorm + input projection per l) predicts pixels and
                 features; pixel loss_l + λ_feat · feature loss_l (smooth-L1 or MSE), both weighted by
                 w(l, τ) = d^β(l,τ) / mean over masked d^β
    loss       = main loss + Σ_l λ_l (pixel loss_l + λ_feat · feature loss_l)

S defaults to blocks {6, 8, 10, 12} of 12 (rescaled to other depths). The teacher is an exact
copy of the encoder at the start and follows it by EMA (momentum 0.999 → 0.9999, cosine) after
every optimizer step. Everything but the teacher lives in MAE (methods/mae.py): the weighting
and the deep supervision work on MAE alone too (``--method mae --dynamic-weighting
--deep-supervision``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ConfigError, ModelConfig, option
from ..parts.deep_supervision import per_token_feature_loss
from ..parts.losses import standardize_tokens, weighted_mean
from ..parts.teacher import cosine_momentum, ema_update, make_teacher
from .base import register_method
from .mae import MAE, MAEOptions


@dataclass
class DDAEOptions(MAEOptions):
    dynamic_weighting: bool = option(True, "weight masked patches by d^β, d = distance to the nearest visible patch")
    deep_supervision: bool = option(True, "also reconstruct from intermediate encoder blocks via a light shared decoder")
    feature_weight: float = option(1.0, "λ_feat: weight of the teacher-feature loss at each supervised block (0: no teacher)")
    feature_loss: str = option("smooth_l1", "feature regression loss", choices=("smooth_l1", "mse"))
    teacher_momentum: float = option(0.999, "EMA momentum of the teacher at the start of training")
    teacher_momentum_end: float = option(0.9999, "EMA momentum at the end (cosine schedule)")

    def __post_init__(self):
        super().__post_init__()
        if self.feature_weight < 0:
            raise ConfigError(f"feature_weight must be ≥ 0, got {self.feature_weight}")
        if self.feature_loss not in ("smooth_l1", "mse"):
            raise ConfigError(f"feature_loss must be smooth_l1 or mse, got '{self.feature_loss}'")
        for name in ("teacher_momentum", "teacher_momentum_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.feature_weight > 0 and not self.deep_supervision:
            raise ConfigError("feature distillation needs --deep-supervision (its heads predict the teacher's "
                              "features); or set --feature-weight 0")


@register_method
class DDAE(MAE):
    name = "ddae"
    summary = "MAE + distance-weighted loss + deep supervision of several encoder depths + EMA-teacher feature distillation"
    Options = DDAEOptions

    def __init__(self, model: ModelConfig, options: DDAEOptions):
        super().__init__(model, options)
        self.teacher = make_teacher(self.encoder).eval() if self.distills else None

    @property
    def distills(self) -> bool:
        return self.options.deep_supervision and self.options.feature_weight > 0

    def distilled_feature_dim(self) -> int:
        return self.model_config.embed_dim if self.distills else 0

    @torch.no_grad()
    def feature_targets(self, images: Tensor) -> list[Tensor] | None:
        """The teacher over every patch of the unmasked image: per supervised block l, LayerNorm
        (no affine) of its raw block-l output, patch tokens only, grid order, (B, L, D)."""
        if self.teacher is None:
            return None
        every_patch = torch.arange(self.model_config.num_patches, device=images.device).expand(images.shape[0], -1)
        _, block_outputs = self.teacher.forward_visible(images, every_patch, self.supervised_blocks)
        return [standardize_tokens(tokens[:, 1:]) for tokens in block_outputs]

    def feature_loss(self, prediction: Tensor, target: Tensor, weights: Tensor) -> Tensor:
        """λ_feat × weighted smooth-L1 (or MSE) between predicted and teacher features: (B, L, D) ×2, (B, L)."""
        return self.options.feature_weight * weighted_mean(
            per_token_feature_loss(prediction, target, self.options.feature_loss), weights)

    def after_optimizer_step(self, progress: float) -> None:
        if self.teacher is not None:
            momentum = cosine_momentum(progress, self.options.teacher_momentum, self.options.teacher_momentum_end)
            ema_update(self.teacher, self.encoder, momentum)

    def teacher_modules(self) -> list:
        return [self.teacher] if self.teacher is not None else []

    def train(self, mode: bool = True) -> "DDAE":
        """The teacher always runs in eval mode (no drop path) whatever the student does."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self
