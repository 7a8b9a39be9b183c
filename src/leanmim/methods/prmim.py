"""PR-MIM: partial reconstruction done right. docs/methods.md §3.

MAE's decoder reconstructs every masked token. PR-MIM decodes only some of them (the *kept* ones,
chosen by furthest sampling), *throws* the rest, and still supervises the thrown ones through a
near-free path. Everything else is MAE's: encoder, decoder, masking and patch weights are
inherited, so plug-ins added to MAE (e.g. difficulty-weighted patches) apply here unchanged.

One batch, top to bottom (ViT-B/16, 224 px, mask 0.75, throw 0.5: K = 49 visible, Q = 49 kept, T = 98 thrown):
    patches    = patchify(images)                                   (B, L, p²C)
    masking    = self.mask(images)                                  MAE's random masking
    split      = split_masked(masking, ...)                         kept (B, Q) / thrown (B, T) masked positions
    encoded    = encoder([cls + visible])                           (B, 1+K, D)
    features   = decoder blocks over [cls, visible, kept]           (B, 1+K+Q, D_d)
    thrown     = progressive(features, neighbours in a k×k box)     (B, T, D_d)     ('aggregate')
    prediction = shared head([features, thrown])                    (B, L, p²C), unshuffled to grid order
    loss       = weighted MSE(kept) + λ · weighted MSE(thrown),     weights = self.patch_weights(masking, progress)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ConfigError, ModelConfig, option
from ..parts.losses import normalized_pixels, per_token_mse, weighted_mean
from ..parts.partial import (THROW_SELECTIONS, ProgressiveReconstruction, decode_with_late_queries, num_thrown,
                             split_masked)
from ..parts.tokens import BatchRandom, gather_tokens, num_visible, patchify
from .base import MethodOutput, register_method
from .mae import MAE, MAEOptions

THROWN_RECONSTRUCTIONS = ("aggregate", "last_block", "none")
AGGREGATION_WEIGHTS = ("distance", "learned")


@dataclass
class PRMIMOptions(MAEOptions):
    throw_ratio: float = option(0.5, "fraction of ALL patches whose (masked) tokens the decoder throws: ⌊L·t⌋ of "
                                     "the masked ones, so t ≤ mask_ratio; 0.5 at mask 0.75 on 14×14 decodes 49 of "
                                     "147 masked tokens and throws 98; 0 is MAE")
    throw_selection: str = option("furthest", "which masked tokens the decoder keeps: furthest (farthest-point "
                                              "sampling over the grid, seeded with the visible patches) or random "
                                              "(plain partial reconstruction)", choices=THROW_SELECTIONS)
    thrown_reconstruction: str = option("aggregate", "how thrown tokens are supervised: aggregate (mix of decoded "
                                                     "neighbours' final decoder features in a k×k box, shared head), "
                                                     "last_block (thrown mask tokens join only the last decoder "
                                                     "block) or none (not supervised)",
                                        choices=THROWN_RECONSTRUCTIONS)
    aggregation_window: int = option(3, "k: a thrown token mixes the decoded tokens in its k×k box (odd, ≥ 3); with "
                                        "none there it copies the nearest decoded token")
    aggregation_weights: str = option("distance", "mixing weights: distance (fixed softmax over −distance) or "
                                                  "learned (k² offset logits, initialised to −distance)",
                                      choices=AGGREGATION_WEIGHTS)
    thrown_loss_weight: float = option(1.0, "λ: loss = MSE on kept tokens + λ · MSE on thrown tokens")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.throw_ratio <= self.mask_ratio:
            raise ConfigError(f"throw_ratio must lie in [0, mask_ratio = {self.mask_ratio}] (a fraction of all "
                              f"patches; only masked tokens can be thrown), got {self.throw_ratio}")
        for name, value, choices in (("throw_selection", self.throw_selection, THROW_SELECTIONS),
                                     ("thrown_reconstruction", self.thrown_reconstruction, THROWN_RECONSTRUCTIONS),
                                     ("aggregation_weights", self.aggregation_weights, AGGREGATION_WEIGHTS)):
            if value not in choices:
                raise ConfigError(f"{name}: '{value}' is not one of {', '.join(choices)}")
        if self.aggregation_window < 3 or self.aggregation_window % 2 == 0:
            raise ConfigError(f"aggregation_window must be an odd number ≥ 3, got {self.aggregation_window}")
        if self.thrown_loss_weight < 0:
            raise ConfigError(f"thrown_loss_weight must be ≥ 0, got {self.thrown_loss_weight}")


@register_method
class PRMIM(MAE):
    name = "prmim"
    summary = ("partial reconstruction: decode a furthest-sampled subset of masked tokens, reconstruct the thrown "
               "ones from decoded neighbours")
    Options = PRMIMOptions

    def __init__(self, model: ModelConfig, options: PRMIMOptions):
        super().__init__(model, options)
        num_masked = model.num_patches - num_visible(model.num_patches, options.mask_ratio)
        self.num_thrown = num_thrown(model.num_patches, num_masked, options.throw_ratio)
        self.progressive = None
        if options.thrown_reconstruction == "aggregate":
            self.progressive = ProgressiveReconstruction(model.grid_size, options.aggregation_window,
                                                         learned=options.aggregation_weights == "learned")

    def decode(self, encoded: Tensor, ids_visible: Tensor, ids_kept: Tensor, ids_thrown: Tensor) -> Tensor:
        """Predictions for ``[visible, kept, thrown]`` in that order: (B, K + Q + T, p²C)."""
        mode = self.options.thrown_reconstruction
        if mode == "last_block":
            features = decode_with_late_queries(self.decoder, encoded, ids_visible, ids_kept, ids_thrown)
            return self.decoder.head(features)[:, 1:]
        features = self.decoder.forward_features(encoded, ids_visible, ids_kept)       # (B, 1+K+Q, D_d)
        if mode == "none":
            prediction = self.decoder.head(features)[:, 1:]
            return torch.cat([prediction, prediction.new_zeros(ids_thrown.shape + prediction.shape[-1:])], dim=1)
        ids_decoded = torch.cat([ids_visible, ids_kept], dim=1)                           # (B, K+Q)
        thrown_features = self.progressive(features[:, 1:], ids_decoded, ids_thrown)      # (B, T, D_d)
        # one head call over cls too, as MAE does (so throw 0 is MAE to the bit)
        return self.decoder.head(torch.cat([features, thrown_features], dim=1))[:, 1:]

    def forward(self, images: Tensor, progress: float = 0.0, rng: BatchRandom | None = None) -> MethodOutput:
        rng = rng or BatchRandom()
        patches = patchify(images, self.model_config.patch_size)                         # (B, L, p²C)
        masking = self.mask(images, rng)
        split = split_masked(masking, self.model_config.grid_size, self.num_thrown, self.options.throw_selection, rng)
        encoded, block_outputs = self.encoder.forward_visible(images, masking.ids_keep, self.supervised_blocks)
        prediction = self.decode(encoded, masking.ids_keep, split.ids_kept, split.ids_thrown)
        ids_order = torch.cat([masking.ids_keep, split.ids_kept, split.ids_thrown], dim=1)
        prediction = gather_tokens(prediction, torch.argsort(ids_order, dim=1))           # (B, L, p²C) grid order

        target = normalized_pixels(patches) if self.options.norm_pix_loss else patches
        per_patch = per_token_mse(prediction, target)                                     # (B, L)
        weights = self.patch_weights(masking, progress)                                   # (B, L); MAE: the mask
        loss_kept = weighted_mean(per_patch, weights * (1 - split.thrown))
        logs = {"loss_kept": loss_kept.detach()}
        loss = loss_kept
        if self.options.thrown_reconstruction != "none":
            loss_thrown = weighted_mean(per_patch, weights * split.thrown)
            loss = loss_kept + self.options.thrown_loss_weight * loss_thrown
            logs["loss_thrown"] = loss_thrown.detach()
        if self.deep_supervision is not None:                                             # MAE's plug-in, as in MAE
            logs["loss_decoder"] = loss.detach()
            loss = loss + self.deep_supervision_loss(images, patches, masking, block_outputs, progress, logs)
        return MethodOutput(loss=loss, logs=logs, predictions=prediction, mask=masking.mask)
