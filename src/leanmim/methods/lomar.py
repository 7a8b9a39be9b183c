"""LoMaR: Local Masked Reconstruction (Chen et al., 2022). docs/methods.md §4.

Reconstruct inside a few small windows instead of the whole image: the cost per image depends on
the window size, not on the resolution.

One batch, top to bottom (B images, n windows of m × m patches each, P = p²·C):
    patches        = patchify(images)                                   (B, L, P)
    window_ids     = n random windows per image, top rows and left      (B, n, m²) grid positions
                     columns drawn without replacement (as released)
    window_patches = patches at window_ids, one sequence per window     (B·n, m², P)
    window_mask    = ⌊m²·r⌋ masked patches per window (39 of 49)         (B·n, m²)
    tokens         = patch embedding of every window patch, masked ones
                     replaced by the mask token, + cls                   (B·n, 1+m², D)
    encoded        = relative-position encoder (no absolute positions)   (B·n, 1+m², D) normed
    prediction     = Linear head on the patch tokens                     (B·n, m², P)
    loss           = MSE(prediction, normalized patches) over masked patches

Fixes two pitfalls of the released code: every image gets its own n windows (the reference pairs
image k with window k mod n) and window positions are drawn per image, not once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, format_img_size, option
from ..parts.losses import reconstruction_loss
from ..parts.relpos import RELATIVE_TERMS, RelPosViTEncoder, check_relative_term
from ..parts.tokens import (BatchRandom, gather_tokens, patchify, random_mask_of_size, random_windows, unpatchify,
                             window_noise_shapes)
from .base import MethodOutput, MIMMethod, check_ratio, register_method


@dataclass
class LoMaROptions:
    num_windows: int = option(4, "windows sampled per image at random positions, no two sharing a top row or a left "
                                 "column while the grid has room (as released); overlap allowed")
    window_size: int = option(7, "window side m in patches (m × m patches per window; at most the grid side)")
    mask_ratio: float = option(0.8, "fraction of each window's patches replaced by the mask token (⌊m²·r⌋)")
    norm_pix_loss: bool = option(True, "regress per-patch normalized pixels")
    relative_term: str = option("added", "relative position logit: 'added' scale·q·k + q·r (authors' iRPE) or "
                                         "'scaled' scale·q·(k + r) (ablation)", choices=RELATIVE_TERMS)

    def __post_init__(self):
        check_ratio("mask_ratio", self.mask_ratio)
        check_relative_term(self.relative_term)
        if self.num_windows < 1:
            raise ConfigError(f"num_windows must be at least 1, got {self.num_windows}")
        if self.window_size < 1:
            raise ConfigError(f"window_size must be at least 1, got {self.window_size}")
        if self.num_masked < 1:
            raise ConfigError(f"mask_ratio {self.mask_ratio} masks no patch of a {self.window_size}×{self.window_size} "
                              f"window: raise --mask-ratio or --window-size")

    @property
    def num_masked(self) -> int:
        """Masked patches per window, ⌊m²·r⌋ as in the authors' code (39 of 49 at the defaults)."""
        return int(self.window_size * self.window_size * self.mask_ratio)


def build_relpos_encoder(model: ModelConfig, relative_term: str = "added") -> RelPosViTEncoder:
    return RelPosViTEncoder(model.img_size, model.patch_size, model.in_chans, model.embed_dim, model.depth,
                            model.num_heads, model.mlp_ratio, model.drop_path or 0.0, relative_term)


