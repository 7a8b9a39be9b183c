"""A light transformer decoder over an arbitrary set of grid positions.

MAE decodes every masked position; PCAE only the retained ones; PR-MIM a furthest-sampled
subset. All of them are: encoder tokens at their positions + one shared mask token at each
query position, each with the decoder's fixed sin-cos position embedding, then blocks.
Attention has no positional bias, so token order is irrelevant; we keep ``[cls, visible, queries]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .encoder import init_mae_weights, keep_legacy_pos_embed, make_blocks, sincos_pos_embed


class MaskedDecoder(nn.Module):
    """Linear D → D_d, mask tokens at the query positions, ``depth`` blocks, LayerNorm, Linear D_d → out_dim.

    drop_path: stochastic depth of every block, the same rate in each (PCAE's released decoder: 0.25;
    MAE's decoder has none, 0). Active in training mode only.
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, depth: int, num_heads: int,
                 grid_size: tuple[int, int], out_dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.decoder_dim = decoder_dim
        self.embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.grid_size = tuple(grid_size)
        self.register_buffer("pos_embed", sincos_pos_embed(grid_size, decoder_dim))   # (L, D_d), fixed, stored
        self.register_load_state_dict_pre_hook(keep_legacy_pos_embed)
        self.blocks = make_blocks(decoder_dim, depth, num_heads, mlp_ratio, drop_path, rising=False)
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.head = nn.Linear(decoder_dim, out_dim)
        self.apply(init_mae_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def input_tokens(self, encoded: Tensor, ids_visible: Tensor, ids_query: Tensor) -> Tensor:
        """Build the decoder sequence.

        encoded: (B, 1 + K, D) encoder output (cls first); ids_visible: (B, K); ids_query: (B, Q).
        Returns (B, 1 + K + Q, D_d): ``[cls, visible, mask tokens]`` with position embeddings.
        """
        tokens = self.embed(encoded)
        cls, visible = tokens[:, :1], tokens[:, 1:]
        visible = visible + self.pos_embed[ids_visible].to(visible.dtype)
        queries = self.mask_token.to(visible.dtype) + self.pos_embed[ids_query].to(visible.dtype)
        return torch.cat([cls, visible, queries], dim=1)

    def forward_features(self, encoded: Tensor, ids_visible: Tensor, ids_query: Tensor) -> Tensor:
        """(B, 1 + K, D), (B, K), (B, Q) -> normed decoder features ``[cls, visible, queries]``, (B, 1 + K + Q, D_d)."""
        tokens = self.input_tokens(encoded, ids_visible, ids_query)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, encoded: Tensor, ids_visible: Tensor, ids_query: Tensor) -> Tensor:
        """Predictions for ``[visible, queries]`` in that order: (B, K + Q, out_dim).

        The head also runs on cls (then dropped), exactly as the reference MAE does, so MACs match it.
        """
        return self.head(self.forward_features(encoded, ids_visible, ids_query))[:, 1:]
