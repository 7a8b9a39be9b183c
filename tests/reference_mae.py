"""An independent re-statement of the reference MAE forward pass (facebookresearch/mae's structure).

Written out the long way on purpose: ``[cls + visible]`` through the encoder, mask tokens
appended and unshuffled, the decoder over all ``1 + L`` tokens, prediction for all of them,
cls dropped. leanmim's MAE must give the same loss for the same weights and noise and the
same MACs.
"""

import numpy as np
import torch
from torch import nn

from leanmim.methods.mae import MAE


def reference_1d_sincos(embed_dim, pos):
    """The reference's 1-D table: (M,) positions -> (M, embed_dim), ``[sin | cos]``."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def reference_2d_sincos(embed_dim, grid_size, cls_token=False):
    """The reference's 2-D table, (grid², D) (+ a zero cls row): meshgrid(w, h), so the first half encodes w."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb = np.concatenate([reference_1d_sincos(embed_dim // 2, grid[0]), reference_1d_sincos(embed_dim // 2, grid[1])],
                         axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


class ReferenceMAE(nn.Module):
    def __init__(self, leanmim_mae: MAE):
        super().__init__()
        encoder, decoder = leanmim_mae.encoder, leanmim_mae.decoder
        self.patch_size = leanmim_mae.model_config.patch_size
        self.patch_embed = encoder.patch_embed
        self.cls_token = encoder.cls_token
        grid = encoder.grid_size[0]
        # The reference's own fixed tables (not leanmim's): a channel-order difference would change the loss.
        self.pos_embed = reference_2d_sincos(encoder.embed_dim, grid, cls_token=True).unsqueeze(0)
        self.blocks, self.norm = encoder.blocks, encoder.norm
        self.decoder_embed, self.mask_token = decoder.embed, decoder.mask_token
        self.decoder_pos_embed = reference_2d_sincos(decoder.decoder_dim, grid, cls_token=True).unsqueeze(0)
        self.decoder_blocks, self.decoder_norm, self.decoder_pred = decoder.blocks, decoder.norm, decoder.head
        self.mask_ratio = leanmim_mae.options.mask_ratio

    def forward(self, imgs, noise):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        n, length, dim = x.shape
        len_keep = int(length * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, dim))
        mask = torch.ones(n, length)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(n, -1, -1)
        x = torch.cat((cls, x), dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        # decoder
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(n, ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        # loss on normalized pixels
        p = self.patch_size
        h = w = imgs.shape[2] // p
        target = imgs.reshape(n, imgs.shape[1], h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(n, h * w, -1)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** .5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum(), pred, mask
