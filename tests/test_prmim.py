import math

import pytest
import torch

from conftest import tiny_model, train_steps
from leanmim.config import ConfigError
from leanmim.eval.cost import _profiled_peak_bytes, count_forward, peak_train_memory
from leanmim.methods import build_method
from leanmim.parts.partial import ProgressiveReconstruction, decode_with_late_queries, num_thrown, split_masked
from leanmim.parts.tokens import BatchRandom, furthest_point_sampling, gather_tokens, grid_coordinates, random_masking


def masking_for(batch_size=4, num_patches=64, mask_ratio=0.75, seed=0):
    return random_masking(BatchRandom(seed=seed).rand(batch_size, num_patches), mask_ratio)


# ---- which masked tokens are kept ---------------------------------------------------------------

@pytest.mark.parametrize("selection", ["furthest", "random"])
def test_visible_kept_and_thrown_partition_the_patches(selection):
    masking = masking_for()                                     # 8×8 grid: 16 visible, 48 masked
    throw = num_thrown(64, 48, 0.5)
    split = split_masked(masking, (8, 8), throw, selection, BatchRandom(seed=1))
    assert throw == 32 and split.ids_kept.shape == (4, 16) and split.ids_thrown.shape == (4, 32)
    everything = torch.cat([masking.ids_keep, split.ids_kept, split.ids_thrown], dim=1)
    assert torch.equal(everything.sort(dim=1).values, torch.arange(64).expand(4, -1))   # each patch exactly once
    assert torch.equal(split.thrown, torch.zeros(4, 64).scatter(1, split.ids_thrown, 1.0))
    assert torch.all(masking.mask.gather(1, split.ids_kept) == 1) and torch.all(masking.mask.gather(1, split.ids_thrown) == 1)
    again = split_masked(masking, (8, 8), throw, selection, BatchRandom(seed=1))
    assert torch.equal(again.ids_kept, split.ids_kept) and torch.equal(again.ids_thrown, split.ids_thrown)


def test_throw_ratio_is_a_fraction_of_all_patches():
    assert num_thrown(196, 147, 0.5) == 98                      # ViT-B/16: decode 49 of the 147 masked tokens
    assert num_thrown(196, 147, 0.75) == 147 and num_thrown(196, 147, 0.0) == 0
    assert build_method("prmim", tiny_model().resolved(), {"throw_ratio": 0.5}).num_thrown == 8   # of 16 patches


def test_furthest_sampling_on_grids_with_known_answers():
    coordinates = grid_coordinates((3, 3))
    all_but_centre = torch.tensor([[0, 1, 2, 3, 5, 6, 7, 8]])
    # seeded with the centre, the 4 picks farthest apart are the corners, whatever breaks the ties
    for seed in range(5):
        picks = furthest_point_sampling(coordinates, torch.tensor([[4]]), all_but_centre, 4, BatchRandom(seed=seed).rand(1, 9))
        assert sorted(picks[0].tolist()) == [0, 2, 6, 8]
    # on a 1×7 line seeded at 0: 6, then 3 (the only way to keep all three points ≥ 3 apart)
    line = furthest_point_sampling(grid_coordinates((1, 7)), torch.tensor([[0]]), torch.arange(1, 7)[None], 2)
    assert line.tolist() == [[6, 3]]
    # 5×5 seeded with a corner: opposite corner, the two others, then the centre (min distance √8, the best possible)
    picks = furthest_point_sampling(grid_coordinates((5, 5)), torch.tensor([[0]]), torch.arange(1, 25)[None], 4)
    assert picks[0, 0] == 24 and sorted(picks[0, 1:3].tolist()) == [4, 20] and picks[0, 3] == 12


def test_furthest_sampling_is_deterministic_for_a_seed_and_only_picks_candidates():
    masking = masking_for(batch_size=8, seed=3)
    coordinates = grid_coordinates((8, 8))
    first = furthest_point_sampling(coordinates, masking.ids_keep, masking.ids_masked, 20, BatchRandom(seed=7).rand(8, 64))
    second = furthest_point_sampling(coordinates, masking.ids_keep, masking.ids_masked, 20, BatchRandom(seed=7).rand(8, 64))
    other = furthest_point_sampling(coordinates, masking.ids_keep, masking.ids_masked, 20, BatchRandom(seed=8).rand(8, 64))
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert torch.all(masking.mask.gather(1, first) == 1)                       # only masked positions
    assert all(len(set(row.tolist())) == 20 for row in first)                  # no position twice


