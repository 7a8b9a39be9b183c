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


def window_noise_shapes(num_windows: int, window_size: int,
                        grid_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The noise :func:`random_windows` takes for ``num_windows`` m×m windows on an h×w grid, per image:
    rows (⌈n / (h − m + 1)⌉, h − m + 1) and columns (⌈n / (w − m + 1)⌉, w − m + 1), one permutation per row."""
    h, w = grid_size
    shapes = []
    for room in (h - window_size + 1, w - window_size + 1):
        shapes.append((-(-num_windows // room), room))
    return shapes[0], shapes[1]


def distinct_draws(noise: Tensor, count: int) -> Tensor:
    """``count`` values of 0 … k−1 per image, without replacement while they last.

    noise: (B, R, k) uniform; each of its R rows ranks into a random permutation of 0 … k−1 (the released
    ``torch.randperm(k)``), the permutations are concatenated and the first ``count`` kept: (B, count) int64.
    count ≤ k: all distinct. count > k (R > 1): every value once, then a fresh permutation, and so on, so no
    value appears more than ⌈count / k⌉ times.
    """
    return noise.argsort(dim=-1).flatten(1)[:, :count]


def random_windows(row_noise: Tensor, col_noise: Tensor, num_windows: int, window_size: int,
                   grid_size: tuple[int, int]) -> Tensor:
    """Grid positions of ``num_windows`` randomly placed m×m windows of patches per image, LoMaR's sampling.

    The released code draws the windows' top rows without replacement (``randperm(h − m + 1)[:n]``), their
    left columns likewise, and pairs them in order: two windows of an image never share a top row nor a left
    column, and every window lies inside the grid. Drawn here per image from
    row_noise (B, ⌈n/(h−m+1)⌉, h−m+1) and col_noise (B, ⌈n/(w−m+1)⌉, w−m+1) uniform (shapes:
    :func:`window_noise_shapes`). More windows than top rows (n > h − m + 1; the released code then makes
    fewer windows than asked, or fails on a non-square grid): every row is used once before any is used again
    (:func:`distinct_draws`), likewise columns, so windows may then share a row or coincide.
    Returns (B, n, m²) int64 grid positions, row-major inside each window.
    """
    w = grid_size[1]
    m = window_size
    tops = distinct_draws(row_noise, num_windows)                            # (B, n) top rows
    lefts = distinct_draws(col_noise, num_windows)                           # (B, n) left columns
    offsets = torch.arange(m, device=row_noise.device)
    rows = tops[..., None, None] + offsets.view(m, 1)                        # (B, n, m, 1)
    cols = lefts[..., None, None] + offsets.view(1, m)                       # (B, n, 1, m)
    return (rows * w + cols).flatten(-2)                                     # (B, n, m²)


def random_mask_of_size(noise: Tensor, num_masked: int) -> Tensor:
    """(N, K) noise -> (N, K) float mask with exactly ``num_masked`` ones per row (the lowest noise)."""
    rank = torch.argsort(torch.argsort(noise, dim=-1), dim=-1)
    return (rank < num_masked).float()


def furthest_point_sampling(coordinates: Tensor, ids_seed: Tensor, ids_candidates: Tensor, num_picks: int,
                            tie_break: Tensor | None = None) -> Tensor:
    """Greedy farthest-point sampling: pick ``num_picks`` candidates, each the one farthest from everything
    chosen so far (the seeds included), so the picks spread evenly around the seeds.

    coordinates: (L, 2) integer-valued grid (row, col) of every position, e.g. :func:`grid_coordinates`;
    ids_seed: (B, S) positions already chosen (e.g. the visible patches; S may be 0);
    ids_candidates: (B, M) positions that may be picked, M ≥ num_picks;
    tie_break: (B, L) values in [0, 1) that decide between equally far candidates (deterministic for a seeded
    ``BatchRandom``); without it the lowest grid index wins. Squared distances on an integer grid are integers,
    so a tie-break below 1/2 never overrides a real difference.
    Returns (B, num_picks) picked positions, in picking order. Loops over the picks, vectorised over the batch.
    """
    batch_size, num_positions = ids_candidates.shape[0], coordinates.shape[0]
    squared = (coordinates[:, None] - coordinates[None]).pow(2).sum(-1)                 # (L, L), exact on a grid
    unreachable = squared.max() + 1                                                      # farther than anything
    farthest = torch.full((batch_size, num_positions), float("-inf"), device=coordinates.device)
    farthest = farthest.scatter(1, ids_candidates, unreachable.expand(ids_candidates.shape))  # −inf: not pickable
    if ids_seed.shape[1]:
        farthest = torch.minimum(farthest, squared[ids_seed].amin(dim=1))               # distance² to nearest seed
    tie_break = 0.5 * tie_break if tie_break is not None else torch.zeros_like(farthest)
    picks = []
    for _ in range(num_picks):
        pick = (farthest + tie_break).argmax(dim=1)                                      # (B,)
        picks.append(pick)
        farthest = torch.minimum(farthest, squared[pick]).scatter(1, pick[:, None], float("-inf"))
    return torch.stack(picks, dim=1) if picks else ids_candidates[:, :0]
