"""PCAE (docs/methods.md §2): token compression, the EMA teacher, retained-token decoding, cost."""

import math

import pytest
import torch
from torch import nn

from conftest import tiny_model
from leanmim.parts.compression import (drop_fraction, keep_fraction, rescale_blocks_of_12, run_blocks_compressed,
                                       similarity_to_mean, teacher_blocks_for_depth)
from leanmim.parts.deep_supervision import supervised_blocks_for_depth
from leanmim.config import ConfigError
from leanmim.eval.cost import count_forward, count_train_step, method_cost, parameter_counts
from leanmim.parts.losses import normalized_pixels, standardize_tokens
from leanmim.methods import build_method
from leanmim.parts.teacher import cosine_momentum
from leanmim.parts.tokens import BatchRandom, patchify


def deep_tiny_model(**overrides):
    """12 blocks (so the default stage placement is the paper's), L = 64 patches, tiny width."""
    values = dict(img_size=32, patch_size=4, embed_dim=16, depth=12, num_heads=2, decoder_embed_dim=16)
    values.update(overrides)
    return tiny_model(**values).resolved()


def block_input_lengths(blocks) -> tuple[list[int], list]:
    """Forward pre-hooks recording the token count each block sees."""
    lengths: list[int] = []
    handles = [block.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
               for block in blocks]
    return lengths, handles


def make_identity(encoder) -> None:
    """Zero every residual branch's output layer: each block then returns its input exactly."""
    with torch.no_grad():
        for block in encoder.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()


# ---------------------------------------------------------------------------------------- compression


def test_kept_counts_of_the_paper():
    keep_half = keep_fraction(0.5)
    counts = [147]
    for _ in range(3):
        counts.append(keep_half(counts[-1]))
    assert counts == [147, 73, 36, 18]            # ≈ 9% of the 196 patches reconstructed
    drop_tenth = drop_fraction(0.1)
    assert [drop_tenth(n) for n in (196, 177, 160)] == [177, 160, 144]
    assert drop_fraction(0.3)(100) == 70 and keep_fraction(0.7)(100) == 70   # no floating-point off-by-one
    assert keep_fraction(0.1)(3) == 1 and drop_fraction(0.9)(1) == 1          # never empty (the authors' int(n·ρ): 0)
    assert rescale_blocks_of_12((3, 6, 9), 12) == (3, 6, 9) and rescale_blocks_of_12((3, 6, 9), 24) == (6, 12, 18)
    assert rescale_blocks_of_12((3, 6, 9), 6) == (2, 3, 4)


def test_kept_count_is_the_released_int_wherever_that_keeps_a_token():
    """The released teacher keeps ``ids_shuffle[:, :int(n * keep_ratio)]``; leanmim keeps the same count wherever
    that is ≥ 1 (and 1 where it is 0), for every n ≤ 1024 tokens and ρ = 0.01 … 0.99. An epsilon added to the
    product (leanmim before issue 26) kept one token more in 49 of these cases, e.g. n = 90, ρ = 0.7."""
    ratios = [k / 100 for k in range(1, 100)]
    epsilon_differs = []
    for keep_ratio in ratios:
        kept = keep_fraction(keep_ratio)
        for n in range(1, 1025):
            released = torch.arange(n)[:int(n * keep_ratio)].numel()
            assert kept(n) == max(1, released), (n, keep_ratio)
            if released >= 1 and math.floor(n * keep_ratio + 1e-9) != released:
                epsilon_differs.append((n, keep_ratio))
    assert len(epsilon_differs) == 49 and (90, 0.7) in epsilon_differs and keep_fraction(0.7)(90) == 62


