"""Deep supervision: predictions from several encoder depths through one light shared decoder (DDAE, docs/methods.md §5).

For each supervised block l the student's raw block output (B, 1 + K, D) passes its own
LayerNorm and input projection D → D_d; the projected sequences of all depths are stacked
along the batch and decoded *once* by a light decoder whose weights every depth shares
(mask tokens at the masked positions, its own position embedding, a few blocks, one head).
The head predicts, per position, normalized pixels (p²·C values) and, where a teacher is
distilled, the teacher's features at the same depth (D values).

Which blocks: given as block numbers of a 12-block encoder (default 6, 8, 10, 12) and rescaled to
the actual depth by :func:`supervised_blocks_for_depth`. DDAE has no released code to follow here;
this is a different rule from the PCAE teacher's (``compression.teacher_blocks_for_depth``, the
authors' ``i·(depth // 3)``), and the two are kept apart on purpose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compression import rescale_blocks_of_12
from .decoder import MaskedDecoder
from .encoder import init_mae_weights


def supervised_blocks_for_depth(blocks_of_12: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """1-indexed supervised blocks of a ``depth``-block encoder from numbers given for 12 blocks, at the same
    relative depth (rounded, duplicates merged): 6, 8, 10, 12 of 12 -> 12, 16, 20, 24 of 24; 2, 3, 4 of 4."""
    return rescale_blocks_of_12(blocks_of_12, depth)


class DepthInput(nn.Sequential):
    """One supervised depth's LayerNorm (eps 1e-6) and input projection D → D_d: (B, N, D) -> (B, N, D_d)."""

    def __init__(self, encoder_dim: int, decoder_dim: int):
        super().__init__(nn.LayerNorm(encoder_dim, eps=1e-6), nn.Linear(encoder_dim, decoder_dim))
        self.apply(init_mae_weights)


class DeepSupervision(nn.ModuleDict):
    """Entries ``block<l>`` (a :class:`DepthInput` per supervised block) and ``decoder`` (shared).

    A ModuleDict so that ``leanmim cost`` reports each depth's input and the shared decoder apart.
    """

    def __init__(self, blocks: tuple[int, ...], encoder_dim: int, decoder_dim: int, decoder_depth: int,
                 num_heads: int, grid_size: tuple[int, int], pixel_dim: int, feature_dim: int = 0,
                 mlp_ratio: float = 4.0):
        inputs = {f"block{block}": DepthInput(encoder_dim, decoder_dim) for block in blocks}
        decoder = MaskedDecoder(decoder_dim, decoder_dim, decoder_depth, num_heads, grid_size,
                                pixel_dim + feature_dim, mlp_ratio)
        decoder.embed = nn.Identity()  # each depth brings its own input projection
        super().__init__({**inputs, "decoder": decoder})
        self.blocks, self.pixel_dim, self.feature_dim = tuple(blocks), pixel_dim, feature_dim

    def forward(self, block_outputs: list[Tensor], ids_visible: Tensor, ids_query: Tensor) -> list[Tensor]:
        """Predict at ``[visible, queries]`` from each supervised depth.

        block_outputs: one raw (B, 1 + K, D) per supervised block, in ``self.blocks`` order;
        ids_visible: (B, K); ids_query: (B, Q).
        Returns one (B, K + Q, p²·C + F) per block: pixels first, then features (F = feature_dim).
        """
        depths = len(self.blocks)
        projected = [self[f"block{block}"](tokens) for block, tokens in zip(self.blocks, block_outputs)]
        stacked = torch.cat(projected, dim=0)                                       # (n·B, 1 + K, D_d)
        predictions = self["decoder"](stacked, ids_visible.repeat(depths, 1), ids_query.repeat(depths, 1))
        return list(predictions.chunk(depths, dim=0))


def per_token_feature_loss(prediction: Tensor, target: Tensor, kind: str = "smooth_l1") -> Tensor:
    """Feature regression per token, in fp32: (B, N, D), (B, N, D) -> (B, N). ``kind``: smooth_l1 or mse."""
    if kind == "smooth_l1":
        return F.smooth_l1_loss(prediction.float(), target.float(), reduction="none").mean(dim=-1)
    if kind == "mse":
        return (prediction.float() - target.float()).pow(2).mean(dim=-1)
    raise ValueError(f"unknown feature loss '{kind}': use smooth_l1 or mse")
