import math

import pytest
import torch

from conftest import tiny_model
from leanmim.config import ConfigError
from leanmim.eval.cost import count_forward
from leanmim.methods import build_method
from leanmim.parts.teacher import cosine_momentum
from leanmim.parts.tokens import BatchRandom
from leanmim.parts.weighting import depth_beta, distance_to_visible, dynamic_weights


def test_distance_to_visible_on_a_hand_drawn_mask():
    # 4×4 grid, visible patches V at (0, 0) and (2, 3); every other patch masked:
    #   V . . .
    #   . . . .
    #   . . . V
    #   . . . .
    mask = torch.ones(1, 16)
    mask[0, 0] = mask[0, 2 * 4 + 3] = 0
    r2, r5 = math.sqrt(2), math.sqrt(5)
    expected = torch.tensor([
        [0, 1, 2, 2],          # (0,2): 2 from (0,0), √5 from (2,3); (0,3): 3 vs 2
        [1, r2, r2, 1],        # (1,2): √5 vs √2
        [2, 2, 1, 0],          # (2,0): 2 vs 3; (2,1): √5 vs 2
        [3, r5, r2, 1],        # (3,0): 3 vs √10; (3,1): √10 vs √5
    ])
    distance = distance_to_visible(mask, (4, 4))
    assert torch.allclose(distance.view(4, 4), expected)
    assert (distance[mask.bool()] >= 1).all() and (distance[~mask.bool()] == 0).all()


def test_distance_is_per_sample():
    mask = torch.ones(2, 9)
    mask[0, 0] = 0      # 3×3 grid, visible corner: far corner is 2√2 away
    mask[1, 4] = 0      # visible centre: every masked patch within √2
    distance = distance_to_visible(mask, (3, 3))
    assert distance[0, 8].item() == pytest.approx(2 * math.sqrt(2))
    assert distance[1].max().item() == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize("beta", [-1.5, -1.0, 0.5, 2.0])
def test_weights_average_to_one_over_masked_patches(beta):
    torch.manual_seed(0)
    mask = (torch.rand(5, 49) < 0.75).float()
    mask[:, 0] = 0                                    # at least one visible per sample
    weights = dynamic_weights(distance_to_visible(mask, (7, 7)), mask, beta)
    assert torch.allclose((weights * mask).sum(1) / mask.sum(1), torch.ones(5))
    assert (weights[mask == 0] == 0).all()
    # the sign of β decides who counts more: far patches when β > 0
    distance = distance_to_visible(mask, (7, 7))
    far, near = distance == distance.max(dim=1, keepdim=True).values, (distance == 1) & (mask == 1)
    sample = 0
    assert (weights[sample][far[sample]].mean() > weights[sample][near[sample]].mean()) == (beta > 0)


def test_beta_zero_weights_are_the_mask_exactly():
    mask = (torch.rand(3, 16) < 0.75).float()
    mask[:, 5] = 0
    assert torch.equal(dynamic_weights(distance_to_visible(mask, (4, 4)), mask, 0.0), mask)


def test_beta_schedule_by_progress_and_depth():
    assert depth_beta(0.0, 12, 12, -1.0, 1.0, 1.0) == -1.0
    assert depth_beta(1.0, 12, 12, -1.0, 1.0, 1.0) == 1.0
    assert depth_beta(0.5, 6, 12, -1.0, 1.0, 2.0) == pytest.approx(0.0 + 2.0 * (0.5 - 1))
    assert depth_beta(0.25, 12, 12, 1.0, -1.0, 1.0) == pytest.approx(0.5)   # the reverse direction


def test_beta_zero_without_deep_supervision_is_exactly_mae():
    model = tiny_model(in_chans=3).resolved()
    images = torch.randn(4, 3, 16, 16)
    torch.manual_seed(0)
    mae = build_method("mae", model, {})
    flat = dict(beta_start=0.0, beta_end=0.0, beta_depth_slope=0.0, dynamic_weighting=True)
    torch.manual_seed(0)
    weighted_mae = build_method("mae", model, flat)
    torch.manual_seed(0)
    ddae = build_method("ddae", model, dict(flat, deep_supervision=False, feature_weight=0.0))
    reference = mae(images, progress=0.7, rng=BatchRandom(seed=3)).loss
    assert torch.equal(weighted_mae(images, progress=0.7, rng=BatchRandom(seed=3)).loss, reference)
    assert torch.equal(ddae(images, progress=0.7, rng=BatchRandom(seed=3)).loss, reference)
    assert ddae.teacher is None and ddae.deep_supervision is None


def test_dynamic_weighting_changes_mae_loss_and_follows_progress():
    model = tiny_model().resolved()
    torch.manual_seed(0)
    method = build_method("mae", model, {"dynamic_weighting": True})
    images = torch.randn(4, 1, 16, 16)
    masking = method.mask(images, BatchRandom(seed=1))
    early, late = method.patch_weights(masking, 0.0), method.patch_weights(masking, 1.0)
    distance = distance_to_visible(masking.mask, model.grid_size)
    expected_early = dynamic_weights(distance, masking.mask, -1.0)        # β₀ at the last block
    assert torch.allclose(early, expected_early) and torch.allclose(late, dynamic_weights(distance, masking.mask, 1.0))
    # a shallower block is shifted by δ·(l/depth − 1): block 1 of 2 → β = −1.5 at the start
    assert torch.allclose(method.patch_weights(masking, 0.0, block=1), dynamic_weights(distance, masking.mask, -1.5))