def test_teacher_blocks_follow_the_authors_rule_at_any_depth():
    """Released rule: after 0-indexed blocks i·(depth // 3), i = 0, 1, 2; ours are 1-indexed (+1)."""
    released = {12: (0, 4, 8), 24: (0, 8, 16), 32: (0, 10, 20)}
    for depth, zero_indexed in released.items():
        assert teacher_blocks_for_depth(depth) == tuple(block + 1 for block in zero_indexed)
    assert teacher_blocks_for_depth(24) == (1, 9, 17) and teacher_blocks_for_depth(32) == (1, 11, 21)
    assert teacher_blocks_for_depth(8) == (1, 3, 5) and teacher_blocks_for_depth(4) == (1, 2, 3)
    assert teacher_blocks_for_depth(2) == (1,)                       # 2 // 3 = 0: one stage, after the first block
    # the rescaling rule stays for deep supervision (no released code): a different answer at 24 and 32
    assert supervised_blocks_for_depth((6, 8, 10, 12), 24) == (12, 16, 20, 24)
    assert supervised_blocks_for_depth((6, 8, 10, 12), 32) == (16, 21, 27, 32)
    assert rescale_blocks_of_12((1, 5, 9), 24) == (2, 10, 18) != teacher_blocks_for_depth(24)


