from functools import partial

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from conftest import tiny_model, train_steps
from leanmim.config import ConfigError
from leanmim.eval.cost import count_forward
from leanmim.weights import export_encoder, load_relpos_encoder
from leanmim.parts.losses import normalized_pixels
from leanmim.methods import build_method
from leanmim.parts.relpos import (CLS_BUCKET, RelPosAttention, RelPosBlock, RelPosViTEncoder, axis_bucket,
                                  relative_buckets)
from leanmim.parts.tokens import BatchRandom, random_mask_of_size, random_windows, window_noise_shapes


def lomar(window_size=2, num_windows=3, **model):
    torch.manual_seed(0)
    return build_method("lomar", tiny_model(**model).resolved(), {"window_size": window_size, "num_windows": num_windows})


def randomize_relative_tables(encoder):
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.relative_table.normal_(std=0.5)


def draw_windows(rng, batch, n, m, grid):
    row_shape, col_shape = window_noise_shapes(n, m, grid)
    return random_windows(rng.rand(batch, *row_shape), rng.rand(batch, *col_shape), n, m, grid)


def test_windows_are_in_bounds_contiguous_and_per_image():
    # hand case: 5×6 grid, 3×3 windows: 3 possible top rows, 4 left columns; the noise ranks them
    rows, cols = torch.tensor([[[0.2, 0.9, 0.5]]]), torch.tensor([[[0.7, 0.1, 0.4, 0.3]]])
    ids = random_windows(rows, cols, 2, 3, (5, 6))                   # tops argsort → 0, 2; lefts → 1, 3
    assert ids.tolist() == [[[1, 2, 3, 7, 8, 9, 13, 14, 15], [15, 16, 17, 21, 22, 23, 27, 28, 29]]]
    batch, n, m, (h, w) = 64, 4, 3, (7, 9)
    ids = draw_windows(BatchRandom(seed=1), batch, n, m, (h, w))
    assert ids.shape == (batch, n, m * m) and ids.min() >= 0 and ids.max() < h * w
    rows, cols = ids // w, ids % w
    # each window is an m×m block: offsets from its top-left patch are exactly (0..m-1)²
    offsets = torch.stack([rows - rows[..., :1], cols - cols[..., :1]], dim=-1)
    expected = torch.stack(torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij"), -1).reshape(m * m, 2)
    assert torch.equal(offsets, expected.expand_as(offsets))
    # every top-left corner position can occur, and images do not share their windows
    corners = ids[..., 0]
    assert set((corners // w).flatten().tolist()) == set(range(h - m + 1))
    assert set((corners % w).flatten().tolist()) == set(range(w - m + 1))
    assert len({tuple(sorted(image.tolist())) for image in corners}) > batch // 2


def test_windows_of_one_image_never_share_a_top_row_or_a_left_column():
    """The released sampling, per image: randperm(h − m + 1)[:n] top rows, randperm(w − m + 1)[:n] left
    columns. With replacement (leanmim ≤ issue 26) about 1 image in 11 got two identical windows here."""
    batch, n, m, grid = 512, 4, 7, (14, 14)                           # ViT-B/16 at 224, LoMaR's defaults
    ids = draw_windows(BatchRandom(seed=3), batch, n, m, grid)
    tops, lefts = ids[..., 0] // grid[1], ids[..., 0] % grid[1]      # (B, n)
    for per_window in (tops, lefts):
        assert all(len(set(image.tolist())) == n for image in per_window)
    # each (row, column) pair as likely as in randperm: all 8·7·6·5 ordered top rows occur about equally
    assert set(tops.flatten().tolist()) == set(range(8))



def test_the_method_draws_distinct_rows_and_columns_per_image(monkeypatch):
    import leanmim.methods.lomar as lomar_module

    drawn = []
    monkeypatch.setattr(lomar_module, "random_windows",
                        lambda *args: drawn.append(random_windows(*args)) or drawn[-1])
    method = lomar(window_size=2, num_windows=3, img_size=16)         # 4×4 grid: 3 possible top rows, 3 windows
    method(torch.randn(32, method.model_config.in_chans, 16, 16), rng=BatchRandom(seed=0))
    corners = drawn[0][..., 0]                                        # (32, 3) top-left patch of each window
    for per_window in (corners // 4, corners % 4):
        assert torch.equal(per_window.sort(dim=1).values, torch.tensor([[0, 1, 2]]).expand(32, -1))


def test_more_windows_than_rows_use_every_row_before_repeating_one():
    """n > h − m + 1: the released code would make fewer windows; leanmim makes n, cycling fresh permutations."""
    batch, n, m, grid = 64, 5, 3, (4, 4)                             # 2 possible top rows and left columns
    ids = draw_windows(BatchRandom(seed=0), batch, n, m, grid)
    tops, lefts = ids[..., 0] // grid[1], ids[..., 0] % grid[1]
    for per_window in (tops, lefts):
        assert torch.equal(per_window[:, :2].sort(dim=1).values, torch.tensor([[0, 1]]).expand(batch, -1))
        assert torch.equal(per_window[:, 2:4].sort(dim=1).values, torch.tensor([[0, 1]]).expand(batch, -1))
        counts = torch.stack([(per_window == value).sum(1) for value in (0, 1)], 1)   # (B, 2) per image
        assert counts.max() <= 3 and counts.min() >= 2                               # ⌈5/2⌉ = 3 at most


def test_masked_counts_per_window_are_exact():
    mask = random_mask_of_size(torch.rand(50, 49), 39)
    assert torch.equal(mask.sum(1), torch.full((50,), 39.0))
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3]])
    assert random_mask_of_size(noise, 2).tolist() == [[0.0, 1.0, 0.0, 1.0]]
    options = lambda **values: build_method("lomar", tiny_model(img_size=28).resolved(), values).options  # noqa: E731
    assert options().num_masked == 39                        # the authors' 39 of 49
    assert options(window_size=5).num_masked == 20
    assert options(window_size=4).num_masked == 12
    # in the method: every window sequence gets exactly ⌊m²·r⌋ masked patches; with one window per
    # image the grid mask holds exactly those, and no patch outside the window
    method = lomar(window_size=3, num_windows=1)                      # 4×4 grid, ⌊9·0.8⌋ = 7
    output = method(torch.randn(5, 1, 16, 16), rng=BatchRandom(seed=2))
    assert torch.equal(output.mask.sum(1), torch.full((5,), 7.0))
    assert output.predictions.shape == (5, 16, 16)
    outside = output.predictions.abs().sum(-1) == 0
    assert outside.sum(1).tolist() == [16 - 9] * 5 and not (outside & (output.mask > 0)).any()


def test_relative_buckets_take_the_stated_values():
    offsets = torch.arange(-6, 7)
    assert axis_bucket(offsets).tolist() == [-3, -3, -3, -2, -2, -1, 0, 1, 2, 2, 3, 3, 3]
    buckets = relative_buckets((3, 9))
    assert buckets.shape == (28, 28)
    assert (buckets[0] == CLS_BUCKET).all() and (buckets[:, 0] == CLS_BUCKET).all() and CLS_BUCKET == 49
    patch = lambda row, col: 1 + row * 9 + col  # noqa: E731
    center = 3 * 7 + 3
    assert buckets[patch(1, 4), patch(1, 4)] == center
    assert buckets[patch(0, 0), patch(1, 1)] == (3 - 1) * 7 + (3 - 1)        # Δ = (−1, −1)
    assert buckets[patch(2, 8), patch(0, 5)] == (3 + 2) * 7 + (3 + 2)        # Δ = (2, 3) -> (2, 2)
    assert buckets[patch(0, 0), patch(2, 8)] == (3 - 2) * 7 + (3 - 3)        # Δ = (−2, −8) -> (−2, −3)
    assert len(relative_buckets((9, 9))[1:, 1:].unique()) == 49


@pytest.mark.parametrize("relative_term", ["added", "scaled"])
def test_block_with_zero_relative_term_equals_timm_block_and_with_it_matches_hand_attention(relative_term):
    torch.manual_seed(0)
    dim, heads, grid = 32, 4, (3, 3)
    ours = RelPosBlock(dim, heads, relative_term=relative_term).eval()
    plain = Block(dim, heads, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    state = {name: value for name, value in ours.state_dict().items() if "relative" not in name}
    plain.load_state_dict(state)
    tokens, buckets = torch.randn(2, 10, dim), relative_buckets(grid)
    assert torch.allclose(ours(tokens, buckets), plain(tokens), atol=1e-6)

    # with a table, the same r for every head. The authors' iRPE ("added"):
    #     logits = scale · q·kᵀ + q·r[bucket(i, j)]ᵀ      (vision_transformer_irpe.py: attn = q@kᵀ·scale + rpe_k(q))
    # the ablation ("scaled"): logits = scale · q·(k_j + r[bucket(i, j)])ᵀ
    nn.init.normal_(ours.attn.relative_table)
    attention = ours.attn
    normed = ours.norm1(tokens)
    q, k, v = attention.qkv(normed).reshape(2, 10, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    table = attention.relative_table[buckets]                                  # (N, N, d)
    position_term = torch.einsum("bhid,ijd->bhij", q, table)
    scale = (dim // heads) ** -0.5
    if relative_term == "added":
        logits = scale * (q @ k.transpose(-1, -2)) + position_term
    else:
        logits = scale * (q @ k.transpose(-1, -2)) + scale * position_term
    mixed = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, dim)
    expected = tokens + attention.proj(mixed)
    expected = expected + ours.mlp(ours.norm2(expected))
    assert torch.allclose(ours(tokens, buckets), expected, atol=1e-5)


def test_relative_term_forms_on_a_one_head_two_token_hand_case():
    """Head width 4 (scale 1/2), identity projections, tokens [cls, patch] on a 1×1 grid: every pair is the
    cls bucket except (patch, patch), the centre bucket 24. Logits written out by hand for both forms."""
    x = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]])         # (B=1, N=2, D=4)
    buckets = relative_buckets((1, 1))
    assert buckets.tolist() == [[CLS_BUCKET, CLS_BUCKET], [CLS_BUCKET, 24]]
    for relative_term, expected_logits in (
            # scale·q·k: [[0.5, 0], [0, 2]]; q·r: r[49] = (1, 1, 0, 0), r[24] = (0, 3, 0, 0) -> [[1, 1], [2, 6]]
            ("added", [[0.5 + 1, 0 + 1], [0 + 2, 2 + 6]]),
            ("scaled", [[0.5 + 0.5, 0 + 0.5], [0 + 1, 2 + 3]])):
        attention = RelPosAttention(4, num_heads=1, qkv_bias=False, relative_term=relative_term)
        with torch.no_grad():
            attention.qkv.weight.copy_(torch.eye(4).repeat(3, 1))               # q = k = v = x
            attention.proj.weight.copy_(torch.eye(4))
            attention.proj.bias.zero_()
            attention.relative_table.zero_()
            attention.relative_table[CLS_BUCKET, :2] = 1.0
            attention.relative_table[24, 1] = 3.0
        weights = torch.tensor(expected_logits).softmax(-1)                         # (N, N)
        assert torch.allclose(attention(x, buckets)[0], weights @ x[0], atol=1e-6), relative_term


