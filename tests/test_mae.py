import math

import pytest
import torch

from conftest import tiny_model
from leanmim.config import ConfigError, ModelConfig
from leanmim.eval.cost import count_forward, count_train_step, method_cost
from leanmim.parts.losses import normalized_pixels, reconstruction_loss, weighted_mean, per_token_mse
from leanmim.methods import build_method
from leanmim.parts.tokens import BatchRandom
from reference_mae import ReferenceMAE


def test_loss_equals_hand_computation_on_tiny_case():
    # one image, two patches of 2 values each; only patch 1 is masked
    patches = torch.tensor([[[1.0, 3.0], [2.0, 6.0]]])
    prediction = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    mask = torch.tensor([[0.0, 1.0]])
    # patch 1: mean 4, unbiased var 8 -> target (-2, 2)/sqrt(8 + 1e-6)
    t = 2 / math.sqrt(8 + 1e-6)
    expected = ((1 + t) ** 2 + (0 - t) ** 2) / 2
    assert reconstruction_loss(prediction, patches, mask).item() == pytest.approx(expected, rel=1e-6)
    # without normalisation: plain MSE on the masked patch
    assert reconstruction_loss(prediction, patches, mask, normalize_target=False).item() == pytest.approx((1 + 36) / 2)
    assert torch.allclose(normalized_pixels(patches)[0, 1], torch.tensor([-t, t]))
    assert weighted_mean(torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 3.0]])).item() == pytest.approx(2.5)


def test_mae_matches_reference_forward_exactly():
    torch.manual_seed(0)
    mae = build_method("mae", tiny_model(in_chans=3).resolved(), {"mask_ratio": 0.75})
    images = torch.randn(3, 3, 16, 16)
    noise = BatchRandom(seed=5).rand(3, 16)
    ours = mae(images, rng=BatchRandom(seed=5))
    ref_loss, ref_pred, ref_mask = ReferenceMAE(mae)(images, noise)
    assert torch.equal(ours.mask, ref_mask)
    assert torch.allclose(ours.predictions, ref_pred, atol=1e-5)
    assert ours.loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)


def test_mae_macs_equal_reference_architecture_vit_base():
    model = ModelConfig(name="vit_base_patch16").resolved()
    torch.manual_seed(0)
    mae = build_method("mae", model, {})
    images = torch.randn(1, 3, 224, 224)
    ours = count_forward(mae, images)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        ReferenceMAE(mae)(images, torch.rand(1, 196))
    assert ours["total"] == counter.get_total_flops() / 2
    assert ours["encoder"] == pytest.approx(4.41e9, rel=0.01)   # the paper: ≈4.3 G for the encoder
    assert ours["encoder"] + ours["decoder"] == ours["total"]
    # attention is counted (torch's counter misses the CPU flash kernel unless leanmim registers it)
    assert ours["decoder"] > 8 * 197 * 512 * (3 * 512 + 512 + 2 * 2048) + 8 * 2 * 197 * 197 * 512 * 0.99


def test_cost_of_inference_matches_vit_b_table_and_train_step_is_about_3x():
    model = ModelConfig(name="vit_base_patch16").resolved()
    assert method_cost("mae", model, inference=True, batch_size=1)["macs"]["encoder"] == pytest.approx(17.56e9, rel=0.002)
    small = tiny_model(in_chans=3).resolved()
    mae = build_method("mae", small, {})
    images = torch.randn(2, 3, 16, 16)
    forward, train = count_forward(mae, images)["total"], count_train_step(mae, images)
    assert 2.5 * forward < train < 3.2 * forward


def test_initialisation_follows_mae():
    mae = build_method("mae", tiny_model().resolved(), {})
    assert torch.all(mae.encoder.blocks[0].attn.qkv.bias == 0)
    limit = math.sqrt(6 / sum(mae.encoder.blocks[0].mlp.fc1.weight.shape))
    assert mae.encoder.blocks[0].mlp.fc1.weight.abs().max() <= limit
    assert mae.encoder.cls_token.std().item() < 0.05 and mae.decoder.mask_token.abs().sum() > 0
    assert mae.encoder.blocks[0].attn.fused_attn