def test_furthest_keeps_thrown_tokens_closer_to_a_decoded_one_than_random():
    masking = masking_for(batch_size=32, num_patches=196, seed=2)
    squared = torch.cdist(grid_coordinates((14, 14)), grid_coordinates((14, 14))).pow(2)

    def farthest_from_decoded(selection):
        split = split_masked(masking, (14, 14), 98, selection, BatchRandom(seed=4))
        decoded = torch.cat([masking.ids_keep, split.ids_kept], dim=1)
        return squared[split.ids_thrown[:, :, None], decoded[:, None, :]].amin(-1).amax(-1)   # (B,)

    furthest, random = farthest_from_decoded("furthest"), farthest_from_decoded("random")
    assert furthest.max() <= 2.01                     # every thrown token touches a decoded one (3×3 box)
    assert random.max() > furthest.max()


# ---- progressive reconstruction of thrown tokens --------------------------------------------------

def reference_weights(ids_decoded, ids_thrown, grid_size, window):
    """Loop-by-loop version of the aggregation rule (test only)."""
    h, w = grid_size
    out = torch.zeros(ids_thrown.shape + ids_decoded.shape[1:])
    for b in range(ids_thrown.shape[0]):
        decoded = ids_decoded[b].tolist()
        for t, position in enumerate(ids_thrown[b].tolist()):
            r, c = divmod(position, w)
            near = [(slot, math.hypot(d // w - r, d % w - c)) for slot, d in enumerate(decoded)
                    if abs(d // w - r) <= window // 2 and abs(d % w - c) <= window // 2]
            if not near:   # fallback: the nearest decoded token anywhere, first in decoder order on ties
                distances = [math.hypot(d // w - r, d % w - c) for d in decoded]
                out[b, t, distances.index(min(distances))] = 1.0
                continue
            total = sum(math.exp(-dist) for _, dist in near)
            for slot, dist in near:
                out[b, t, slot] = math.exp(-dist) / total
    return out


@pytest.mark.parametrize("window", [3, 5])
def test_aggregation_weights_sum_to_one_and_stay_in_the_box(window):
    masking = masking_for(batch_size=6, seed=5)
    split = split_masked(masking, (8, 8), 40, "random", BatchRandom(seed=6))   # heavy throwing: some boxes are empty
    ids_decoded = torch.cat([masking.ids_keep, split.ids_kept], dim=1)
    weights = ProgressiveReconstruction((8, 8), window).weights(ids_decoded, split.ids_thrown)   # (B, T, N)
    assert torch.allclose(weights.sum(-1), torch.ones(6, 40))
    expected = reference_weights(ids_decoded, split.ids_thrown, (8, 8), window)
    assert torch.allclose(weights, expected, atol=1e-6)
    rows = lambda ids: ids // 8
    cols = lambda ids: ids % 8
    reach = torch.maximum((rows(split.ids_thrown)[..., None] - rows(ids_decoded)[:, None]).abs(),
                          (cols(split.ids_thrown)[..., None] - cols(ids_decoded)[:, None]).abs())   # Chebyshev
    has_neighbour = (reach <= window // 2).any(-1)
    assert torch.all(weights[has_neighbour][reach[has_neighbour] > window // 2] == 0)
    if window == 3:
        assert not has_neighbour.all()   # the fallback was exercised


def test_aggregation_hand_computed_case():
    # 3×3 grid; thrown centre 4; decoded: 1 (above, distance 1) and 8 (diagonal, distance √2)
    weights = ProgressiveReconstruction((3, 3)).weights(torch.tensor([[1, 8]]), torch.tensor([[4]]))
    above = math.exp(-1) / (math.exp(-1) + math.exp(-math.sqrt(2)))
    assert torch.allclose(weights, torch.tensor([[[above, 1 - above]]]))
    # 1×5 line, k = 3: thrown 0 has no decoded neighbour within reach 1 -> copies the nearest decoded (3, not 4)
    weights = ProgressiveReconstruction((1, 5)).weights(torch.tensor([[4, 3]]), torch.tensor([[0]]))
    assert weights.tolist() == [[[0.0, 1.0]]]


def test_learned_aggregation_trains_its_offset_logits():
    method = build_method("prmim", tiny_model().resolved(), {"aggregation_weights": "learned"})
    method(torch.randn(2, 1, 16, 16), rng=BatchRandom(seed=0)).loss.backward()
    assert method.progressive.offset_logits.grad.abs().sum() > 0
    assert "progressive.offset_logits" in dict(method.named_parameters())


# ---- the method ----------------------------------------------------------------------------------

@pytest.mark.parametrize("plugins", [{}, {"dynamic_weighting": True}])
def test_throw_zero_is_mae_to_the_bit(plugins):
    model = tiny_model(in_chans=3).resolved()
    torch.manual_seed(0)
    mae = build_method("mae", model, plugins)
    prmim = build_method("prmim", model, {"throw_ratio": 0.0, **plugins})
    prmim.load_state_dict(mae.state_dict())
    images = torch.randn(3, 3, 16, 16)
    ours, theirs = prmim(images, progress=0.3, rng=BatchRandom(seed=9)), mae(images, progress=0.3, rng=BatchRandom(seed=9))
    assert torch.equal(ours.loss, theirs.loss)
    assert torch.equal(ours.predictions, theirs.predictions) and torch.equal(ours.mask, theirs.mask)


def test_predictions_in_grid_order_for_visible_kept_and_thrown():
    model = tiny_model().resolved()
    torch.manual_seed(0)
    method = build_method("prmim", model, {})
    images = torch.randn(2, 1, 16, 16)
    out = method(images, rng=BatchRandom(seed=1))
    # redo the pass by hand with the same draws
    rng = BatchRandom(seed=1)
    masking = method.mask(images, rng)
    split = split_masked(masking, (4, 4), 8, "furthest", rng)
    encoded, _ = method.encoder.forward_visible(images, masking.ids_keep)
    features = method.decoder.forward_features(encoded, masking.ids_keep, split.ids_kept)[:, 1:]
    ids_decoded = torch.cat([masking.ids_keep, split.ids_kept], dim=1)
    thrown = reference_weights(ids_decoded, split.ids_thrown, (4, 4), 3) @ features
    assert torch.allclose(gather_tokens(out.predictions, ids_decoded), method.decoder.head(features), atol=1e-5)
    assert torch.allclose(gather_tokens(out.predictions, split.ids_thrown), method.decoder.head(thrown), atol=1e-5)
    assert torch.equal(out.mask, masking.mask)
    # the loss is MSE over kept + λ·MSE over thrown, each a mean over its own tokens
    target = (lambda p: (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True) + 1e-6) ** 0.5)(
        images.reshape(2, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(2, 16, 16))
    error = (out.predictions - target).pow(2).mean(-1)
    kept, thrown_error = error.gather(1, split.ids_kept).mean(), error.gather(1, split.ids_thrown).mean()
    assert out.loss.item() == pytest.approx((kept + thrown_error).item(), rel=1e-5)
    assert out.logs["loss_thrown"].item() == pytest.approx(thrown_error.item(), rel=1e-5)


def test_plain_partial_reconstruction_leaves_thrown_tokens_unsupervised():
    method = build_method("prmim", tiny_model().resolved(), {"thrown_reconstruction": "none", "throw_selection": "random"})
    images = torch.randn(2, 1, 16, 16)
    out = method(images, rng=BatchRandom(seed=2))
    rng = BatchRandom(seed=2)
    masking = method.mask(images, rng)
    split = split_masked(masking, (4, 4), 8, "random", rng)
    assert torch.all(gather_tokens(out.predictions, split.ids_thrown) == 0)
    assert out.loss == out.logs["loss_kept"] and "loss_thrown" not in out.logs
    assert method.progressive is None


def test_last_block_variant_lets_thrown_tokens_join_only_the_last_block():
    method = build_method("prmim", tiny_model(decoder_depth=2).resolved(), {"thrown_reconstruction": "last_block"})
    decoder = method.decoder
    encoded, ids_visible = torch.randn(2, 1 + 4, 32), torch.tensor([[0, 5, 10, 15]] * 2)
    ids_kept, ids_late = torch.tensor([[1, 2]] * 2), torch.tensor([[3, 4, 6]] * 2)
    features = decode_with_late_queries(decoder, encoded, ids_visible, ids_kept, ids_late)
    assert features.shape == (2, 1 + 4 + 2 + 3, 32)
    tokens = decoder.input_tokens(encoded, ids_visible, torch.cat([ids_kept, ids_late], 1))
    by_hand = decoder.norm(decoder.blocks[1](torch.cat([decoder.blocks[0](tokens[:, :7]), tokens[:, 7:]], 1)))
    assert torch.allclose(features, by_hand, atol=1e-6)
    out = method(torch.randn(2, 1, 16, 16), rng=BatchRandom(seed=0))
    assert out.predictions.shape == (2, 16, 16) and "loss_thrown" in out.logs


@pytest.mark.parametrize("mode", ["aggregate", "last_block", "none"])
def test_a_few_optimizer_steps_lower_the_loss(mode):
    torch.manual_seed(0)
    method = build_method("prmim", tiny_model().resolved(), {"thrown_reconstruction": mode})
    losses = train_steps(method, torch.randn(8, 1, 16, 16), steps=12, lr=3e-3)
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("options,message", [
    ({"throw_ratio": 0.8}, "throw_ratio"),
    ({"throw_ratio": -0.1}, "throw_ratio"),
    ({"aggregation_window": 4}, "aggregation_window"),
    ({"throw_selection": "smart"}, "throw_selection"),
    ({"thrown_reconstruction": "magic"}, "thrown_reconstruction"),
    ({"thrown_loss_weight": -1}, "thrown_loss_weight"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        build_method("prmim", tiny_model().resolved(), options)


# ---- cost ----------------------------------------------------------------------------------------

def test_decoder_macs_shrink_with_the_throw_and_aggregation_is_its_own_part():
    model = tiny_model().resolved()                  # 16 patches: K = 4 visible, Q = 4 kept, T = 8 thrown
    method = build_method("prmim", model, {})
    macs = count_forward(method, torch.randn(1, 1, 16, 16))
    d, p, n = 32, 16, 1 + 4 + 4                      # decoder width, patch length, decoder sequence
    blocks = n * 12 * d * d + 2 * n * n * d          # qkv + proj + MLP (ratio 4), attention scores and values
    assert macs["decoder"] == 5 * 32 * d + blocks + (n + 8) * d * p   # embed [cls, visible], 1 block, head incl. thrown
    assert macs["progressive"] == 8 * 8 * d          # (T × N) weights times (N, D_d) decoded features
    assert macs["total"] == macs["encoder"] + macs["decoder"] + macs["progressive"]


def test_peak_train_memory_replays_allocations():
    matrix = torch.randn(500, 500)                   # 1 MB

    def run():
        product = matrix @ matrix                     # +1 MB
        doubled = product * 2                         # +1 MB: peak 2 MB
        del product
        shifted = doubled + 1                         # back to 2 MB
        del doubled, shifted

    assert _profiled_peak_bytes(run, torch.device("cpu")) == pytest.approx(2 * 500 * 500 * 4, rel=1e-3)
    model = tiny_model().resolved()
    images = torch.randn(64, 1, 16, 16)
    torch.manual_seed(0)
    mae, prmim = build_method("mae", model, {}), build_method("prmim", model, {})
    gradients = sum(p.numel() * 4 for p in mae.parameters())
    peak_mae, peak_prmim = peak_train_memory(mae, images), peak_train_memory(prmim, images)
    assert gradients < peak_prmim < peak_mae
    assert mae.encoder.cls_token.grad is None        # gradients are cleared again
