"""Weights in: every layout --init-from reads gives the source architecture's own outputs; errors are one line."""

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_model, tiny_run_config
from leanmim.config import ConfigError
from leanmim.parts.encoder import ViTEncoder
from leanmim.methods import build_method
from leanmim.parts.tokens import BatchRandom
from leanmim.weights import init_method_from, load_encoder, model_from_weights, read_weights
from reference_mae import assert_same_as_hf_vitmae, random_reference_state, reference_mae_forward


def tiny_timm_vit(img_size=16, **kwargs):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                             **kwargs).eval()


def randomise(module, seed=0):
    """Every parameter random (also position tables and the cls row of a learned table)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module


def test_mae_reference_checkpoint_gives_the_reference_forward(tmp_path):
    state = random_reference_state()
    torch.save({"model": state}, tmp_path / "mae_pretrain.pth")
    mae = build_method("mae", tiny_model(in_chans=3).resolved(), {"mask_ratio": 0.75})
    notes = init_method_from(mae, tmp_path / "mae_pretrain.pth")
    # an MAE file states no head counts: both assumptions are said, with the flag that overrides them
    assert notes == ["the file does not state its encoder heads: 2 assumed (override with --num-heads)",
                     "the file does not state its decoder heads: 2 assumed (override with --decoder-num-heads)"]
    images = torch.randn(3, 3, 16, 16)
    ours = mae(images, rng=BatchRandom(seed=5))
    loss, pred, mask = reference_mae_forward(state, images, BatchRandom(seed=5).rand(3, 16), 4, 2, 2)
    assert torch.equal(ours.mask, mask)
    assert torch.allclose(ours.predictions, pred, atol=1e-5)
    assert ours.loss.item() == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_gives_timm_forward(tmp_path, suffix):
    # a learned table with a non-zero cls row and a classifier head (ignored), as a supervised timm ViT has
    vit = randomise(tiny_timm_vit(num_classes=5))
    path = tmp_path / f"vit{suffix}"
    state = {key: value.contiguous() for key, value in vit.state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    weights = read_weights(path)
    assert weights.layout == "timm" and not weights.has_decoder()
    encoder = ViTEncoder(16, 4, 3, 32, 2, 2).eval()
    assert load_encoder(encoder, weights) == [
        "the file does not state its encoder heads: 2 assumed (override with --num-heads)"]
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(encoder.forward_features(images), vit.forward_features(images), atol=1e-5)


def test_position_table_resized_as_timm_does(tmp_path):
    """Weights of a 32 px model (8×8 grid) into a 16 px encoder (4×4): the result equals timm's own 16 px model
    after timm's checkpoint filter (bicubic resampling of pos_embed)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    big = randomise(tiny_timm_vit(img_size=32, num_classes=0))
    torch.save(big.state_dict(), tmp_path / "big.pth")
    small = tiny_timm_vit(img_size=16, num_classes=0)
    small.load_state_dict(checkpoint_filter_fn(big.state_dict(), small))
    encoder = ViTEncoder(16, 4, 3, 32, 2, 2).eval()
    notes = load_encoder(encoder, read_weights(tmp_path / "big.pth"))
    assert any("8×8 to a 4×4 grid by timm's resample_abs_pos_embed" in note for note in notes)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(encoder.forward_features(images), small.forward_features(images), atol=1e-5)


def test_rgb_weights_adapted_to_grayscale_as_timm_does(tmp_path):
    vit = randomise(tiny_timm_vit(num_classes=0))
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    encoder = ViTEncoder(16, 4, 1, 32, 2, 2)
    notes = load_encoder(encoder, read_weights(tmp_path / "vit.pth"))
    assert any("3 to 1 input channels" in note for note in notes)
    assert torch.allclose(encoder.patch_embed.proj.weight, vit.patch_embed.proj.weight.sum(dim=1, keepdim=True))