def test_relative_term_option_reaches_every_block_and_bad_values_are_one_line_errors():
    assert lomar().options.relative_term == "added"
    method = build_method("lomar", tiny_model().resolved(), {"window_size": 2, "relative_term": "scaled"})
    assert {block.attn.relative_term for block in method.encoder.blocks} == {"scaled"}
    assert method.encoder.resized(32).blocks[0].attn.relative_term == "scaled"
    with pytest.raises(ConfigError, match="relative_term: 'bias' is not one of added, scaled"):
        build_method("lomar", tiny_model().resolved(), {"relative_term": "bias"})
    with pytest.raises(ConfigError, match="relative_term must be one of added, scaled, got 'bias'"):
        RelPosViTEncoder(16, 4, 1, 32, 1, 2, relative_term="bias")


def test_same_weights_run_on_7_14_and_24_grids_and_relative_positions_matter():
    torch.manual_seed(0)
    encoder = RelPosViTEncoder(28, 4, 1, 32, 2, 2).eval()
    randomize_relative_tables(encoder)
    state = encoder.state_dict()
    for img_size, side in ((28, 7), (56, 14), (96, 24)):
        images = torch.randn(2, 1, img_size, img_size)
        resized = encoder.resized(img_size).eval()                              # loads the state dict unchanged
        assert resized.grid_size == (side, side) and resized.img_size == img_size
        assert state.keys() == resized.state_dict().keys()
        features = resized.forward_features(images)
        assert features.shape == (2, 1 + side * side, 32) and torch.isfinite(features).all()
        assert torch.allclose(features, encoder.forward_features(images), atol=1e-6)
    # without an absolute position embedding only the relative term tells positions apart: swapping two
    # patches moves their features along with zero tables, and changes them with trained ones
    images = torch.randn(1, 1, 28, 28)
    swapped = images.clone()
    swapped[..., :4, :4], swapped[..., 24:, 24:] = images[..., 24:, 24:], images[..., :4, :4]
    first, last = 1, 49
    moved = lambda enc: (enc.forward_features(images)[0, first] - enc.forward_features(swapped)[0, last]).abs().max()  # noqa: E731
    assert moved(encoder) > 1e-3
    for block in encoder.blocks:
        nn.init.zeros_(block.attn.relative_table)
    assert moved(encoder) < 1e-5