@pytest.mark.parametrize("overrides,message", [
    (dict(img_size=30, patch_size=4), "not divisible"),
    (dict(name="vit_gigantic"), "unknown model"),
    (dict(in_chans=2), "in_chans"),
])
def test_bad_model_configs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_model(**overrides).resolved()


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_open_interval(ratio):
    with pytest.raises(ConfigError, match="mask_ratio"):
        build_method("mae", tiny_model().resolved(), {"mask_ratio": ratio})


def test_per_token_mse_shape():
    assert per_token_mse(torch.zeros(2, 3, 4), torch.ones(2, 3, 4)).shape == (2, 3)


def test_sincos_table_follows_the_mae_reference_formula():
    """First half of the channels: the column w, second half: the row h; each half [sin | cos] over
    ω_k = 1/10000^(k/(D/4)); tokens in row-major order. Built here entry by entry from that formula."""
    from leanmim.parts.encoder import sincos_pos_embed

    rows, cols, dim = 3, 4, 16
    quarter = dim // 4
    expected = torch.zeros(rows * cols, dim, dtype=torch.float64)
    for h in range(rows):
        for w in range(cols):
            for k in range(quarter):
                omega = 1.0 / 10000 ** (k / quarter)
                token = h * cols + w
                expected[token, k] = math.sin(w * omega)
                expected[token, quarter + k] = math.cos(w * omega)
                expected[token, 2 * quarter + k] = math.sin(h * omega)
                expected[token, 3 * quarter + k] = math.cos(h * omega)
    table = sincos_pos_embed((rows, cols), dim)
    assert table.shape == (12, 16)
    assert torch.allclose(table.double(), expected, atol=1e-6)
    # and the square-grid table equals the reference implementation's (numpy) one
    from reference_mae import reference_2d_sincos
    assert torch.allclose(sincos_pos_embed((5, 5), 32), reference_2d_sincos(32, 5), atol=1e-6)


def test_old_checkpoints_without_a_stored_table_get_the_table_they_were_trained_with():
    from leanmim.parts.encoder import legacy_sincos_pos_embed

    mae = build_method("mae", tiny_model(in_chans=3).resolved(), {})
    state = {key: value for key, value in mae.state_dict().items() if not key.endswith("pos_embed")}
    fresh = build_method("mae", tiny_model(in_chans=3).resolved(), {})
    fresh.load_state_dict(state)  # strict: the pre-hook supplies the missing tables
    assert torch.equal(fresh.encoder.pos_embed, legacy_sincos_pos_embed(fresh.encoder.grid_size, 32))
    assert not torch.allclose(fresh.encoder.pos_embed, mae.encoder.pos_embed)
    assert "encoder.pos_embed" in mae.state_dict() and "decoder.pos_embed" in mae.state_dict()


def test_decoder_default_fits_the_encoder_and_oversized_decoders_warn():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no default decoder warns
        tiny = ModelConfig(name="vit_tiny_patch16", img_size=64).resolved()
        small = ModelConfig(name="vit_small_patch16").resolved()
        base = ModelConfig(name="vit_base_patch16").resolved()
        huge = ModelConfig(name="vit_huge_patch14").resolved()
    assert (tiny.decoder_embed_dim, tiny.decoder_depth, tiny.decoder_num_heads) == (192, 4, 6)
    assert (small.decoder_embed_dim, small.decoder_depth, small.decoder_num_heads) == (384, 4, 12)
    for model in (base, huge):
        assert (model.decoder_embed_dim, model.decoder_depth, model.decoder_num_heads) == (512, 8, 16)
    # the derived decoder costs less than the encoder per token; MAE's 512 × 8 on ViT-Tiny costs 4.7× more: warned
    with pytest.warns(UserWarning, match="costs more per token than the encoder"):
        ModelConfig(name="vit_tiny_patch16", img_size=64, decoder_embed_dim=512, decoder_depth=8,
                    decoder_num_heads=16).resolved()
    mae = build_method("mae", tiny, {})
    macs = count_forward(mae, torch.randn(1, 3, 64, 64))
    assert macs["decoder"] < 2 * macs["encoder"]   # was 15× with 512 × 8 (0.437 G vs 0.029 G)