def ddae_method(**options):
    torch.manual_seed(0)
    return build_method("ddae", tiny_model(depth=4).resolved(), options)


def test_ddae_supervises_the_rescaled_blocks_with_a_shared_decoder():
    ddae = ddae_method()
    assert ddae.supervised_blocks == (2, 3, 4)              # 6, 8, 10, 12 of 12 → 2, 2.67, 3.33, 4 of 4
    assert ddae.supervision_weights == pytest.approx((1 / 3,) * 3)
    heads = ddae.deep_supervision
    assert set(heads.keys()) == {"block2", "block3", "block4", "decoder"}
    assert heads.decoder.head.out_features == 16 + 32       # pixels p²C + features D


def test_teacher_sees_the_unmasked_image_and_gets_no_gradient():
    ddae = ddae_method()
    seen = []
    ddae.teacher.blocks[0].register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    images = torch.randn(2, 1, 16, 16)
    output = ddae(images, rng=BatchRandom(seed=0))
    assert seen == [torch.Size([2, 1 + 16, 32])]           # cls + all 16 patches
    output.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in ddae.teacher.parameters())
    assert ddae.teacher_modules() == [ddae.teacher]
    # the targets depend on the masked pixels: change only masked patches, the targets move
    masking = ddae.mask(images, BatchRandom(seed=0))
    changed = images.clone()
    hidden = masking.ids_masked[0, 0].item()
    row, col = divmod(hidden, 4)
    changed[0, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4] += 5
    before, after = ddae.feature_targets(images), ddae.feature_targets(changed)
    assert not torch.allclose(before[-1][0], after[-1][0])
    # targets are LayerNorm-without-affine features: zero mean, unit variance per token
    assert torch.allclose(before[0].mean(-1), torch.zeros(2, 16), atol=1e-5)


def test_every_supervised_depth_head_receives_gradient():
    ddae = ddae_method()
    ddae(torch.randn(2, 1, 16, 16), rng=BatchRandom(seed=0)).loss.backward()
    for block in ddae.supervised_blocks:
        projection = ddae.deep_supervision[f"block{block}"][1]
        assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert ddae.deep_supervision.decoder.head.weight.grad.abs().sum() > 0
    assert ddae.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_loss_is_the_sum_of_its_logged_terms():
    ddae = ddae_method(feature_weight=0.5, deep_supervision_weights="1,2,3")
    output = ddae(torch.randn(2, 1, 16, 16), progress=0.4, rng=BatchRandom(seed=2))
    logs = output.logs
    expected = logs["loss_decoder"] + sum(
        weight * (logs[f"loss_pixel_block{block}"] + logs[f"loss_feature_block{block}"])
        for block, weight in zip((2, 3, 4), (1.0, 2.0, 3.0)))
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ema_update_follows_the_cosine_momentum():
    ddae = ddae_method()
    with torch.no_grad():
        ddae.encoder.cls_token.add_(1.0)
    before = ddae.teacher.cls_token.clone()
    ddae.after_optimizer_step(0.0)
    assert cosine_momentum(0.0, 0.999, 0.9999) == pytest.approx(0.999)
    assert torch.allclose(ddae.teacher.cls_token, before + 0.001, atol=1e-6)
    ddae.train()
    assert ddae.encoder.training and not ddae.teacher.training


def test_mae_plugins_reach_mae_and_a_few_steps_lower_the_loss():
    for method, options in [("ddae", {}), ("mae", {"deep_supervision": True, "dynamic_weighting": True})]:
        torch.manual_seed(0)
        model = build_method(method, tiny_model().resolved(), options)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        images = torch.randn(8, 1, 16, 16)
        losses = []
        for step in range(6):
            loss = model(images, progress=0.5, rng=BatchRandom(seed=0)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.after_optimizer_step(step / 6)
            losses.append(loss.item())
        assert losses[-1] < 0.7 * losses[0], (method, losses)


def test_cost_reports_teacher_and_each_supervision_head():
    ddae = ddae_method()
    macs = count_forward(ddae, torch.randn(2, 1, 16, 16))
    for part in ("encoder", "decoder", "teacher", "deep_supervision.block2", "deep_supervision.block3",
                 "deep_supervision.block4", "deep_supervision.decoder"):
        assert macs[part] > 0, part
    assert "other" not in macs
    parts = sum(value for name, value in macs.items() if name != "total")
    assert parts == pytest.approx(macs["total"])
    # the teacher runs the full encoder over all 16 patches: more than the student over 4 visible ones
    assert macs["teacher"] > 3 * macs["encoder"]


@pytest.mark.parametrize("options,message", [
    ({"deep_supervision_blocks": "6,x"}, "deep_supervision_blocks"),
    ({"deep_supervision_blocks": "0,13"}, "deep_supervision_blocks"),
    ({"deep_supervision_weights": "1,-1"}, "deep_supervision_weights"),
    ({"deep_supervision_weights": "1,1"}, "give 3 values"),
    ({"feature_loss": "l3"}, "feature_loss"),
    ({"deep_supervision": False}, "needs --deep-supervision"),
    ({"teacher_momentum": 1.5}, "teacher_momentum"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        ddae_method(**options)
