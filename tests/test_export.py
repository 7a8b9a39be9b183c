"""Weights out: timm (file and local-dir folder with pretrained_cfg) and transformers directories, numerically equal."""

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from leanmim.config import ConfigError
from leanmim.parts.encoder import pool_features
from leanmim.methods import build_method
from leanmim.weights import export_encoder, export_hf
from reference_mae import assert_same_as_hf_vitmae


def trained_like(method_name="mae", seed=0):
    """A method whose every weight and position table is random (as after training, not at initialisation)."""
    torch.manual_seed(seed)
    method = build_method(method_name, tiny_model(in_chans=3).resolved(), {})
    with torch.no_grad():
        for parameter in method.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
        method.encoder.pos_embed.add_(torch.randn_like(method.encoder.pos_embed) * 0.1)
    return method.eval()


def test_timm_local_dir_export_loads_with_its_pretrained_cfg_and_mean_pooling(tmp_path):
    import timm
    from timm.data import resolve_data_config

    method = trained_like()
    out = export_encoder(method.encoder, method.model_config, tmp_path / "encoder", mean=[0.25] * 3, std=[0.5] * 3)
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    data = resolve_data_config({}, model=model)
    assert tuple(data["input_size"]) == (3, 16, 16) and tuple(data["mean"]) == (0.25,) * 3 and tuple(data["std"]) == (0.5,) * 3
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        features = method.encoder.forward_features(images)
        assert torch.allclose(model.forward_features(images), features, atol=1e-5)
        assert torch.allclose(model(images), pool_features(features, "mean"), atol=1e-5)  # num_classes 0: pooled
    # a new head for fine-tuning: the encoder weights load, the head starts fresh
    classifier = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=10)
    assert classifier.head.out_features == 10


def test_timm_file_export_records_pretrained_cfg_in_metadata(tmp_path):
    import timm
    from safetensors import safe_open

    method = trained_like()
    out = export_encoder(method.encoder, method.model_config, tmp_path / "encoder.safetensors", [0.3] * 3, [0.2] * 3)
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    cfg = json.loads(metadata["pretrained_cfg"])
    assert cfg["input_size"] == [3, 16, 16] and cfg["mean"] == [0.3] * 3 and metadata["global_pool"] == "avg"
    model = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=16, patch_size=4,
                              embed_dim=32, depth=2, num_heads=2, global_pool="avg", fc_norm=False,
                              pretrained_cfg_overlay=dict(file=str(out), **cfg)).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(images), pool_features(method.encoder.forward_features(images), "mean"), atol=1e-5)


def test_hf_export_of_mae_is_vitmae_for_pretraining_with_equal_outputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    method = trained_like()
    out = export_hf(method, method.model_config, tmp_path / "hf", {"mask_ratio": 0.75, "norm_pix_loss": True})
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["ViTMAEForPreTraining"] and config["layer_norm_eps"] == 1e-6
    hf = transformers.ViTMAEForPreTraining.from_pretrained(str(out)).eval()
    # from_pretrained gives the stored tables (a model built from the config alone holds zeros in transformers 5)
    assert torch.allclose(hf.vit.embeddings.position_embeddings[0, 1:], method.encoder.pos_embed)
    assert_same_as_hf_vitmae(method, hf, seed=3)


def test_hf_export_of_a_bare_encoder_is_vit_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    method = trained_like()
    holder = torch.nn.Module()
    holder.encoder = method.encoder
    out = export_hf(holder, method.model_config, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ViTModel"]
    hf = transformers.ViTModel.from_pretrained(str(out), add_pooling_layer=False).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=images).last_hidden_state, method.encoder.forward_features(images),
                              atol=1e-5)


def test_relative_position_encoder_has_no_hf_export(tmp_path):
    method = build_method("lomar", tiny_model(in_chans=3).resolved(), {"window_size": 3})
    with pytest.raises(ConfigError, match="no transformers counterpart"):
        export_hf(method, method.model_config, tmp_path / "hf")


def test_hf_export_writes_a_preprocessor_that_reproduces_the_evaluation_view(tmp_path):
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from leanmim.data import load_image
    from leanmim.eval.predict import eval_view

    method = trained_like()
    mean, std = [0.2, 0.3, 0.4], [0.5, 0.6, 0.7]
    out = export_hf(method, method.model_config, tmp_path / "hf", mean=mean, std=std, crop_pct=16 / 18)
    config = json.loads((out / "preprocessor_config.json").read_text())
    assert config["size"] == {"shortest_edge": 18} and config["crop_size"] == {"height": 16, "width": 16}
    processor = transformers.AutoImageProcessor.from_pretrained(str(out))
    generator = torch.Generator().manual_seed(0)
    views = {}
    for width in (24, 30):   # 20 high: resized to 18 × 21 and 18 × 27, the centre 16 × 16 kept
        picture = tmp_path / f"{width}.png"
        Image.fromarray(torch.randint(0, 256, (20, width, 3), dtype=torch.uint8, generator=generator).numpy()).save(picture)
        pixels = processor(images=Image.open(picture).convert("RGB"), return_tensors="pt")["pixel_values"]
        views[width] = pixels, eval_view(load_image(str(picture), 3), 16, 16 / 18, mean, std)[None]
    if int(transformers.__version__.split(".")[0]) < 5:   # 4.x resizes with PIL: a grey level apart here and there
        assert all(torch.allclose(pixels, ours, atol=0.1) for pixels, ours in views.values())
        return
    pixels, ours = views[24]
    assert pixels.shape == ours.shape == (1, 3, 16, 16) and torch.allclose(pixels, ours, atol=1e-5)
    # 27 - 16 = 11 columns to drop: torchvision keeps columns 6.. (rounds 5.5 half to even), transformers 5.. (floors)
    pixels, ours = views[30]
    assert not torch.allclose(pixels, ours, atol=1e-2)
    assert torch.allclose(pixels[..., 1:], ours[..., :-1], atol=1e-5)   # the documented one-column offset


def test_hf_export_replaces_a_previous_export_whole_and_keeps_it_when_writing_fails(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    method = trained_like()
    holder = torch.nn.Module()
    holder.encoder = method.encoder
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"an older sharded export")
    export_hf(holder, method.model_config, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]   # replaced whole
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    before = (out / "model.safetensors").read_bytes()

    def fail_half_way(self, directory, **kwargs):
        Path(directory).mkdir()
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.ViTModel, "save_pretrained", fail_half_way)
    holder.encoder = trained_like(seed=1).encoder
    with pytest.raises(OSError, match="No space"):
        export_hf(holder, method.model_config, out)
    assert (out / "model.safetensors").read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["hf"]
    monkeypatch.undo()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):   # not an export's file: never deleted
        export_hf(holder, method.model_config, out)
    assert (out / "notes.txt").read_text() == "mine"