@pytest.mark.parametrize("depth, stages", [(12, (1, 5, 9)), (24, (1, 9, 17)), (32, (1, 11, 21))])
def test_teacher_compresses_after_the_authors_blocks_at_depths_12_24_32(depth, stages):
    torch.manual_seed(0)
    pcae = build_method("pcae", deep_tiny_model(depth=depth), {})    # L = 64, M = 48 masked, ρ = 0.5
    assert pcae.teacher_blocks == stages
    lengths, hooks = block_input_lengths(pcae.teacher.blocks)
    pcae(torch.randn(2, 1, 32, 32), rng=BatchRandom(seed=0))
    for handle in hooks:
        handle.remove()
    # block b (1-indexed) sees 48 tokens halved once for every stage block before it
    assert lengths == [48 // 2 ** sum(stage < block for stage in stages) for block in range(1, depth + 1)]
    assert lengths[stages[1]] == 12 and lengths[stages[1] - 1] == 24   # the second stage is after block stages[1]
    override = build_method("pcae", deep_tiny_model(depth=depth), {"teacher_blocks": "2,3"})
    assert override.teacher_blocks == (2, 3)                         # --teacher-blocks still wins


def test_least_similar_tokens_are_kept_with_their_ids():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # normalized: four e1, one e2, one −e1 -> mean (1/2, 1/6); scores 1/2 (e1), 1/6 (e2), −1/2 (−e1)
    first = torch.stack([5 * e1, 3 * e2, 0.1 * e1, e1, -2 * e1, 7 * e1])
    second = torch.stack([-e1, 2 * e1, e1, e1, e1, 4 * e2])
    tokens = torch.stack([first, second])                          # (2, 6, 2)
    ids = torch.tensor([[20, 21, 22, 23, 24, 25], [3, 9, 1, 0, 7, 5]])
    scores = similarity_to_mean(tokens)
    assert torch.allclose(scores[0], torch.tensor([0.5, 1 / 6, 0.5, 0.5, -0.5, 0.5]))
    out, kept_ids = run_blocks_compressed([nn.Identity()], tokens, ids, (1,), keep_fraction(2 / 6))
    assert kept_ids.tolist() == [[24, 21], [3, 5]]                  # −e1 then e2, in each image
    assert torch.equal(out[0], torch.stack([-2 * e1, 3 * e2])) and torch.equal(out[1], torch.stack([-e1, 4 * e2]))
    # a fixed leading token (cls) is neither scored nor dropped, even when it is the least like the mean
    with_cls = torch.cat([torch.stack([-9 * e1, -9 * e1]).unsqueeze(1), tokens], dim=1)
    out, kept_ids = run_blocks_compressed([nn.Identity()], with_cls, ids, (1,), keep_fraction(2 / 6), num_fixed=1)
    assert out.shape == (2, 3, 2) and torch.equal(out[:, 0], torch.stack([-9 * e1, -9 * e1]))
    assert kept_ids.tolist() == [[24, 21], [3, 5]]
    # no stage after block 2 of 2: nothing dropped there
    out, kept_ids = run_blocks_compressed([nn.Identity(), nn.Identity()], tokens, ids, (1,), keep_fraction(0.5))
    assert kept_ids.shape == (2, 3) and kept_ids[0, :2].tolist() == [24, 21]


def test_teacher_compresses_to_configured_counts_at_each_stage():
    torch.manual_seed(0)
    pcae = build_method("pcae", deep_tiny_model(), {})               # L = 64, M = 48 masked, stages after 1, 5, 9
    assert pcae.teacher_blocks == (1, 5, 9)
    teacher_lengths, teacher_hooks = block_input_lengths(pcae.teacher.blocks)
    student_lengths, student_hooks = block_input_lengths(pcae.encoder.blocks)
    decoder_lengths, decoder_hooks = block_input_lengths(pcae.decoder.blocks)
    pcae(torch.randn(2, 1, 32, 32), rng=BatchRandom(seed=0))
    for handle in teacher_hooks + student_hooks + decoder_hooks:
        handle.remove()
    assert teacher_lengths == [48] + [24] * 4 + [12] * 4 + [6] * 3
    assert student_lengths == [17] * 12                              # the student drops nothing
    assert decoder_lengths == [1 + 16 + 6]                           # cls, visible, the 6 retained queries
    other = build_method("pcae", deep_tiny_model(), {"teacher_blocks": "2,3", "keep_ratio": 0.25, "mask_ratio": 0.5})
    assert other.teacher_blocks == (2, 3)
    lengths, hooks = block_input_lengths(other.teacher.blocks)
    other(torch.randn(2, 1, 32, 32))
    assert lengths == [32, 32] + [8] + [2] * 9


def test_teacher_retained_ids_map_back_to_the_right_patches():
    """Identity teacher blocks: a teacher token is its own embedded patch, so the answer is computable per patch."""
    torch.manual_seed(0)
    pcae = build_method("pcae", deep_tiny_model(depth=4), {"teacher_blocks": "1,3"})
    make_identity(pcae.teacher)
    images = torch.randn(3, 1, 32, 32)
    masking = pcae.mask(images, BatchRandom(seed=1))
    features, ids_retained = pcae.encode_teacher(images, masking.ids_masked, BatchRandom(seed=2))
    embedded = pcae.teacher.embed_patches(images)                    # (B, L, D)
    assert ids_retained.shape == (3, 12)                              # 48 -> 24 -> 12
    for image in range(3):
        # reference selection, one image at a time: stage 1 then stage 2 over the survivors
        survivors = masking.ids_masked[image].tolist()
        for _ in range(2):
            unit = nn.functional.normalize(embedded[image, survivors], dim=-1)
            score = unit @ unit.mean(dim=0)
            survivors = [survivors[i] for i in torch.argsort(score, stable=True)[:len(survivors) // 2].tolist()]
        assert ids_retained[image].tolist() == survivors
        assert set(survivors) <= set(masking.ids_masked[image].tolist())
        # the feature in row j is the teacher's normed feature of patch ids_retained[j]
        assert torch.allclose(features[image], pcae.teacher.norm(embedded[image, survivors]), atol=1e-6)


def test_random_dropping_keeps_the_same_counts_and_is_reproducible():
    pcae = build_method("pcae", deep_tiny_model(depth=4), {"drop_policy": "random", "teacher_blocks": [1, 3]})
    images = torch.randn(2, 1, 32, 32)
    ids_masked = pcae.mask(images, BatchRandom(seed=0)).ids_masked
    _, first = pcae.encode_teacher(images, ids_masked, BatchRandom(seed=5))
    _, again = pcae.encode_teacher(images, ids_masked, BatchRandom(seed=5))
    _, other = pcae.encode_teacher(images, ids_masked, BatchRandom(seed=6))
    assert first.shape == (2, 12) and torch.equal(first, again) and not torch.equal(first, other)


# ---------------------------------------------------------------------------------- downstream encoder


def test_token_drop_zero_is_the_plain_encoder_bit_for_bit():
    torch.manual_seed(0)
    encoder = build_method("mae", deep_tiny_model(depth=4), {}).encoder
    images = torch.randn(2, 1, 32, 32)
    plain = encoder.run_blocks(encoder.with_cls(encoder.embed_patches(images)))[0]
    assert torch.equal(encoder.forward_features(images), plain)
    assert torch.equal(encoder.forward_features(images, token_drop=0.0), plain)
    assert torch.equal(encoder(images), plain)
    # the compressing path with no stage computes the same thing
    assert torch.equal(encoder.forward_features(images, token_drop=0.3, drop_after=()), plain)


@pytest.mark.parametrize("token_drop,kept", [(0.1, [64, 58, 53, 48]), (0.3, [64, 45, 32, 23]),
                                             (0.5, [64, 32, 16, 8])])
def test_token_drop_keeps_cls_and_the_configured_counts(token_drop, kept):
    torch.manual_seed(0)
    encoder = build_method("mae", deep_tiny_model(), {}).encoder
    lengths, hooks = block_input_lengths(encoder.blocks)
    features = encoder.forward_features(torch.randn(2, 1, 32, 32), token_drop=token_drop)
    for handle in hooks:
        handle.remove()
    assert lengths == [1 + n for n in kept for _ in range(3)]       # stages after blocks 3, 6, 9
    assert features.shape == (2, 1 + kept[-1], 16) and torch.isfinite(features).all()


def test_token_drop_after_the_last_block_selects_rows_of_the_plain_output():
    """Dropping after the final block changes no computation: the output is cls + the least mean-like rows."""
    torch.manual_seed(0)
    encoder = build_method("mae", deep_tiny_model(depth=3), {}).encoder
    images = torch.randn(2, 1, 32, 32)
    plain, (raw,) = encoder.run_blocks(encoder.with_cls(encoder.embed_patches(images)), return_layers=(3,))
    compressed = encoder.forward_features(images, token_drop=0.25, drop_after=(3,))
    order = torch.argsort(similarity_to_mean(raw[:, 1:]), dim=1, stable=True)[:, :48]
    assert torch.equal(compressed[:, 0], plain[:, 0])
    assert torch.equal(compressed[:, 1:], torch.gather(plain[:, 1:], 1, order.unsqueeze(-1).expand(-1, -1, 16)))


@pytest.mark.parametrize("token_drop", [1.0, -0.1, 1.5])
def test_bad_token_drop(token_drop):
    encoder = build_method("mae", tiny_model().resolved(), {}).encoder
    with pytest.raises(ConfigError, match="token drop"):
        encoder.forward_features(torch.randn(1, 1, 16, 16), token_drop=token_drop)


# ------------------------------------------------------------------------------------- method, teacher


def test_predictions_and_targets_line_up_position_by_position():
    torch.manual_seed(0)
    pcae = build_method("pcae", deep_tiny_model(depth=4), {"target": "pixels", "teacher_blocks": "1,3"})
    pcae.eval()                                              # no drop path draws: the same forward twice is equal
    images = torch.randn(2, 1, 32, 32)
    output = pcae(images, rng=BatchRandom(seed=3))
    masking = pcae.mask(images, BatchRandom(seed=3))
    encoded, _ = pcae.encoder.forward_visible(images, masking.ids_keep)
    _, ids_retained = pcae.encode_teacher(images, masking.ids_masked, BatchRandom(seed=3))
    prediction = pcae.predict(encoded, masking.ids_keep, ids_retained)
    # each row belongs to its position, whatever the order the positions come in
    reversed_ids = ids_retained.flip(1)
    assert torch.allclose(pcae.predict(encoded, masking.ids_keep, reversed_ids), prediction.flip(1), atol=1e-5)
    # target row j is the normalized pixel patch at ids_retained[j]; the loss is the MSE over those pairs
    patches = normalized_pixels(patchify(images, 4))
    target = pcae.targets(images, None, ids_retained)
    by_hand = []
    for image in range(2):
        for row, patch in enumerate(ids_retained[image].tolist()):
            assert torch.equal(target[image, row], patches[image, patch])
            by_hand.append((prediction[image, row] - patches[image, patch]).pow(2).mean())
    assert output.loss.item() == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-5)
    assert output.predictions is None and torch.equal(output.mask, masking.mask)


def test_feature_target_is_one_minus_cosine_to_standardized_teacher_features():
    torch.manual_seed(0)
    pcae = build_method("pcae", deep_tiny_model(depth=2), {})
    pcae.eval()                                                       # no drop path draws between the two forwards
    assert pcae.decoder.head.out_features == 16                      # the encoder width D, not p²C
    images = torch.randn(2, 1, 32, 32)
    output = pcae(images, rng=BatchRandom(seed=4))
    masking = pcae.mask(images, BatchRandom(seed=4))
    encoded, _ = pcae.encoder.forward_visible(images, masking.ids_keep)
    features, ids_retained = pcae.encode_teacher(images, masking.ids_masked, BatchRandom(seed=4))
    prediction = pcae.predict(encoded, masking.ids_keep, ids_retained)
    centred = features - features.mean(-1, keepdim=True)
    target = centred / features.var(-1, unbiased=False, keepdim=True).add(1e-6).sqrt()
    assert torch.allclose(pcae.targets(images, features, ids_retained), target, atol=1e-5)
    cosine = (prediction * target).sum(-1) / (prediction.norm(dim=-1) * target.norm(dim=-1))
    assert output.loss.item() == pytest.approx((1 - cosine).mean().item(), rel=1e-5)
    assert standardize_tokens(features).shape == (2, 24, 16)     # depth 2: one stage (2 // 3 = 0), 48 → 24


def test_ema_teacher_starts_as_the_student_and_follows_the_momentum_formula():
    torch.manual_seed(0)
    pcae = build_method("pcae", tiny_model().resolved(), {"momentum_start": 0.5, "momentum_end": 1.0})
    pairs = list(zip(pcae.teacher.parameters(), pcae.encoder.parameters()))
    assert len(pairs) == len(list(pcae.encoder.parameters())) > 0
    assert all(torch.equal(teacher, student) for teacher, student in pairs)
    optimizer = torch.optim.SGD([p for p in pcae.parameters() if p.requires_grad], lr=0.5)
    pcae(torch.randn(4, 1, 16, 16), rng=BatchRandom(seed=0)).loss.backward()
    optimizer.step()
    before = [teacher.clone() for teacher, _ in pairs]
    assert any(not torch.equal(old, student) for old, (_, student) in zip(before, pairs))  # the student moved
    pcae.after_optimizer_step(progress=0.5)                         # cosine midpoint: m = 0.75
    momentum = cosine_momentum(0.5, 0.5, 1.0)
    assert momentum == pytest.approx(0.75)
    for old, (teacher, student) in zip(before, pairs):
        assert torch.allclose(teacher, momentum * old + (1 - momentum) * student, atol=1e-7)
    frozen = [teacher.clone() for teacher, _ in pairs]
    pcae.after_optimizer_step(progress=1.0)                         # m = 1: the teacher no longer moves
    assert all(torch.equal(old, teacher) for old, (teacher, _) in zip(frozen, pairs))
    assert cosine_momentum(0.0, 0.9999, 1.0) == pytest.approx(0.9999)


def released_momentum_schedule(base: float, final: float, total_steps: int) -> list[float]:
    """PCAE's released ``cosine_scheduler(momentum_teacher, 1, epochs, niter_per_ep)`` (no warmup), entry k used
    after step k: final + ½(base − final)(1 + cos(π·k/K)), k = 0 … K − 1."""
    return [final + 0.5 * (base - final) * (1 + math.cos(math.pi * k / total_steps)) for k in range(total_steps)]


@pytest.mark.parametrize("method, options, start, end", [
    ("pcae", {}, 0.9999, 1.0),
    ("pcae", {"momentum_start": 0.5}, 0.5, 1.0),
    ("ddae", {}, 0.999, 0.9999),
])
def test_ema_momentum_of_every_step_is_the_released_one(method, options, start, end):
    """Step k of K updates with m_k of the released schedule: m_0 = start at the first step, and the last step
    (k = K − 1) still moves the teacher (the schedule ran one step ahead before issue 26: its last update was
    m = end = 1, a no-op). The engine passes progress k / K (``MIMMethod.after_optimizer_step``)."""
    torch.manual_seed(0)
    model = build_method(method, tiny_model().resolved(), options)
    total_steps = 5
    for step, released in enumerate(released_momentum_schedule(start, end, total_steps)):
        with torch.no_grad():
            model.encoder.cls_token.add_(1.0)                          # the student moves by 1 before each update
        teacher_before, student = model.teacher.cls_token.clone(), model.encoder.cls_token.clone()
        model.after_optimizer_step(step / total_steps)
        assert cosine_momentum(step / total_steps, start, end) == pytest.approx(released, abs=1e-15)
        assert torch.allclose(model.teacher.cls_token, released * teacher_before + (1 - released) * student,
                              atol=1e-6)
    assert released < end and not torch.equal(model.teacher.cls_token, teacher_before)   # the last step moved it


def drop_rates(blocks):
    return [getattr(block.drop_path1, "drop_prob", 0.0) for block in blocks]


def test_drop_path_defaults_are_the_released_recipe():
    """PCAE's main_pretrain.py: --drop_path 0.25, linspace(0, 0.25, depth) over the student encoder's blocks and
    0.25 in every decoder block; the teacher is built with none (here: always in eval mode)."""
    pcae = build_method("pcae", deep_tiny_model(depth=5, decoder_depth=3), {})
    assert drop_rates(pcae.encoder.blocks) == pytest.approx([0.0, 0.0625, 0.125, 0.1875, 0.25])
    assert drop_rates(pcae.decoder.blocks) == pytest.approx([0.25, 0.25, 0.25])
    assert all(block.drop_path2.drop_prob == pytest.approx(0.25) for block in pcae.decoder.blocks)
    assert pcae.model_config.drop_path == 0.25 and pcae.model_config.decoder_drop_path == 0.25
    pcae.train()
    assert not pcae.teacher.training                                # its drop path modules never drop
    # a rate the user gives wins, encoder and decoder apart; other methods default to none
    chosen = build_method("pcae", deep_tiny_model(depth=5, drop_path=0.1, decoder_drop_path=0.0), {})
    assert drop_rates(chosen.encoder.blocks)[-1] == pytest.approx(0.1) and drop_rates(chosen.decoder.blocks) == [0.0]
    for method in ("mae", "prmim", "ddae"):
        other = build_method(method, deep_tiny_model(depth=5), {})
        assert set(drop_rates(other.encoder.blocks)) == {0.0} and set(drop_rates(other.decoder.blocks)) == {0.0}
    # every method built on MaskedDecoder takes --decoder-drop-path
    mae = build_method("mae", deep_tiny_model(decoder_drop_path=0.3), {})
    assert drop_rates(mae.decoder.blocks) == pytest.approx([0.3] * len(mae.decoder.blocks))
    # the run's config records the rates a method uses once it knows the method
    for method, rates in (("pcae", (0.25, 0.25)), ("mae", (0.0, 0.0)), ("lomar", (0.0, 0.0))):
        resolved = tiny_model().resolved(method=method)
        assert (resolved.drop_path, resolved.decoder_drop_path) == rates
    assert tiny_model(drop_path=0.0).resolved(method="pcae").drop_path == 0.0      # a 0 given is kept
    with pytest.raises(ConfigError, match=r"decoder_drop_path must lie in \[0, 1\)"):
        deep_tiny_model(decoder_drop_path=1.0)


def test_decoder_drop_path_draws_are_deterministic_and_active_only_in_training():
    """Drop path draws come from torch's global generator (the engine checkpoints its state): the same seed gives
    the same loss; a different seed a different one; in eval mode the decoder drops nothing."""
    pcae = build_method("pcae", deep_tiny_model(), {})
    images = torch.randn(4, 1, 32, 32)

    def loss(seed: int) -> float:
        torch.manual_seed(seed)
        return pcae(images, rng=BatchRandom(seed=0)).loss.item()

    pcae.train()
    assert loss(1) == loss(1) and loss(1) != loss(2)
    pcae.eval()
    assert loss(1) == loss(2)
    decoder = pcae.decoder.train()
    tokens = torch.randn(8, 5, decoder.decoder_dim)
    torch.manual_seed(0)
    first = decoder.blocks[0](tokens)
    torch.manual_seed(0)
    assert torch.equal(first, decoder.blocks[0](tokens))
    assert not torch.equal(first, decoder.blocks[0].eval()(tokens))  # some samples' branches were dropped


def test_teacher_gets_no_gradient_and_stays_in_eval_mode():
    pcae = build_method("pcae", tiny_model(drop_path=0.1).resolved(), {})
    pcae.train()
    assert pcae.encoder.training and not pcae.teacher.training
    assert pcae.teacher_modules() == [pcae.teacher]
    pcae(torch.randn(2, 1, 16, 16)).loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in pcae.teacher.parameters())
    assert all(p.grad is not None for p in pcae.encoder.blocks.parameters())
    assert pcae.decoder.head.weight.grad is not None


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    for target in ("features", "pixels"):
        pcae = build_method("pcae", tiny_model().resolved(), {"target": target})
        optimizer = torch.optim.AdamW([p for p in pcae.parameters() if p.requires_grad], lr=2e-3)
        images = torch.randn(4, 1, 16, 16)
        losses = []
        for step in range(8):
            output = pcae(images, progress=step / 8, rng=BatchRandom(seed=0))
            optimizer.zero_grad()
            output.loss.backward()
            optimizer.step()
            pcae.after_optimizer_step(step / 8)
            losses.append(output.loss.item())
        assert losses[-1] < 0.8 * losses[0], (target, losses)


@pytest.mark.parametrize("options,message", [
    ({"keep_ratio": 1.0}, "keep_ratio"), ({"mask_ratio": 0.0}, "mask_ratio"), ({"target": "tokens"}, "target"),
    ({"drop_policy": "attention"}, "drop_policy"), ({"teacher_blocks": "0,3"}, "teacher_blocks"),
    ({"momentum_start": 1.5}, "momentum_start"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        build_method("pcae", tiny_model().resolved(), options)


# ------------------------------------------------------------------------------------------------ cost


def test_cost_reports_parts_and_counts_the_teacher_forward_only():
    model = tiny_model(depth=4).resolved()                          # L = 16, D = 32, M = 12 masked
    images = torch.randn(2, 1, 16, 16)
    early, late = (build_method("pcae", model, {"teacher_blocks": blocks}) for blocks in ("1,2", "1,4"))
    forward_early, forward_late = count_forward(early, images), count_forward(late, images)
    assert set(forward_early) == {"encoder", "teacher", "decoder", "total"}
    # by hand: patch embedding of all 16 patches, then blocks over 12, 6, 3, 3 tokens (stages after 1 and 2)
    def block(n, d=32):
        return 12 * n * d * d + 2 * n * n * d
    assert forward_early["teacher"] == 16 * 16 * 32 + block(12) + block(6) + 2 * block(3)
    assert forward_late["teacher"] == 16 * 16 * 32 + block(12) + 2 * block(6) + block(6)
    assert forward_early["encoder"] == 16 * 16 * 32 + 4 * block(5)
    assert forward_early["total"] == forward_early["encoder"] + forward_early["teacher"] + forward_early["decoder"]
    params = parameter_counts(early)
    assert params["trainable"] == params["encoder"] + params["decoder"]
    # moving a stage changes only the teacher's forward: the backward (train_step − forward) is unchanged,
    # so the teacher is counted once, forward only
    assert forward_early["encoder"] == forward_late["encoder"] and forward_early["decoder"] == forward_late["decoder"]
    backward_early = count_train_step(early, images) - forward_early["total"]
    backward_late = count_train_step(late, images) - forward_late["total"]
    assert backward_early == backward_late
    assert backward_early < 2.6 * (forward_early["encoder"] + forward_early["decoder"])


def test_inference_cost_with_token_drop():
    model = deep_tiny_model()
    plain = method_cost("mae", model, inference=True, batch_size=1)["macs"]["encoder"]
    dropped = method_cost("mae", model, inference=True, batch_size=1, token_drop=0.3)["macs"]["encoder"]
    def block(n, d=16):
        return 12 * n * d * d + 2 * n * n * d
    embed = 64 * 16 * 16
    assert plain == embed + 12 * block(65)
    assert dropped == embed + 3 * (block(65) + block(46) + block(33) + block(24))