@register_method
class LoMaR(MIMMethod):
    name = "lomar"
    summary = "local masked reconstruction: n small windows per image, relative positions, no decoder"
    Options = LoMaROptions

    def __init__(self, model: ModelConfig, options: LoMaROptions):
        super().__init__(model, options)
        model = self.model_config
        if model.decoder_drop_path:
            raise ConfigError(f"--decoder-drop-path {model.decoder_drop_path}: lomar has no decoder (a linear head "
                              f"on the encoder); use --drop-path for the encoder's stochastic depth")
        if options.window_size > min(model.grid_size):
            raise ConfigError(f"window_size {options.window_size} does not fit the {model.grid_size[0]}×"
                              f"{model.grid_size[1]} patch grid (img_size {format_img_size(model.img_size)} / patch {model.patch_size}): "
                              f"use --window-size {min(model.grid_size)} or less")
        self.encoder = build_relpos_encoder(model, options.relative_term)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, model.embed_dim))
        self.head = nn.Linear(model.embed_dim, model.patch_dim)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor, progress: float = 0.0, rng: BatchRandom | None = None) -> MethodOutput:
        rng = rng or BatchRandom()
        model, n, m = self.model_config, self.options.num_windows, self.options.window_size
        batch = images.shape[0]
        patches = patchify(images, model.patch_size)                                           # (B, L, P)
        row_shape, col_shape = window_noise_shapes(n, m, model.grid_size)
        window_ids = random_windows(rng.rand(batch, *row_shape, device=images.device),
                                    rng.rand(batch, *col_shape, device=images.device), n, m, model.grid_size)  # (B, n, m²)
        window_patches = gather_tokens(patches, window_ids.flatten(1)).reshape(batch * n, m * m, -1)  # (B·n, m², P)
        window_mask = random_mask_of_size(rng.rand(batch, n, m * m, device=images.device).flatten(0, 1),
                                          self.options.num_masked)                             # (B·n, m²)

        window_images = unpatchify(window_patches, model.patch_size, (m, m), model.in_chans)   # (B·n, C, m·p, m·p)
        tokens = self.encoder.embed_patches(window_images)                                     # (B·n, m², D)
        tokens = torch.where(window_mask.unsqueeze(-1).bool(), self.mask_token.to(tokens.dtype), tokens)
        encoded = self.encoder.run_blocks(self.encoder.with_cls(tokens), (m, m))               # (B·n, 1+m², D)
        prediction = self.head(encoded[:, 1:])                                                 # (B·n, m², P)
        loss = reconstruction_loss(prediction, window_patches, window_mask, self.options.norm_pix_loss)

        grid_prediction, grid_mask = self.windows_to_grid(prediction, window_mask, window_ids)
        return MethodOutput(loss=loss, predictions=grid_prediction, mask=grid_mask)

    @torch.no_grad()
    def windows_to_grid(self, prediction: Tensor, window_mask: Tensor, window_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Window predictions back on the image grid, for pictures: (B·n, m², P), (B·n, m²), (B, n, m²)
        -> predictions (B, L, P), mask (B, L).

        A patch is masked if some window masked it; its prediction is the mean over the windows that
        masked it, else over the windows that saw it. Patches outside every window: prediction 0, visible.
        """
        batch, num_patches = window_ids.shape[0], self.model_config.num_patches
        ids = window_ids.flatten(1)                                                            # (B, n·m²)
        values = prediction.float().reshape(batch, ids.shape[1], -1)                           # (B, n·m², P)
        masked = window_mask.reshape(batch, ids.shape[1], 1)                                   # (B, n·m², 1)

        def add_up(per_window: Tensor) -> Tensor:                                              # -> (B, L, ·)
            base = per_window.new_zeros(batch, num_patches, per_window.shape[-1])
            return base.scatter_add(1, ids.unsqueeze(-1).expand(-1, -1, per_window.shape[-1]), per_window)

        masked_count, seen_count = add_up(masked), add_up(torch.ones_like(masked))
        masked_mean = add_up(values * masked) / masked_count.clamp_min(1)
        seen_mean = add_up(values) / seen_count.clamp_min(1)
        grid_prediction = torch.where(masked_count > 0, masked_mean, seen_mean)
        return grid_prediction, (masked_count.squeeze(-1) > 0).float()