def test_loss_equals_per_image_per_window_reference():
    """Image b is reconstructed from its own windows (b, 0 … n−1): a loop over images and windows on the same draws."""
    method = lomar(window_size=2, num_windows=3, img_size=12, patch_size=4, in_chans=3)     # 3×3 grid
    randomize_relative_tables(method.encoder)
    images = torch.randn(4, 3, 12, 12)
    output = method(images, rng=BatchRandom(seed=7))

    draws = BatchRandom(seed=7)
    # h − m + 1 = 2 top rows (and left columns) for 3 windows: two random permutations of (0, 1) per image
    row_noise, col_noise, mask_noise = draws.rand(4, 2, 2), draws.rand(4, 2, 2), draws.rand(4, 3, 4)

    def permutations(noise):                                          # (2, 2) -> [first perm…, second perm…]
        return [position for rnd in noise.tolist() for position in sorted(range(2), key=rnd.__getitem__)]

    encoder, p, m = method.encoder, 4, 2
    total, count = 0.0, 0
    for b in range(4):
        tops, lefts = permutations(row_noise[b]), permutations(col_noise[b])
        for k in range(3):
            top, left = tops[k], lefts[k]
            crop = images[b:b + 1, :, top * p:(top + m) * p, left * p:(left + m) * p]
            masked = random_mask_of_size(mask_noise[b, k:k + 1], 3)[0].bool()    # ⌊4·0.8⌋ = 3
            tokens = encoder.patch_embed(crop)[0]
            tokens[masked] = method.mask_token[0, 0]
            sequence = torch.cat([encoder.cls_token[0], tokens])[None]
            buckets = relative_buckets((m, m))
            for block in encoder.blocks:
                sequence = block(sequence, buckets)
            prediction = method.head(encoder.norm(sequence))[0, 1:]
            target = normalized_pixels(crop.reshape(3, m, p, m, p).permute(1, 3, 2, 4, 0).reshape(1, m * m, -1))[0]
            total = total + ((prediction - target) ** 2).mean(-1)[masked].sum()
            count += int(masked.sum())
    assert count == 4 * 3 * 3
    assert output.loss.item() == pytest.approx((total / count).item(), rel=1e-5)


