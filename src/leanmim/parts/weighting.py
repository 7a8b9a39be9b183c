"""Difficulty weighting of masked patches by their distance to the nearest visible patch (DDAE, docs/methods.md §5).

A masked patch next to a visible one is easy to reconstruct (copy the neighbour); one deep in
a masked region is hard. With dᵢ the grid distance of masked patch i to the nearest visible
patch, its weight in the loss is

    wᵢ = dᵢ^β / mean over the sample's masked patches of d^β        (visible patches: 0)

so the weights of one image average to 1 over its masked patches. β < 0 favours the near
(easy) patches, β > 0 the far (hard) ones, β = 0 is MAE's plain average. β moves over
training and with the depth being supervised:

    β(l, τ) = β₀ + (β₁ − β₀)·τ + δ·(l / depth − 1)

DESIGN CHOICE: the depth term is zero at the last block, so the final output follows the
β₀ → β₁ schedule exactly and shallower blocks are shifted by δ·(l/depth − 1) ≤ 0 (with δ > 0:
shallower blocks lean towards the near patches).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .tokens import grid_coordinates


def distance_to_visible(mask: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """Euclidean grid distance of every patch to the nearest visible patch.

    mask: (B, L), 1 = masked, grid order. Returns (B, L) float: 0 for visible patches, ≥ 1 for
    masked ones (inf if a sample has no visible patch at all).
    """
    coordinates = grid_coordinates(grid_size, device=mask.device)                      # (L, 2)
    pairwise = (coordinates[:, None] - coordinates[None]).pow(2).sum(-1).sqrt()        # (L, L), exact on the grid
    to_masked = mask.bool()[:, None, :]                                                # (B, 1, L): column j masked
    return pairwise.expand(mask.shape[0], -1, -1).masked_fill(to_masked, float("inf")).amin(dim=-1)


def depth_beta(progress: float, block: int, depth: int, beta_start: float, beta_end: float,
               depth_slope: float) -> float:
    """β(l, τ) = β₀ + (β₁ − β₀)·τ + δ·(l / depth − 1), for block ``l`` (1-indexed) of ``depth``."""
    return beta_start + (beta_end - beta_start) * progress + depth_slope * (block / depth - 1)


def dynamic_weights(distance: Tensor, mask: Tensor, beta: float) -> Tensor:
    """(B, L) weights d^β / mean over masked of d^β on masked patches, 0 on visible ones.

    distance: (B, L) from :func:`distance_to_visible`; mask: (B, L), 1 = masked. With β = 0 the
    result equals ``mask`` exactly.
    """
    masked = mask.bool()
    powered = torch.where(masked, distance.clamp_min(1.0).pow(beta), torch.zeros_like(distance))
    mean_over_masked = powered.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp_min(1)
    return powered / mean_over_masked
