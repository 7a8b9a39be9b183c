"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., 2021). METHODS.md §1.

One batch, top to bottom:
    patches    = patchify(images)                           (B, L, p²C)
    masking    = random_masking(B, L, r)                     keep ⌊L(1−r)⌋ per sample
    encoded    = encoder([cls + visible])                    (B, 1+K, D)
    prediction = decoder(encoded, visible ids, masked ids)   (B, L, p²C), unshuffled to grid order
    loss       = MSE(prediction, normalized patches) over masked patches
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..config import ModelConfig, option
from ..decoder import MaskedDecoder
from ..encoder import ViTEncoder
from ..losses import reconstruction_loss
from ..tokens import BatchRandom, Masking, gather_tokens, patchify, random_masking
from .base import MethodOutput, MIMMethod, check_ratio, register_method


@dataclass
class MAEOptions:
    mask_ratio: float = option(0.75, "fraction of patches hidden from the encoder")
    norm_pix_loss: bool = option(True, "regress per-patch normalized pixels (MAE's default)")

    def __post_init__(self):
        check_ratio("mask_ratio", self.mask_ratio)


def build_encoder(model: ModelConfig) -> ViTEncoder:
    return ViTEncoder(model.img_size, model.patch_size, model.in_chans, model.embed_dim, model.depth,
                      model.num_heads, model.mlp_ratio, model.drop_path)


def build_decoder(model: ModelConfig, out_dim: int | None = None) -> MaskedDecoder:
    """MAE's decoder; ``out_dim`` defaults to the pixel patch length p²·C."""
    return MaskedDecoder(model.embed_dim, model.decoder_embed_dim, model.decoder_depth, model.decoder_num_heads,
                         model.grid_size, out_dim or model.patch_dim, model.mlp_ratio)


@register_method
class MAE(MIMMethod):
    name = "mae"
    summary = "masked autoencoder: encode visible patches, decode all, normalized-pixel MSE on masked ones"
    Options = MAEOptions

    def __init__(self, model: ModelConfig, options: MAEOptions):
        super().__init__(model, options)
        self.encoder = build_encoder(model)
        self.decoder = build_decoder(model)

    def mask(self, images: Tensor, rng: BatchRandom) -> Masking:
        """Random per-sample masking of the image's L patches."""
        noise = rng.rand(images.shape[0], self.model_config.num_patches, device=images.device)
        return random_masking(noise, self.options.mask_ratio)

    def patch_weights(self, masking: Masking, progress: float) -> Tensor:
        """(B, L) weight of each patch in the reconstruction loss. MAE: the mask (masked patches count equally).

        Plug-ins that re-weight patches (e.g. by difficulty) override or extend this.
        """
        return masking.mask

    def forward(self, images: Tensor, progress: float = 0.0, rng: BatchRandom | None = None) -> MethodOutput:
        rng = rng or BatchRandom()
        patches = patchify(images, self.model_config.patch_size)                   # (B, L, p²C)
        masking = self.mask(images, rng)
        encoded, _ = self.encoder.forward_visible(images, masking.ids_keep)         # (B, 1+K, D)
        prediction = self.decoder(encoded, masking.ids_keep, masking.ids_masked)   # (B, L, p²C), shuffled order
        prediction = gather_tokens(prediction, masking.ids_restore)                # grid order
        loss = reconstruction_loss(prediction, patches, self.patch_weights(masking, progress),
                                   self.options.norm_pix_loss)
        return MethodOutput(loss=loss, predictions=prediction, mask=masking.mask)
