"""Reconstruction pictures: original, masked input, reconstruction, reconstruction + visible patches."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..config import ConfigError
from ..methods import MIMMethod
from ..parts.losses import denormalize_prediction
from ..parts.tokens import BatchRandom, patchify, unpatchify


@torch.no_grad()
def reconstruction_panels(method: MIMMethod, images: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """images: (B, C, H, W) normalized -> four (B, C, H, W) panels in the same normalized space.

    Normalized-pixel predictions are mapped back with each patch's own mean and variance;
    without that step MAE reconstructions look like noise.
    """
    model = method.model_config
    output = method(images, rng=BatchRandom(seed))
    if output.predictions is None or output.mask is None:
        raise ConfigError(f"method '{method.name}' does not predict pixels for every patch, so it cannot draw "
                          f"reconstructions (use a pixel target option if it has one)")
    patches = patchify(images, model.patch_size)
    predictions = output.predictions.float()
    if getattr(method.options, "norm_pix_loss", True):
        predictions = denormalize_prediction(predictions, patches)
    mask = output.mask.unsqueeze(-1)                      # (B, L, 1), 1 = masked
    to_image = lambda p: unpatchify(p, model.patch_size, model.grid_size, model.in_chans)  # noqa: E731
    return {
        "original": images,
        "masked input": to_image(patches * (1 - mask)),
        "reconstruction": to_image(predictions),
        "reconstruction + visible": to_image(patches * (1 - mask) + predictions * mask),
    }


def save_reconstruction_grid(panels: dict[str, Tensor], mean, std, out: str | Path) -> Path:
    """One row per image, one column per panel, written as PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    names = list(panels)
    rows = panels[names[0]].shape[0]
    figure, axes = plt.subplots(rows, len(names), figsize=(2 * len(names), 2 * rows), squeeze=False)
    for column, name in enumerate(names):
        pictures = (panels[name].float().cpu() * std_t + mean_t).clamp(0, 1)
        for row in range(rows):
            picture = pictures[row].permute(1, 2, 0).numpy()
            axis = axes[row][column]
            axis.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name, fontsize=9)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out
