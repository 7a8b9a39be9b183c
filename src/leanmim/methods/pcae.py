"""PCAE: Progressively Compressed AutoEncoder. docs/methods.md §2.

Masked patches are redundant, so reconstruct only the informative ones. An EMA teacher encodes
the masked patches and, after a few of its blocks, drops the tokens most similar to the sequence
mean (``compression.py``); the student decodes mask tokens only at the positions that survive.

One batch, top to bottom:
    masking     = random_masking(B, L, r)                                K visible, M masked per sample
    encoded     = student encoder([cls + visible])                      (B, 1+K, D)
    teacher     = EMA encoder(masked tokens), no gradient, compressed   M → ⌊Mρ⌋ → … → R tokens
                  -> teacher features (B, R, D) and retained ids (B, R)  e.g. 147 → 73 → 36 → 18 (ViT-B)
    prediction  = decoder(encoded, visible ids, retained ids)           (B, R, D) or (B, R, p²C)
    loss        = 1 − cos(prediction, standardized teacher features)    (target 'features', default)
                  or MSE(prediction, normalized pixels at retained ids) (target 'pixels')
    after optimizer step k of K: teacher ← m_k·teacher + (1−m_k)·student, m_k cosine from 0.9999 (k = 0) towards 1

Defaults are the released recipe's, drop path included: 0.25 rising over the student encoder's blocks and 0.25 in
every decoder block (``--drop-path``, ``--decoder-drop-path``; ``config.model.RECIPE_DROP_PATH``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..parts.compression import (TokenScore, keep_fraction, run_blocks_compressed, similarity_to_mean,
                                 teacher_blocks_for_depth)
from ..config import ConfigError, ModelConfig, option
from ..parts.losses import normalized_pixels, per_token_cosine_distance, per_token_mse, standardize_tokens
from ..parts.teacher import cosine_momentum, ema_update, make_teacher
from ..parts.tokens import BatchRandom, Masking, gather_tokens, patchify, random_masking
from .base import MethodOutput, MIMMethod, check_ratio, register_method
from .mae import build_decoder, build_encoder


@dataclass
class PCAEOptions:
    mask_ratio: float = option(0.75, "fraction of patches hidden from the encoder")
    keep_ratio: float = option(0.5, "fraction ρ of its tokens the teacher keeps at each compression stage")
    teacher_blocks: list | None = option(None, "1-indexed teacher blocks after which it compresses "
                                               "(default: the authors' rule i·(depth//3)+1, i=0,1,2: "
                                               "1,5,9 of 12; 1,9,17 of 24)")
    drop_policy: str = option("similarity", "which teacher tokens are dropped: 'similarity' (most like the mean) "
                                            "or 'random' (ablation)", choices=("similarity", "random"))
    target: str = option("features", "'features': teacher features, 1 − cosine; 'pixels': normalized pixels, MSE",
                         choices=("features", "pixels"))
    momentum_start: float = option(0.9999, "EMA teacher momentum at the start (cosine schedule)")
    momentum_end: float = option(1.0, "EMA teacher momentum at the end of training")

    def __post_init__(self):
        check_ratio("mask_ratio", self.mask_ratio)
        check_ratio("keep_ratio", self.keep_ratio)
        if self.teacher_blocks is not None:
            self.teacher_blocks = [int(block) for block in self.teacher_blocks]
        if self.drop_policy not in ("similarity", "random"):
            raise ConfigError(f"drop_policy must be 'similarity' or 'random', got '{self.drop_policy}'")
        if self.target not in ("features", "pixels"):
            raise ConfigError(f"target must be 'features' or 'pixels', got '{self.target}'")
        for name in ("momentum_start", "momentum_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


@register_method
class PCAE(MIMMethod):
    name = "pcae"
    summary = ("progressively compressed autoencoder: an EMA teacher drops masked tokens like the mean, "
               "the decoder reconstructs only the retained ones")
    Options = PCAEOptions

    def __init__(self, model: ModelConfig, options: PCAEOptions):
        super().__init__(model, options)
        model = self.model_config        # drop path 0.25 in the student encoder (rising) and every decoder block
        self.encoder = build_encoder(model)
        self.teacher = make_teacher(self.encoder)    # an exact copy at step 0, then EMA
        self.teacher.train(False)
        predicts_features = options.target == "features"
        self.decoder = build_decoder(model, out_dim=model.embed_dim if predicts_features else model.patch_dim)
        if options.teacher_blocks is None:
            self.teacher_blocks = teacher_blocks_for_depth(model.depth)
        else:
            if not all(1 <= block <= model.depth for block in options.teacher_blocks):
                raise ConfigError(f"teacher_blocks must lie in 1…{model.depth} (1-indexed), "
                                  f"got {options.teacher_blocks}")
            self.teacher_blocks = tuple(sorted(set(options.teacher_blocks)))

    def train(self, mode: bool = True) -> "PCAE":
        """The teacher always runs in eval mode (no drop path)."""
        super().train(mode)
        self.teacher.train(False)
        return self

    def teacher_modules(self) -> list[torch.nn.Module]:
        return [self.teacher]

    def mask(self, images: Tensor, rng: BatchRandom) -> Masking:
        """Random per-sample masking of the image's L patches, as in MAE."""
        noise = rng.rand(images.shape[0], self.model_config.num_patches, device=images.device)
        return random_masking(noise, self.options.mask_ratio)

    def drop_score(self, rng: BatchRandom) -> TokenScore:
        """(B, n, D) tokens -> (B, n) scores; the lowest are kept."""
        if self.options.drop_policy == "random":
            return lambda tokens: rng.rand(tokens.shape[0], tokens.shape[1], device=tokens.device)
        return similarity_to_mean

    @torch.no_grad()
    def encode_teacher(self, images: Tensor, ids_masked: Tensor, rng: BatchRandom) -> tuple[Tensor, Tensor]:
        """The EMA teacher over the masked patch tokens only (no cls), compressing after ``teacher_blocks``.

        images: (B, C, H, W); ids_masked: (B, M). Returns normed features (B, R, D) and their grid ids (B, R).
        """
        masked_tokens = gather_tokens(self.teacher.embed_patches(images), ids_masked)      # (B, M, D)
        tokens, ids_retained = run_blocks_compressed(self.teacher.blocks, masked_tokens, ids_masked,
                                                     self.teacher_blocks, keep_fraction(self.options.keep_ratio),
                                                     score=self.drop_score(rng))
        return self.teacher.norm(tokens), ids_retained

    def predict(self, encoded: Tensor, ids_visible: Tensor, ids_retained: Tensor) -> Tensor:
        """Mask tokens at the retained positions only, decoded: (B, 1+K, D), (B, K), (B, R) -> (B, R, out).

        The head runs on the retained queries only; row j predicts patch ``ids_retained[:, j]``.
        """
        decoded = self.decoder.forward_features(encoded, ids_visible, ids_retained)        # (B, 1+K+R, D_d)
        return self.decoder.head(decoded[:, 1 + ids_visible.shape[1]:])

    def targets(self, images: Tensor, teacher_features: Tensor, ids_retained: Tensor) -> Tensor:
        """(B, R, D) standardized teacher features, or (B, R, p²C) normalized pixels, at the retained ids."""
        if self.options.target == "features":
            return standardize_tokens(teacher_features)
        patches = patchify(images, self.model_config.patch_size)                           # (B, L, p²C)
        return normalized_pixels(gather_tokens(patches, ids_retained))

    def forward(self, images: Tensor, progress: float = 0.0, rng: BatchRandom | None = None) -> MethodOutput:
        rng = rng or BatchRandom()
        masking = self.mask(images, rng)
        encoded, _ = self.encoder.forward_visible(images, masking.ids_keep)                 # (B, 1+K, D)
        teacher_features, ids_retained = self.encode_teacher(images, masking.ids_masked, rng)  # (B, R, D), (B, R)
        prediction = self.predict(encoded, masking.ids_keep, ids_retained)                 # (B, R, out)
        target = self.targets(images, teacher_features, ids_retained)
        if self.options.target == "features":
            loss = per_token_cosine_distance(prediction, target).mean()
        else:
            loss = per_token_mse(prediction, target).mean()
        logs = {"retained_fraction": torch.tensor(ids_retained.shape[1] / self.model_config.num_patches)}
        return MethodOutput(loss=loss, logs=logs, predictions=None, mask=masking.mask)

    def after_optimizer_step(self, progress: float) -> None:
        """teacher ← m·teacher + (1 − m)·student, m on a cosine schedule from momentum_start to momentum_end."""
        momentum = cosine_momentum(progress, self.options.momentum_start, self.options.momentum_end)
        ema_update(self.teacher, self.encoder, momentum)
