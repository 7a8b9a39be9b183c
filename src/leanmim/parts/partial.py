"""Partial reconstruction: decode only some masked tokens, still supervise the rest (PR-MIM, docs/methods.md §3).

Decoding every masked token is most of MAE's cost. Partial reconstruction lets the decoder decode
only some masked tokens (the *kept* ones) and *throws* the others. PR-MIM still supervises the
thrown ones through a near-free path. The pieces compose with any MAE-style method that has a
``Masking`` and a ``MaskedDecoder``:

    num_thrown(L, M, t)                   how many masked tokens to throw: ⌊L·t⌋, t a fraction of ALL patches
    split_masked(masking, grid, T, how)   which masked tokens the decoder keeps: furthest / random
    ProgressiveReconstruction             thrown tokens' decoder features mixed from decoded neighbours (k×k box)
    decode_with_late_queries              alternative: thrown mask tokens join only the last decoder block(s)

"Decoded" tokens are everything in the decoder sequence: the visible tokens and the kept masked ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .decoder import MaskedDecoder
from .tokens import BatchRandom, Masking, furthest_point_sampling, grid_coordinates

THROW_SELECTIONS = ("furthest", "random")


def num_thrown(num_patches: int, num_masked: int, throw_ratio: float) -> int:
    """⌊L·t⌋ masked tokens are thrown (t is a fraction of ALL L patches), at most all M masked ones."""
    return min(num_masked, math.floor(num_patches * throw_ratio + 1e-9))


@dataclass
class PartialSplit:
    """The masked patches split into those the decoder reconstructs and those it throws.

    ids_kept:   (B, Q) grid positions of the masked patches the decoder decodes
    ids_thrown: (B, T) grid positions of the masked patches it skips, Q + T = M
    thrown:     (B, L) float, 1 = thrown, in grid order
    """

    ids_kept: Tensor
    ids_thrown: Tensor
    thrown: Tensor


def split_masked(masking: Masking, grid_size: tuple[int, int], num_throw: int, selection: str,
                 rng: BatchRandom) -> PartialSplit:
    """Choose which masked patches the decoder keeps; throw the other ``num_throw`` ones.

    furthest: farthest-point sampling over grid coordinates seeded with the visible patches (ties broken by
              ``rng``), so kept tokens spread evenly and every thrown token has a decoded neighbour close by;
    random:   a uniformly random subset (plain partial reconstruction).
    With ``num_throw = 0`` nothing is drawn and ``ids_kept`` is ``masking.ids_masked`` unchanged.
    """
    ids_masked = masking.ids_masked                                                    # (B, M)
    batch_size, num_masked = ids_masked.shape
    num_patches = masking.mask.shape[1]
    device = ids_masked.device
    num_kept = num_masked - num_throw
    if num_throw == 0:
        ids_kept, ids_thrown = ids_masked, ids_masked[:, :0]
    elif selection == "random":
        order = torch.argsort(rng.rand(batch_size, num_masked, device=device), dim=1)
        shuffled = ids_masked.gather(1, order)
        ids_kept, ids_thrown = shuffled[:, :num_kept], shuffled[:, num_kept:]
    elif selection == "furthest":
        tie_break = rng.rand(batch_size, num_patches, device=device)
        ids_kept = furthest_point_sampling(grid_coordinates(grid_size, device), masking.ids_keep, ids_masked,
                                           num_kept, tie_break)                        # (B, Q)
        is_kept = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=device).scatter(1, ids_kept, True)
        thrown_first = torch.argsort(is_kept.gather(1, ids_masked).to(torch.uint8), dim=1, stable=True)
        ids_thrown = ids_masked.gather(1, thrown_first)[:, :num_throw]                 # (B, T)
    else:
        raise ValueError(f"unknown throw selection '{selection}': use {' or '.join(THROW_SELECTIONS)}")
    thrown = torch.zeros(batch_size, num_patches, device=device).scatter(1, ids_thrown, 1.0)
    return PartialSplit(ids_kept, ids_thrown, thrown)


class ProgressiveReconstruction(nn.Module):
    """Decoder features for thrown tokens, mixed from the decoded tokens around them.

    Each thrown token takes a weighted mean of the final decoder features of the decoded tokens
    (visible and kept) within its k×k box, with weights softmax(logit of the offset) over the
    offsets that hold a decoded token. Logits are −(Euclidean distance of the offset), fixed, or
    learned from that start (``learned=True``, k² parameters). The shared prediction head then maps
    the mixed feature to pixels.

    Fallback: a thrown token with no decoded token in its box copies the features of the nearest
    decoded token on the whole grid (ties: the first in decoder order).

    The mix is a (B, T, N) weight matrix, zero outside each box, times the (B, N, D_d) decoded features:
    T·N·D_d MACs per image, a fraction of a percent of the decoder blocks it replaces.
    """

    def __init__(self, grid_size: tuple[int, int], window: int = 3, learned: bool = False):
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"aggregation window must be an odd number of patches, got {window}")
        self.grid_size, self.window = grid_size, window
        reach = torch.arange(window) - window // 2
        offsets = torch.stack(torch.meshgrid(reach, reach, indexing="ij"), dim=-1).reshape(-1, 2)   # (k², 2)
        self.register_buffer("offsets", offsets, persistent=False)
        logits = -offsets.float().norm(dim=-1)                                                       # (k²,)
        if learned:
            self.offset_logits = nn.Parameter(logits)
        else:
            self.register_buffer("offset_logits", logits, persistent=False)
        coordinates = grid_coordinates(grid_size)
        self.register_buffer("squared_distance", (coordinates[:, None] - coordinates[None]).pow(2).sum(-1),
                             persistent=False)                                                       # (L, L)

    def weights(self, ids_decoded: Tensor, ids_thrown: Tensor) -> Tensor:
        """(B, N) decoded positions, (B, T) thrown positions -> (B, T, N) mixing weights, each row sums to 1."""
        h, w = self.grid_size
        batch_size, num_decoded = ids_decoded.shape
        num_thrown = ids_thrown.shape[1]
        # which decoder slot holds each grid position (−1: not decoded)
        slot_of = torch.full((batch_size, h * w), -1, dtype=torch.long, device=ids_decoded.device)
        slot_of = slot_of.scatter(1, ids_decoded, torch.arange(num_decoded, device=ids_decoded.device).expand(batch_size, -1))
        # the k×k box around each thrown token
        rows = (ids_thrown // w)[..., None] + self.offsets[:, 0]                       # (B, T, k²)
        cols = (ids_thrown % w)[..., None] + self.offsets[:, 1]
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        positions = rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)
        box_slots = slot_of.gather(1, positions.flatten(1)).view(rows.shape)
        in_box = inside & (box_slots >= 0)                                             # (B, T, k²)
        # fallback slot: the nearest decoded token anywhere, used only when the box holds none
        distance = self.squared_distance[ids_thrown[:, :, None], ids_decoded[:, None, :]]   # (B, T, N)
        nearest = distance.argmin(dim=-1, keepdim=True)                                # (B, T, 1)
        box_logits = self.offset_logits.masked_fill(~in_box, float("-inf"))             # (B, T, k²)
        fallback_logit = torch.zeros(batch_size, num_thrown, 1, device=box_logits.device)
        fallback_logit = fallback_logit.masked_fill(in_box.any(dim=-1, keepdim=True), float("-inf"))
        mix = torch.cat([box_logits, fallback_logit], dim=-1).softmax(dim=-1)         # (B, T, k² + 1)
        slots = torch.cat([box_slots.clamp_min(0), nearest], dim=-1)                   # masked-out slots weigh 0
        return torch.zeros(batch_size, num_thrown, num_decoded, dtype=mix.dtype,
                           device=mix.device).scatter_add(2, slots, mix)

    def forward(self, decoded_features: Tensor, ids_decoded: Tensor, ids_thrown: Tensor) -> Tensor:
        """decoded_features (B, N, D_d) at ids_decoded (B, N); ids_thrown (B, T) -> (B, T, D_d)."""
        weights = self.weights(ids_decoded, ids_thrown)
        return torch.bmm(weights.to(decoded_features.dtype), decoded_features)


def decode_with_late_queries(decoder: MaskedDecoder, encoded: Tensor, ids_visible: Tensor, ids_query: Tensor,
                             ids_late: Tensor, late_blocks: int = 1) -> Tensor:
    """Decode with extra mask tokens that join only the last ``late_blocks`` blocks.

    encoded: (B, 1 + K, D); ids_visible (B, K), ids_query (B, Q): decoded by every block;
    ids_late (B, T): mask tokens that enter before the last ``late_blocks`` blocks.
    Returns normed features ``[cls, visible, queries, late]``, (B, 1 + K + Q + T, D_d).
    """
    tokens = decoder.input_tokens(encoded, ids_visible, torch.cat([ids_query, ids_late], dim=1))
    num_late = ids_late.shape[1]
    early, late = tokens[:, :tokens.shape[1] - num_late], tokens[:, tokens.shape[1] - num_late:]
    split = len(decoder.blocks) - late_blocks
    for block in decoder.blocks[:split]:
        early = block(early)
    tokens = torch.cat([early, late], dim=1)
    for block in decoder.blocks[split:]:
        tokens = block(tokens)
    return decoder.norm(tokens)
