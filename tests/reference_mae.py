"""An independent re-statement of the reference MAE forward pass (facebookresearch/mae's structure).

Written out the long way on purpose: ``[cls + visible]`` through the encoder, mask tokens
appended and unshuffled, the decoder over all ``1 + L`` tokens, prediction for all of them,
cls dropped. leanmim's MAE must give the same loss for the same weights and noise and the
same MACs.
"""

import numpy as np
import pytest
import torch
from torch import nn

from leanmim.methods.mae import MAE


def reference_random_masking(x, noise, mask_ratio):
    """The reference's masking: keep the ``int(L·(1 - ratio))`` patches with the lowest noise.
    (N, L, D) tokens, (N, L) noise -> kept (N, keep, D), mask (N, L) with 1 = hidden, ids_restore (N, L)."""
    n, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, dim))
    mask = torch.ones(n, length)
    mask[:, :len_keep] = 0
    return x, torch.gather(mask, 1, ids_restore), ids_restore


def assert_same_as_hf_vitmae(method, hf, seed, num_images=3):
    """leanmim's MAE and a transformers ViTMAEForPreTraining given the same images and noise: same mask,
    predictions and loss."""
    from leanmim.parts.tokens import BatchRandom

    channels, size = method.encoder.patch_embed.proj.in_channels, hf.config.image_size
    images = torch.randn(num_images, channels, size, size)
    ours = method(images, rng=BatchRandom(seed=seed))
    with torch.no_grad():
        theirs = hf(pixel_values=images, noise=BatchRandom(seed=seed).rand(num_images, ours.mask.shape[1]))
    assert torch.equal(ours.mask, theirs.mask)
    assert torch.allclose(ours.predictions, theirs.logits, atol=1e-5)
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), rel=1e-5)


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
        n = x.shape[0]
        x, mask, ids_restore = reference_random_masking(x, noise, self.mask_ratio)
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


# ----------------------------------------------------------------------------- the same, from a bare state dict

def reference_block(x, state, prefix, heads, eps=1e-6):
    """One pre-norm ViT block from a state dict: x + attn(LN(x)), then x + MLP(LN(x)); written out op by op."""
    import torch.nn.functional as F

    def p(name):
        return state[prefix + name]

    h = F.layer_norm(x, x.shape[-1:], p("norm1.weight"), p("norm1.bias"), eps)
    qkv = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias"))
    n, length, _ = qkv.shape
    q, k, v = qkv.reshape(n, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)
    x = x + F.linear((attn @ v).transpose(1, 2).reshape(n, length, -1), p("attn.proj.weight"), p("attn.proj.bias"))
    h = F.layer_norm(x, x.shape[-1:], p("norm2.weight"), p("norm2.bias"), eps)
    return x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))


def reference_mae_forward(state, imgs, noise, patch_size, heads, decoder_heads, mask_ratio=0.75):
    """The reference's forward_encoder / forward_decoder / forward_loss over a state dict in its own layout
    (patch_embed.*, cls_token, pos_embed, blocks.*, norm.*, decoder_*, mask_token). Returns (loss, pred, mask)."""
    import torch.nn.functional as F

    x = F.conv2d(imgs, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch_size)
    x = x.flatten(2).transpose(1, 2) + state["pos_embed"][:, 1:, :]
    n = x.shape[0]
    x, mask, ids_restore = reference_random_masking(x, noise, mask_ratio)
    x = torch.cat([(state["cls_token"] + state["pos_embed"][:, :1, :]).expand(n, -1, -1), x], dim=1)
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    for i in range(depth):
        x = reference_block(x, state, f"blocks.{i}.", heads)
    x = F.layer_norm(x, x.shape[-1:], state["norm.weight"], state["norm.bias"], 1e-6)
    x = F.linear(x, state["decoder_embed.weight"], state["decoder_embed.bias"])
    mask_tokens = state["mask_token"].repeat(n, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + state["decoder_pos_embed"]
    decoder_depth = len({key.split(".")[1] for key in state if key.startswith("decoder_blocks.")})
    for i in range(decoder_depth):
        x = reference_block(x, state, f"decoder_blocks.{i}.", decoder_heads)
    x = F.layer_norm(x, x.shape[-1:], state["decoder_norm.weight"], state["decoder_norm.bias"], 1e-6)
    pred = F.linear(x, state["decoder_pred.weight"], state["decoder_pred.bias"])[:, 1:, :]
    p = patch_size
    h = w = imgs.shape[2] // p
    target = imgs.reshape(n, imgs.shape[1], h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(n, h * w, -1)
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** .5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


def random_reference_state(dim=32, depth=2, decoder_dim=32, decoder_depth=1, patch=4, chans=3, grid=4, seed=0):
    """A random checkpoint in the reference layout, every name and shape written out (fixed sin-cos tables)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    def block(prefix, width):
        return {f"{prefix}norm1.weight": 1 + rand(width), f"{prefix}norm1.bias": rand(width),
                f"{prefix}attn.qkv.weight": rand(3 * width, width), f"{prefix}attn.qkv.bias": rand(3 * width),
                f"{prefix}attn.proj.weight": rand(width, width), f"{prefix}attn.proj.bias": rand(width),
                f"{prefix}norm2.weight": 1 + rand(width), f"{prefix}norm2.bias": rand(width),
                f"{prefix}mlp.fc1.weight": rand(4 * width, width), f"{prefix}mlp.fc1.bias": rand(4 * width),
                f"{prefix}mlp.fc2.weight": rand(width, 4 * width), f"{prefix}mlp.fc2.bias": rand(width)}

    state = {"cls_token": rand(1, 1, dim), "pos_embed": reference_2d_sincos(dim, grid, cls_token=True).unsqueeze(0),
             "patch_embed.proj.weight": rand(dim, chans, patch, patch), "patch_embed.proj.bias": rand(dim),
             "norm.weight": 1 + rand(dim), "norm.bias": rand(dim),
             "mask_token": rand(1, 1, decoder_dim),
             "decoder_pos_embed": reference_2d_sincos(decoder_dim, grid, cls_token=True).unsqueeze(0),
             "decoder_embed.weight": rand(decoder_dim, dim), "decoder_embed.bias": rand(decoder_dim),
             "decoder_norm.weight": 1 + rand(decoder_dim), "decoder_norm.bias": rand(decoder_dim),
             "decoder_pred.weight": rand(patch * patch * chans, decoder_dim),
             "decoder_pred.bias": rand(patch * patch * chans)}
    for i in range(depth):
        state.update(block(f"blocks.{i}.", dim))
    for i in range(decoder_depth):
        state.update(block(f"decoder_blocks.{i}.", decoder_dim))
    return state
