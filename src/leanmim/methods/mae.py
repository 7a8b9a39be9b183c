"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., 2021). docs/methods.md §1.

One batch, top to bottom:
    patches    = patchify(images)                           (B, L, p²C)
    masking    = random_masking(B, L, r)                     keep ⌊L(1−r)⌋ per sample
    encoded    = encoder([cls + visible])                    (B, 1+K, D)
    prediction = decoder(encoded, visible ids, masked ids)   (B, L, p²C), unshuffled to grid order
    loss       = MSE(prediction, normalized patches) over masked patches

Plug-ins (off by default, docs/methods.md §5; they reach every method built on MAE):
    --dynamic-weighting   masked patches weighted by distance to the nearest visible one (see weighting.py)
    --deep-supervision    + Σ_l λ_l · pixel loss of a light shared decoder on encoder block l (deep_supervision.py)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ConfigError, ModelConfig, option
from ..parts.decoder import MaskedDecoder
from ..parts.deep_supervision import DeepSupervision, supervised_blocks_for_depth
from ..parts.encoder import ViTEncoder
from ..parts.losses import reconstruction_loss
from ..parts.tokens import BatchRandom, Masking, gather_tokens, patchify, random_masking
from ..parts.weighting import depth_beta, distance_to_visible, dynamic_weights
from .base import MethodOutput, MIMMethod, check_ratio, register_method


@dataclass
class MAEOptions:
    mask_ratio: float = option(0.75, "fraction of patches hidden from the encoder")
    norm_pix_loss: bool = option(True, "regress per-patch normalized pixels (MAE's default)")
    # Plug-in: dynamic weighting (DDAE).
    dynamic_weighting: bool = option(False, "weight masked patches by d^β, d = distance to the nearest visible patch")
    beta_start: float = option(-1.0, "β at the start of training (<0: near patches count more)")
    beta_end: float = option(1.0, "β at the end of training (>0: far patches count more)")
    beta_depth_slope: float = option(1.0, "δ: β shifts by δ·(block/depth − 1) at shallower supervised blocks")
    # Plug-in: deep supervision (DDAE).
    deep_supervision: bool = option(False, "also reconstruct from intermediate encoder blocks via a light shared decoder")
    deep_supervision_blocks: str = option("6,8,10,12", "supervised blocks, numbered as in a 12-block encoder (rescaled)")
    deep_supervision_weights: str = option("", "λ per supervised block, comma-separated (default: equal, summing to 1)")
    deep_supervision_decoder_depth: int = option(1, "blocks of the light shared decoder (width: the decoder's)")

    def __post_init__(self):
        check_ratio("mask_ratio", self.mask_ratio)
        blocks = parse_numbers("deep_supervision_blocks", self.deep_supervision_blocks, int)
        if not blocks or not all(1 <= block <= 12 for block in blocks):
            raise ConfigError(f"deep_supervision_blocks: give block numbers 1…12 (of a 12-block encoder), "
                              f"got '{self.deep_supervision_blocks}'")
        if any(weight < 0 for weight in parse_numbers("deep_supervision_weights", self.deep_supervision_weights, float)):
            raise ConfigError(f"deep_supervision_weights must be ≥ 0, got '{self.deep_supervision_weights}'")
        if self.deep_supervision_decoder_depth < 1:
            raise ConfigError(f"deep_supervision_decoder_depth must be ≥ 1, got {self.deep_supervision_decoder_depth}")


def parse_numbers(name: str, text: str, kind: type) -> list:
    """'6,8,10' -> [6, 8, 10]; a one-line ConfigError on anything else."""
    try:
        return [kind(item) for item in text.replace(" ", "").split(",") if item]
    except ValueError:
        raise ConfigError(f"{name}: expected comma-separated {kind.__name__} values, got '{text}'") from None


def build_encoder(model: ModelConfig) -> ViTEncoder:
    """The encoder, drop path rising to ``model.drop_path`` (a method's ``model_config`` has it filled in)."""
    return ViTEncoder(model.img_size, model.patch_size, model.in_chans, model.embed_dim, model.depth,
                      model.num_heads, model.mlp_ratio, model.drop_path or 0.0)


def build_decoder(model: ModelConfig, out_dim: int | None = None) -> MaskedDecoder:
    """MAE's decoder, ``model.decoder_drop_path`` in every block; ``out_dim`` defaults to the pixel patch length p²·C."""
    return MaskedDecoder(model.embed_dim, model.decoder_embed_dim, model.decoder_depth, model.decoder_num_heads,
                         model.grid_size, out_dim or model.patch_dim, model.mlp_ratio, model.decoder_drop_path or 0.0)