def test_decoder_drop_path_is_refused_without_a_decoder():
    with pytest.raises(ConfigError, match="lomar has no decoder"):
        build_method("lomar", tiny_model(img_size=28, decoder_drop_path=0.1).resolved(), {})
    build_method("lomar", tiny_model(img_size=28, decoder_drop_path=0.0).resolved(), {})


def test_window_must_fit_the_grid():
    build_method("lomar", tiny_model(img_size=28).resolved(), {})             # 7×7 grid: a 7×7 window fits
    with pytest.raises(ConfigError, match="does not fit"):
        build_method("lomar", tiny_model(img_size=16).resolved(), {})         # 4×4 grid: it does not
    with pytest.raises(ConfigError, match="masks no patch"):
        build_method("lomar", tiny_model().resolved(), {"window_size": 1})


def test_forward_macs_do_not_grow_with_resolution_and_match_hand_count():
    model = tiny_model(img_size=16)
    small = count_forward(lomar(window_size=3, num_windows=2, img_size=16), torch.randn(2, 1, 16, 16))
    large = count_forward(lomar(window_size=3, num_windows=2, img_size=48), torch.randn(2, 1, 48, 48))
    assert small == large
    d, depth, tokens, patch_dim = model.embed_dim, model.depth, 1 + 9, 16
    per_block = tokens * 12 * d * d + 2 * tokens * tokens * d + tokens * 50 * d   # linear, attention, relative term
    per_window = depth * per_block + 9 * patch_dim * d                             # + patch embedding
    assert small["encoder"] == 2 * per_window
    assert small["head"] == 2 * 9 * d * patch_dim