def test_mismatches_are_one_line_errors_naming_the_weights_and_the_fix(tmp_path):
    torch.save({"model": random_reference_state()}, tmp_path / "w.pth")
    wider = build_method("mae", tiny_model(in_chans=3, embed_dim=64, num_heads=2).resolved(), {})
    with pytest.raises(ConfigError) as error:
        init_method_from(wider, tmp_path / "w.pth")
    message = str(error.value)
    assert "\n" not in message and "shape mismatches" in message and "32-d, 2 blocks, patch 4" in message
    assert "--model" in message
    deeper_decoder = build_method("mae", tiny_model(in_chans=3, decoder_depth=2).resolved(), {})
    with pytest.raises(ConfigError, match=r"12 missing \(decoder_blocks\.1\.norm1\.weight.*--decoder-depth 1"):
        init_method_from(deeper_decoder, tmp_path / "w.pth")
    torch.save({"model": random_reference_state(), "args": argparse.Namespace(lr=1)}, tmp_path / "full.pth")
    with pytest.raises(ConfigError, match="never unpickles"):
        read_weights(tmp_path / "full.pth")
    with pytest.raises(ConfigError, match="does not exist"):
        read_weights(tmp_path / "absent.pth")
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="no ViT weights"):
        read_weights(tmp_path / "other.pth")


def test_decoder_head_of_another_target_is_left_initialised(tmp_path):
    torch.save({"model": random_reference_state()}, tmp_path / "w.pth")
    gray = build_method("mae", tiny_model(in_chans=1).resolved(), {})  # predicts 16 values per patch, not 48
    head_before = gray.decoder.head.weight.clone()
    notes = init_method_from(gray, tmp_path / "w.pth")
    assert any("prediction head left as initialised" in note for note in notes)
    assert torch.equal(gray.decoder.head.weight, head_before)
    assert torch.equal(gray.decoder.embed.weight, random_reference_state()["decoder_embed.weight"])


def test_ema_teacher_starts_equal_to_the_loaded_encoder(tmp_path):
    torch.save({"model": random_reference_state()}, tmp_path / "w.pth")
    ddae = build_method("ddae", tiny_model(in_chans=3).resolved(), {})
    init_method_from(ddae, tmp_path / "w.pth")
    for name, value in ddae.encoder.state_dict().items():
        assert torch.equal(ddae.teacher.state_dict()[name], value)


def test_architecture_inferred_from_weights():
    weights = read_weights_from_state(random_reference_state(dim=64, depth=3, grid=5))
    model = model_from_weights(weights)
    assert (model.embed_dim, model.depth, model.patch_size, model.img_size, model.in_chans) == (64, 3, 4, 20, 3)
    assert model.num_heads == 1  # no preset is 64 wide, no config: 64 / 64


def read_weights_from_state(state):
    from leanmim.weights import canonical_weights

    return canonical_weights(state, "MAE reference", "test")


