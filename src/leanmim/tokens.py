"""Index operations on token tensors, shared by every method.

Conventions: images are ``(B, C, H, W)``; a ``p``-pixel patch grid is ``h × w`` with
``L = h·w`` patches numbered row-major; token tensors are ``(B, N, D)``; index tensors
``ids_*`` are ``(B, K)`` int64 holding grid positions (0 … L−1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, L, p·p·C), each patch flattened in (row, col, channel) order."""
    batch, channels, height, width = images.shape
    p = patch_size
    h, w = height // p, width // p
    patches = images.reshape(batch, channels, h, p, w, p)
    patches = patches.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return patches.reshape(batch, h * w, p * p * channels)


def unpatchify(patches: Tensor, patch_size: int, grid_size: tuple[int, int], channels: int) -> Tensor:
    """(B, L, p·p·C) -> (B, C, h·p, w·p); the inverse of :func:`patchify`."""
    batch = patches.shape[0]
    p = patch_size
    h, w = grid_size
    images = patches.reshape(batch, h, w, p, p, channels)
    images = images.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return images.reshape(batch, channels, h * p, w * p)


def gather_tokens(tokens: Tensor, ids: Tensor) -> Tensor:
    """Pick tokens by index: (B, N, D), (B, K) -> (B, K, D)."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(base: Tensor, ids: Tensor, values: Tensor) -> Tensor:
    """Write ``values`` (B, K, D) into a copy of ``base`` (B, N, D) at positions ``ids`` (B, K)."""
    return base.scatter(1, ids.unsqueeze(-1).expand(-1, -1, base.shape[-1]), values)


@dataclass
class Masking:
    """A per-sample split of the L patches into visible and masked ones.

    ids_keep:    (B, K) grid positions of the visible patches, in shuffled order
    ids_masked:  (B, M) grid positions of the masked patches, K + M = L
    ids_restore: (B, L) argsort of the shuffle: ``cat(keep, masked)[ids_restore]`` is grid order
    mask:        (B, L) float, 1 = masked, 0 = visible, in grid order
    """

    ids_keep: Tensor
    ids_masked: Tensor
    ids_restore: Tensor
    mask: Tensor

    @property
    def ids_shuffle(self) -> Tensor:
        """(B, L) visible positions then masked positions."""
        return torch.cat([self.ids_keep, self.ids_masked], dim=1)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """⌊L·(1−r)⌋ patches stay visible (at least one)."""
    return max(1, int(num_patches * (1 - mask_ratio)))


def random_masking(noise: Tensor, mask_ratio: float) -> Masking:
    """MAE masking from per-patch noise (B, L): argsort it; the first ⌊L·(1−r)⌋ indices stay visible."""
    batch_size, num_patches = noise.shape
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    keep = num_visible(num_patches, mask_ratio)
    mask = torch.ones(batch_size, num_patches, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_shuffle[:, :keep], ids_shuffle[:, keep:], ids_restore, mask)


class BatchRandom:
    """Random numbers for one training step that do not depend on how it is run.

    Seeded by (seed, step), drawn for the *global* batch and sliced for this process: a resumed
    run draws what the uninterrupted run drew, and 2 processes × B images draw what 1 process ×
    2B images draws. Without a seed it uses torch's global generator (tests, evaluation).
    """

    def __init__(self, seed: int | None = None, step: int = 0, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator().manual_seed(seed * 1_000_003 + step)

    def rand(self, batch_size: int, *shape: int, device: torch.device | str = "cpu") -> Tensor:
        """Uniform [0, 1) of shape (batch_size, *shape) for this process's share of the global batch."""
        if self.generator is None:
            return torch.rand(batch_size, *shape, device=device)
        everything = torch.rand(self.world_size * batch_size, *shape, generator=self.generator)
        start = self.rank * batch_size
        return everything[start:start + batch_size].to(device)


def grid_coordinates(grid_size: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """(L, 2) float (row, col) of every patch, row-major."""
    h, w = grid_size
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()