def test_a_few_optimizer_steps_lower_the_loss():
    method = lomar(window_size=3, num_windows=2)
    losses = train_steps(method, torch.randn(8, 1, 16, 16), steps=12, lr=2e-3)
    assert losses[-1] < 0.7 * losses[0]
    assert all(block.attn.relative_table.abs().sum() > 0 for block in method.encoder.blocks)


def test_export_then_load_gives_the_same_features(tmp_path):
    method = lomar(window_size=2).eval()
    randomize_relative_tables(method.encoder)
    path = export_encoder(method.encoder, method.model_config, tmp_path / "encoder.safetensors")
    loaded = load_relpos_encoder(path).eval()
    images = torch.randn(3, 1, 16, 16)
    assert torch.equal(loaded.forward_features(images), method.encoder.forward_features(images))
    larger = load_relpos_encoder(path, img_size=32).eval()
    assert larger.grid_size == (8, 8)
    images = torch.randn(2, 1, 32, 32)
    assert torch.allclose(larger.forward_features(images), method.encoder.forward_features(images), atol=1e-6)
    scaled = build_method("lomar", tiny_model().resolved(), {"window_size": 2, "relative_term": "scaled"}).encoder
    randomize_relative_tables(scaled)
    path = export_encoder(scaled.eval(), method.model_config, tmp_path / "scaled.safetensors")
    assert load_relpos_encoder(path).relative_term == "scaled"
    # an export written before the key existed (no "relative_term" in its metadata) was the "scaled" form
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        metadata = {key: value for key, value in handle.metadata().items() if key != "relative_term"}
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata=metadata)
    old = load_relpos_encoder(tmp_path / "old.safetensors").eval()
    assert torch.equal(old.forward_features(images), scaled.forward_features(images))
    timm_path = export_encoder(build_method("mae", tiny_model().resolved(), {}).encoder, tiny_model().resolved(),
                               tmp_path / "mae.safetensors")
    with pytest.raises(ConfigError, match="not a"):
        load_relpos_encoder(timm_path)