@register_method
class MAE(MIMMethod):
    name = "mae"
    summary = "masked autoencoder: encode visible patches, decode all, normalized-pixel MSE on masked ones"
    Options = MAEOptions

    def __init__(self, model: ModelConfig, options: MAEOptions):
        super().__init__(model, options)
        model = self.model_config                      # drop path rates filled in from the method's recipe
        self.encoder = build_encoder(model)
        self.decoder = build_decoder(model)
        self.supervised_blocks: tuple[int, ...] = ()   # encoder blocks whose outputs are supervised (1-indexed)
        self.deep_supervision = None
        if options.deep_supervision:
            blocks_of_12 = tuple(parse_numbers("deep_supervision_blocks", options.deep_supervision_blocks, int))
            self.supervised_blocks = supervised_blocks_for_depth(blocks_of_12, model.depth)
            self.supervision_weights = resolve_depth_weights(options.deep_supervision_weights, self.supervised_blocks)
            self.deep_supervision = DeepSupervision(
                self.supervised_blocks, model.embed_dim, model.decoder_embed_dim, options.deep_supervision_decoder_depth,
                model.decoder_num_heads, model.grid_size, model.patch_dim, self.distilled_feature_dim(),
                model.mlp_ratio)

    def mask(self, images: Tensor, rng: BatchRandom) -> Masking:
        """Random per-sample masking of the image's L patches."""
        noise = rng.rand(images.shape[0], self.model_config.num_patches, device=images.device)
        return random_masking(noise, self.options.mask_ratio)

    def patch_weights(self, masking: Masking, progress: float, block: int | None = None) -> Tensor:
        """(B, L) weight of each patch in the reconstruction loss. MAE: the mask (masked patches count equally).

        Plug-ins that re-weight patches (e.g. by difficulty) override or extend this.

        With ``dynamic_weighting``: d^β / mean over masked of d^β (weighting.py), β set by
        ``progress`` and by the supervised ``block`` (default: the last, i.e. the encoder output).
        """
        if not self.options.dynamic_weighting:
            return masking.mask
        depth = self.model_config.depth
        beta = depth_beta(progress, block or depth, depth, self.options.beta_start, self.options.beta_end,
                          self.options.beta_depth_slope)
        return dynamic_weights(distance_to_visible(masking.mask, self.model_config.grid_size), masking.mask, beta)

    def forward(self, images: Tensor, progress: float = 0.0, rng: BatchRandom | None = None) -> MethodOutput:
        rng = rng or BatchRandom()
        patches = patchify(images, self.model_config.patch_size)                   # (B, L, p²C)
        masking = self.mask(images, rng)
        encoded, block_outputs = self.encoder.forward_visible(images, masking.ids_keep, self.supervised_blocks)
        prediction = self.decoder(encoded, masking.ids_keep, masking.ids_masked)   # (B, L, p²C), shuffled order
        prediction = gather_tokens(prediction, masking.ids_restore)                # grid order
        loss = reconstruction_loss(prediction, patches, self.patch_weights(masking, progress),
                                   self.options.norm_pix_loss)
        logs = {}
        if self.deep_supervision is not None:
            logs["loss_decoder"] = loss.detach()
            loss = loss + self.deep_supervision_loss(images, patches, masking, block_outputs, progress, logs)
        return MethodOutput(loss=loss, logs=logs, predictions=prediction, mask=masking.mask)

    # ---- deep supervision plug-in -------------------------------------------------------------

    # Distillation hooks: MAE has no feature targets; DDAE (a teacher) defines all three.
    def distilled_feature_dim(self) -> int:
        """Width of the feature targets the deep-supervision heads also predict (0: pixels only)."""
        return 0

    def feature_targets(self, images: Tensor) -> list[Tensor] | None:
        """Per supervised block, (B, L, D) grid-order feature targets, or None."""
        return None

    def feature_loss(self, prediction: Tensor, target: Tensor, weights: Tensor) -> Tensor:
        """λ_feat × the weighted feature loss at one depth: (B, L, D), (B, L, D), (B, L) -> scalar."""
        raise NotImplementedError("a method whose feature_targets gives targets defines feature_loss")

    def deep_supervision_loss(self, images: Tensor, patches: Tensor, masking: Masking, block_outputs: list[Tensor],
                              progress: float, logs: dict[str, Tensor]) -> Tensor:
        """Σ_l λ_l (pixel loss_l + λ_feat · feature loss_l), each weighted per patch by ``patch_weights`` at block l.

        patches: (B, L, p²C); block_outputs: raw (B, 1+K, D) per supervised block. Adds per-block terms to ``logs``.
        """
        predictions = self.deep_supervision(block_outputs, masking.ids_keep, masking.ids_masked)
        targets = self.feature_targets(images)
        total = patches.new_zeros((), dtype=torch.float32)
        for index, (block, depth_weight) in enumerate(zip(self.supervised_blocks, self.supervision_weights)):
            prediction = gather_tokens(predictions[index], masking.ids_restore)    # (B, L, p²C + F), grid order
            weights = self.patch_weights(masking, progress, block)
            pixel_prediction = prediction[..., :self.model_config.patch_dim]
            term = reconstruction_loss(pixel_prediction, patches, weights, self.options.norm_pix_loss)
            logs[f"loss_pixel_block{block}"] = term.detach()
            if targets is not None:
                feature_term = self.feature_loss(prediction[..., self.model_config.patch_dim:], targets[index], weights)
                logs[f"loss_feature_block{block}"] = feature_term.detach()
                term = term + feature_term
            total = total + depth_weight * term
        return total


def resolve_depth_weights(text: str, blocks: tuple[int, ...]) -> tuple[float, ...]:
    """λ per supervised block: the given list, or equal weights summing to 1."""
    weights = parse_numbers("deep_supervision_weights", text, float)
    if not weights:
        return tuple(1.0 / len(blocks) for _ in blocks)
    if len(weights) != len(blocks):
        raise ConfigError(f"deep_supervision_weights: give {len(blocks)} values, one per supervised block "
                          f"{', '.join(map(str, blocks))} of this encoder, got '{text}'")
    return tuple(weights)
