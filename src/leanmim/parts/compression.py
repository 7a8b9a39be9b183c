"""Progressive token compression (PCAE, docs/methods.md §2), shared by the PCAE teacher and the encoder.

After selected blocks, score every droppable token by how much it looks like the sequence mean,

    x̂ᵢ = xᵢ / ‖xᵢ‖,   m = mean of the x̂ᵢ,   sᵢ = ⟨m, x̂ᵢ⟩,

and keep the tokens with the *lowest* sᵢ (the least redundant ones); the rest are dropped, not
merged. The grid position of every kept token is tracked through each stage, so callers
know which patches survived.

Two users:
- the PCAE teacher runs over the masked patch tokens only (no cls), keep ratio ρ = 0.5 after
  blocks 1, 5, 9 (1-indexed) of 12, at any depth by the authors' rule (:func:`teacher_blocks_for_depth`);
- ``ViTEncoder.forward_features(images, token_drop=R)`` at fine-tune / inference time keeps the cls
  token, scores the patch tokens only (DESIGN CHOICE: the mean is over patch tokens) and drops
  ⌊n·R⌋ of them after blocks 3, 6, 9 (1-indexed) of 12 (ViT-B/16, R = 0.1: 196 → 177 → 160 → 144),
  rescaled to other depths (:func:`rescale_blocks_of_12`).

Block numbers are 1-indexed ("after block 3" = after the third block), like ``return_layers``. The
authors' code numbers from 0: its "after block 0" is our "after block 1".
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ConfigError
from .tokens import gather_tokens

TEACHER_STAGES = 3                    # the PCAE teacher compresses 3 times (the authors' default)
DOWNSTREAM_BLOCKS_OF_12 = (3, 6, 9)   # our fit of the authors' fine-tune MACs table (1-indexed, of 12 blocks)

TokenScore = Callable[[Tensor], Tensor]   # (B, n, D) tokens -> (B, n) scores, the lowest are kept
KeptCount = Callable[[int], int]          # n tokens -> how many survive a stage


def teacher_blocks_for_depth(depth: int, stages: int = TEACHER_STAGES) -> tuple[int, ...]:
    """1-indexed blocks after which the PCAE teacher compresses, by the authors' released rule: after their
    0-indexed blocks i·(depth // stages), i = 0 … stages − 1, i.e. our blocks i·(depth // stages) + 1.

    ViT-B (12): 1, 5, 9 (theirs 0, 4, 8); ViT-L (24): 1, 9, 17 (0, 8, 16); ViT-H (32): 1, 11, 21 (0, 10, 20).
    Depths below ``stages`` compress once, after block 1 (the repeated block numbers collapse).
    """
    step = depth // stages
    return tuple(sorted({i * step + 1 for i in range(stages)}))


def rescale_blocks_of_12(blocks_of_12: Sequence[int], depth: int) -> tuple[int, ...]:
    """Map 1-indexed block numbers given for 12 blocks to ``depth`` blocks at the same relative depth
    (rounded, duplicates merged): e.g. 3, 6, 9 of 12 -> 6, 12, 18 of 24. Used where no released code fixes
    the rule: downstream token drop and DDAE's deep supervision (6, 8, 10, 12 of 12). The PCAE teacher
    uses :func:`teacher_blocks_for_depth` instead."""
    return tuple(sorted({max(1, min(depth, round(b * depth / 12))) for b in blocks_of_12}))


def keep_fraction(keep_ratio: float) -> KeptCount:
    """Keep ``int(n·ρ)`` tokens (at least one): the PCAE teacher, ρ = 0.5 gives 147 → 73 → 36 → 18.

    ``int(n·ρ)`` is the authors' released count, floating-point product included: e.g. 90·0.7 is
    62.999… in binary floating point, so both keep 62 (an epsilon would round it up to 63).
    DESIGN CHOICE: the released count is 0 once n·ρ < 1 (a later stage of a deep teacher with few masked
    tokens, or a small ρ); we keep at least one token so that the decoder always has a query and the loss is
    defined. Wherever int(n·ρ) ≥ 1 the two counts are equal (tests/test_pcae.py enumerates n ≤ 1024,
    ρ = 0.01 … 0.99)."""
    return lambda num_tokens: max(1, int(num_tokens * keep_ratio))


def drop_fraction(drop_ratio: float) -> KeptCount:
    """Drop ⌊n·R⌋ tokens, keep the rest (at least one): downstream compression, where no released code fixes
    the count. The epsilon guards products that are whole numbers in exact arithmetic but land just below in
    floating point (⌊n·R⌋ of the decimal R the user typed)."""
    return lambda num_tokens: max(1, num_tokens - math.floor(num_tokens * drop_ratio + 1e-9))


def similarity_to_mean(tokens: Tensor) -> Tensor:
    """sᵢ = ⟨mean of the normalized tokens, normalized token i⟩: (B, N, D) -> (B, N), in fp32."""
    normalized = F.normalize(tokens.float(), dim=-1)
    mean = normalized.mean(dim=1, keepdim=True)
    return (normalized * mean).sum(dim=-1)


def keep_lowest(tokens: Tensor, ids: Tensor, scores: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Keep the ``count`` tokens with the lowest score, lowest first.

    tokens: (B, N, D); ids: (B, N) grid positions of the tokens; scores: (B, N).
    Returns (B, count, D) tokens and their (B, count) grid positions.
    """
    order = torch.argsort(scores, dim=1, stable=True)[:, :count]
    return gather_tokens(tokens, order), torch.gather(ids, 1, order)


def run_blocks_compressed(blocks: Sequence[nn.Module], tokens: Tensor, ids: Tensor, stage_blocks: Sequence[int],
                          kept: KeptCount, num_fixed: int = 0,
                          score: TokenScore = similarity_to_mean) -> tuple[Tensor, Tensor]:
    """Run ``blocks``; after each block numbered in ``stage_blocks`` keep ``kept(n)`` of the n droppable tokens.

    tokens: (B, num_fixed + N, D); the first ``num_fixed`` tokens (e.g. cls) are always kept and not scored.
    ids: (B, N) grid positions of the droppable tokens. score: (B, n, D) -> (B, n), lowest kept
    (default: similarity to the mean; pass random numbers for the random-dropping ablation).
    Returns the raw (un-normed) output (B, num_fixed + N', D) and the kept positions (B, N').
    """
    for number, block in enumerate(blocks, start=1):
        tokens = block(tokens)
        if number in stage_blocks:
            fixed, droppable = tokens[:, :num_fixed], tokens[:, num_fixed:]
            droppable, ids = keep_lowest(droppable, ids, score(droppable), kept(droppable.shape[1]))
            tokens = torch.cat([fixed, droppable], dim=1)
    return tokens, ids


def check_token_drop(token_drop: float) -> None:
    if not 0.0 <= token_drop < 1.0:
        raise ConfigError(f"token drop ratio must lie in [0, 1), got {token_drop}")