def test_pretrain_init_from_starts_there_and_resume_ignores_it(tiny_data, tmp_path):
    from leanmim.weights import load_run
    from leanmim.train.pretrain import pretrain

    state = random_reference_state(chans=1)
    state["decoder_pred.weight"], state["decoder_pred.bias"] = state["decoder_pred.weight"][:16], state["decoder_pred.bias"][:16]
    torch.save({"model": state}, tmp_path / "w.pth")
    config = tiny_run_config(tiny_data, tmp_path / "run", max_steps=1, lr=0.0, init_from=str(tmp_path / "w.pth"))
    summary = pretrain(config)
    assert summary["global_step"] == 1
    run = load_run(tmp_path / "run")
    assert torch.equal(run.method.encoder.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    assert torch.equal(run.method.decoder.head.weight, state["decoder_pred.weight"])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["identity"]["train.init_from"] == str(tmp_path / "w.pth")
    # a resume loads the run's checkpoint: the weights file is not read again (here it is gone)
    (tmp_path / "w.pth").unlink()
    assert pretrain(config)["already_finished"]
    # a bad file is refused before anything is written
    torch.save({"model": random_reference_state(dim=64)}, tmp_path / "wide.pth")
    with pytest.raises(ConfigError, match="shape mismatches"):
        pretrain(tiny_run_config(tiny_data, tmp_path / "run2", max_steps=1, init_from=str(tmp_path / "wide.pth")))
    assert not (tmp_path / "run2").exists()


def test_leanmim_run_and_export_read_back(tiny_data, tmp_path):
    from leanmim.train.pretrain import pretrain
    from leanmim.weights import export_encoder

    pretrain(tiny_run_config(tiny_data, tmp_path / "run", max_steps=2))
    from_run = read_weights(tmp_path / "run")
    assert from_run.layout == "leanmim" and from_run.has_decoder()
    fresh = build_method("prmim", tiny_model().resolved(), {})
    init_method_from(fresh, tmp_path / "run")
    from leanmim.weights import load_run
    trained = load_run(tmp_path / "run").method
    for name, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    out = export_encoder(trained.encoder, trained.model_config, tmp_path / "encoder.safetensors")
    encoder = ViTEncoder(16, 4, 1, 32, 2, 2)
    load_encoder(encoder, read_weights(out))
    for name, value in trained.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], value), name


# ----------------------------------------------------------------------------- transformers (when installed)

def tiny_hf_mae():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                       image_size=16, patch_size=4, num_channels=3, decoder_hidden_size=32,
                                       decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                       decoder_intermediate_size=128, layer_norm_eps=1e-6, norm_pix_loss=True,
                                       mask_ratio=0.75, hidden_act="gelu")
    model = randomise(transformers.ViTMAEForPreTraining(config).eval())
    with torch.no_grad():  # fixed tables as the published models hold them: the decoder's cls row is zero
        model.vit.embeddings.position_embeddings.copy_(random_reference_state()["pos_embed"])
        model.decoder.decoder_pos_embed.copy_(random_reference_state()["decoder_pos_embed"])
    return model


def test_transformers_vitmae_directory_gives_its_forward(tmp_path):
    hf = tiny_hf_mae()
    hf.save_pretrained(tmp_path / "hf")
    weights = read_weights(tmp_path / "hf")
    assert weights.layout == "transformers" and weights.config["num_heads"] == 2
    mae = build_method("mae", tiny_model(in_chans=3).resolved(), {"mask_ratio": 0.75})
    init_method_from(mae, weights)
    assert_same_as_hf_vitmae(mae, hf, seed=5)


def test_transformers_vit_model_directory_gives_its_forward(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                    image_size=16, patch_size=4, num_channels=3, layer_norm_eps=1e-6)
    vit = randomise(transformers.ViTModel(config, add_pooling_layer=True).eval())
    vit.save_pretrained(tmp_path / "vit")
    encoder = ViTEncoder(16, 4, 3, 32, 2, 2).eval()
    load_encoder(encoder, read_weights(tmp_path / "vit"))
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(encoder.forward_features(images), vit(pixel_values=images).last_hidden_state, atol=1e-5)


def test_finetune_from_published_weights_without_a_run(tiny_data, tmp_path):
    from leanmim.config import FinetuneConfig
    from leanmim.train.finetune import finetune
    from leanmim.weights import load_finetuned

    torch.save({"model": random_reference_state()}, tmp_path / "mae.pth")   # RGB, 16 px; the data is grayscale
    settings = FinetuneConfig(init_from=str(tmp_path / "mae.pth"), data=str(tiny_data), epochs=1, batch_size=32,
                              precision="32", progress_bar=False, out=str(tmp_path / "ft"))
    results = finetune(None, settings)
    assert results["epochs_completed"] == 1
    classifier = load_finetuned(tmp_path / "ft").classifier
    assert classifier.encoder.embed_dim == 32 and len(classifier.encoder.blocks) == 2
    # the position table is trained, as in MAE's fine-tuning (it was a fixed buffer in pretraining)
    assert isinstance(classifier.encoder.pos_embed, torch.nn.Parameter)
    assert not torch.allclose(classifier.encoder.pos_embed, random_reference_state()["pos_embed"][0, 1:])
    with pytest.raises(ConfigError, match="exactly one"):
        finetune(str(tmp_path / "ft"), settings)


def test_reference_and_transformers_tables_resized_as_their_library_does():
    """MAE reference util/pos_embed.interpolate_pos_embed, reproduced from its published code."""
    from leanmim.weights import resized_table

    table = torch.randn(1, 1 + 14 * 14, 8)
    pos_tokens = table[:, 1:].reshape(-1, 14, 14, 8).permute(0, 3, 1, 2)
    pos_tokens = torch.nn.functional.interpolate(pos_tokens, size=(6, 6), mode="bicubic", align_corners=False)
    expected = torch.cat((table[:, :1], pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)
    notes = []
    assert torch.equal(resized_table(table, (6, 6), "t", notes, "MAE reference"), expected)
    assert "interpolate_pos_embed" in notes[0]
    hf = tiny_hf_mae()   # its encoder table, 4×4, resized by transformers itself to 8×8
    hf_table = hf.vit.embeddings.position_embeddings.detach()
    with torch.no_grad():
        theirs = hf.vit.embeddings.interpolate_pos_encoding(torch.zeros(1, 65, 32), 32, 32)
    assert torch.allclose(resized_table(hf_table, (8, 8), "t", [], "transformers"), theirs, atol=1e-6)


def test_refusals_name_the_file_and_the_reason(tmp_path):
    vit = tiny_timm_vit(num_classes=0, qkv_bias=False)
    torch.save(vit.state_dict(), tmp_path / "nobias.pth")
    with pytest.raises(ConfigError, match=r"nobias.pth' cannot be loaded: its attention has no qkv bias"):
        load_encoder(ViTEncoder(16, 4, 3, 32, 2, 2), read_weights(tmp_path / "nobias.pth"))
    torch.save(tiny_timm_vit(num_classes=0, init_values=1e-5).state_dict(), tmp_path / "ls.pth")
    with pytest.raises(ConfigError, match=r"ls.pth' cannot be loaded: its blocks have layer scale"):
        load_encoder(ViTEncoder(16, 4, 3, 32, 2, 2), read_weights(tmp_path / "ls.pth"))
    torch.save(tiny_timm_vit(num_classes=0, reg_tokens=4).state_dict(), tmp_path / "reg.pth")
    with pytest.raises(ConfigError, match=r"reg.pth' cannot be loaded: it has 4 register tokens"):
        load_encoder(ViTEncoder(16, 4, 3, 32, 2, 2), read_weights(tmp_path / "reg.pth"))


def test_transformers_relu_refused_and_eps_noted(tmp_path):
    transformers = pytest.importorskip("transformers")
    for act, eps in (("relu", 1e-6), ("gelu", 1e-12)):
        config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=128, image_size=16, patch_size=4, num_channels=3,
                                        layer_norm_eps=eps, hidden_act=act)
        transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / act)
    with pytest.raises(ConfigError, match=r"relu' states hidden_act 'relu': leanmim's ViT blocks use exact GELU"):
        load_encoder(ViTEncoder(16, 4, 3, 32, 2, 2), read_weights(tmp_path / "relu"))
    notes = load_encoder(ViTEncoder(16, 4, 3, 32, 2, 2), read_weights(tmp_path / "gelu"))
    assert notes == ["the file states layer_norm_eps 1e-12; leanmim's LayerNorms use 1e-6 (MAE's and timm's, which "
                     "its exports record; outputs move by ~1e-5)"]
    with pytest.raises(ConfigError, match="has 2 encoder attention heads, this model 1: pass --num-heads 2"):
        load_encoder(ViTEncoder(16, 4, 3, 32, 2, 1), read_weights(tmp_path / "gelu"))
