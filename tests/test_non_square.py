"""Non-square inputs (``--img-size 16x24``, timm's and transformers' ``img_size=(16, 24)``): every method trains on a
4 x 6 patch grid, the data pipeline cuts height x width views, and the exports load in timm and transformers."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from conftest import tiny_model, train_steps
from leanmim.config import ConfigError, ModelConfig, format_img_size, parse_img_size
from leanmim.data import BatchEvalTransform, BatchMIMAugment, WorkerCrop, eval_box
from leanmim.data.common import cover_size
from leanmim.methods import build_method
from leanmim.parts.encoder import pool_features, sincos_pos_embed
from leanmim.parts.tokens import patchify, unpatchify

METHODS = {"mae": {}, "pcae": {}, "prmim": {}, "lomar": {"window_size": 3}, "ddae": {}}


@pytest.mark.parametrize("value, expected", [("64x96", [64, 96]), ("64X96", [64, 96]), ("64,96", [64, 96]),
                                             ("[64, 96]", [64, 96]), ([64, 96], [64, 96]), ((64, 96), [64, 96]),
                                             ("64", 64), (64, 64), ("64x64", 64), ([32, 32], 32), (28.0, 28)])
def test_image_sizes_parse_to_an_int_or_height_width(value, expected):
    assert parse_img_size(value) == expected
    assert ModelConfig(img_size=value).img_size == expected


@pytest.mark.parametrize("value", ["64x", "x96", "64x96x3", "64x0", "-64", "0", "1.5", 1.5, "abc", True, [64, 96, 3], []])
def test_bad_image_sizes_are_one_line(value):
    with pytest.raises(ConfigError) as caught:
        parse_img_size(value, "--img-size")
    assert "\n" not in str(caught.value) and "--img-size" in str(caught.value)


def test_the_grid_is_rows_by_columns_and_each_side_must_divide_by_the_patch():
    model = tiny_model(img_size="16x24").resolved()
    assert (model.img_hw, model.grid_size, model.num_patches, format_img_size(model.img_size)) == \
        ((16, 24), (4, 6), 24, "16x24")
    with pytest.raises(ConfigError, match="16x26 is not divisible by patch size 4"):
        tiny_model(img_size="16x26").resolved()


def test_patchify_and_the_position_table_follow_rows_and_columns():
    images = torch.arange(2 * 16 * 24, dtype=torch.float32).reshape(1, 2, 16, 24)
    patches = patchify(images, 4)                                       # (1, 24, 4·4·2), row-major over a 4 x 6 grid
    assert patches.shape == (1, 24, 32)
    # patch 7 is row 1, column 1: pixel (4, 4) of channel 0 leads it, channel 1 follows in the last axis
    assert patches[0, 7, 0] == images[0, 0, 4, 4] and patches[0, 7, 1] == images[0, 1, 4, 4]
    assert torch.equal(unpatchify(patches, 4, (4, 6), 2), images)
    table = sincos_pos_embed((4, 6), 8)                                 # [sin cos](column) | [sin cos](row)
    omega = 1.0 / 10000.0 ** (torch.arange(2, dtype=torch.float64) / 2)
    row, col = 3, 5
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega),
                          torch.cos(row * omega)]).float()
    assert torch.allclose(table[row * 6 + col], expected)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_on_a_4_by_6_grid(name):
    torch.manual_seed(0)
    method = build_method(name, tiny_model(img_size="16x24").resolved(method=name), METHODS[name])
    assert method.encoder.grid_size == (4, 6)
    images = torch.randn(4, 1, 16, 24)
    losses = train_steps(method, images, steps=6)
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    with torch.no_grad():
        features = method.eval().encoder.forward_features(images)
    assert features.shape == (4, 1 + 24, 32)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_exports_a_non_square_encoder_that_reloads_with_equal_features(name, tmp_path):
    import timm

    from leanmim.weights import export_encoder
    from leanmim.weights.export import export_relpos_encoder, load_relpos_encoder

    torch.manual_seed(1)
    model = tiny_model(img_size="16x24", in_chans=3).resolved(method=name)
    encoder = build_method(name, model, METHODS[name]).eval().encoder
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    images = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        ours = encoder.forward_features(images)
        if name == "lomar":   # relative positions: leanmim's own format, no timm counterpart
            again = load_relpos_encoder(export_relpos_encoder(encoder, tmp_path / "encoder.safetensors")).eval()
            assert again.grid_size == (4, 6) and torch.allclose(again.forward_features(images), ours, atol=1e-6)
            return
        out = export_encoder(encoder, model, tmp_path / "encoder", mean=[0.5] * 3, std=[0.25] * 3, crop_pct=0.875)
        loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert tuple(loaded.patch_embed.grid_size) == (4, 6)
        assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 16, 24]
        assert torch.allclose(loaded.forward_features(images), ours, atol=1e-5)
        assert torch.allclose(loaded(images), pool_features(ours, "mean"), atol=1e-5)


def test_the_transformers_export_of_a_non_square_mae_is_its_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from leanmim.weights import export_hf

    torch.manual_seed(2)
    model = tiny_model(img_size="16x24", in_chans=3).resolved()
    method = build_method("mae", model, {}).eval()
    with pytest.warns(UserWarning, match="square patch grids only"):
        out = export_hf(method, model, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ViTModel"]
    hf = transformers.ViTModel.from_pretrained(str(out), add_pooling_layer=False).eval()
    images = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=images).last_hidden_state, method.encoder.forward_features(images),
                              atol=1e-5)


def test_training_crops_are_height_by_width_with_the_aspect_range_of_the_output():
    augment = BatchMIMAugment((16, 24), (0.5,), (0.25,))
    images = torch.rand(64, 1, 40, 40)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == (64, 1, 16, 24)
    boxes = augment.sample_crops(4096, 400, 400, torch.Generator().manual_seed(1))
    aspect = boxes[:, 3] / boxes[:, 2]                                  # width / height of each crop
    assert aspect.min() >= 0.75 * 1.5 - 0.02 and aspect.max() <= 4 / 3 * 1.5 + 0.02
    # about as wide as the output on average (a little less: wide crops of large area fall off a square image more
    # often and are drawn again), where a square output's crops average 1
    assert 1.4 < aspect.log().mean().exp() < 1.55
    crop = WorkerCrop((16, 24))(torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8), 123)
    assert crop.shape == (3, 16, 24) and crop.dtype == torch.uint8


def test_the_evaluation_view_is_timms_for_a_non_square_input_size():
    from timm.data.transforms import ResizeKeepRatio

    # the box: floor(side / crop_pct) each side, as timm's eval transform; a square keeps round(S / crop_pct)
    assert eval_box((16, 24), 0.875) == (math.floor(16 / 0.875), math.floor(24 / 0.875)) == (18, 27)
    assert eval_box(32, 0.875) == (37, 37)
    for height, width in [(20, 30), (30, 20), (50, 50), (19, 77)]:
        image = torch.zeros(3, height, width)
        assert cover_size((height, width), (18, 27)) == ResizeKeepRatio.get_params(image, (18, 27), 0.0)
    # a batch of stored 18 x 27 boxes: the centre 16 x 24, nothing resized; a 28 x 28 idx image: covered, centred
    stored = torch.rand(2, 1, 18, 27)
    view = BatchEvalTransform((16, 24), (0.0,), (1.0,), crop_size=(16, 24))(stored)
    assert torch.equal(view, TF.center_crop(stored, [16, 24]))
    idx_view = BatchEvalTransform((16, 24), (0.0,), (1.0,))(torch.rand(2, 1, 28, 28))
    assert idx_view.shape == (2, 1, 16, 24)


def test_finetune_img_size_resizes_a_non_square_table_by_rows_and_columns(tmp_path):
    from timm.layers import resample_abs_pos_embed

    from leanmim.weights.load import run_at_img_size
    from leanmim.weights.checkpoints import LoadedRun
    from leanmim.config import DataConfig, RunConfig, TrainConfig

    model = tiny_model(img_size="16x24").resolved()
    method = build_method("mae", model, {}).eval()
    with torch.no_grad():
        method.encoder.pos_embed.add_(torch.randn_like(method.encoder.pos_embed))
    config = RunConfig(method="mae", model=model, data=DataConfig(path="fashion-mnist"),
                       train=TrainConfig(out=str(tmp_path)), options={})
    loaded = LoadedRun(config=config, method=method, checkpoint_path=tmp_path / "last.ckpt", global_step=0, epoch=0)
    resized, notes = run_at_img_size(loaded, "24x16")
    assert resized.config.model.grid_size == (6, 4) and "4×6 to a 6×4 grid" in notes[0]
    table = torch.cat([torch.zeros(1, 32), method.encoder.pos_embed]).unsqueeze(0)
    expected = resample_abs_pos_embed(table, [6, 4], [4, 6], num_prefix_tokens=1)[0, 1:]
    assert torch.allclose(resized.method.encoder.pos_embed, expected)


def test_a_non_square_pretraining_runs_end_to_end_from_the_command_line(tmp_path):
    """--img-size 16x24 on photos of three shapes: pretrain, reconstruct, embed; a bad size is one line."""
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate([(40, 60), (60, 40), (50, 50)] * 6):
        Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    run = tmp_path / "run"
    command = [sys.executable, "-m", "leanmim", "pretrain", "--data", str(tmp_path), "--out", str(run),
               "--img-size", "16x24", "--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
               "--decoder-depth", "1", "--epochs", "1", "--batch-size", "9", "--precision", "32"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "at 16x24 px" in done.stderr + done.stdout
    assert (run / "config.yaml").read_text().count("- 16\n  - 24") == 1
    embedded = subprocess.run([sys.executable, "-m", "leanmim", "embed", str(run), "--data", str(tmp_path),
                               "--out", str(tmp_path / "features.safetensors")], capture_output=True, text=True,
                              timeout=300)
    assert embedded.returncode == 0, embedded.stderr
    bad = subprocess.run(command[:-2] + ["--img-size", "16x", "--out", str(tmp_path / "bad")], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "HEIGHTxWIDTH" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("kind", ["timm folder", "timm file", "transformers"])
def test_a_non_square_export_is_read_back_with_its_grid(kind, tmp_path):
    """--init-from a non-square export: the file states its input size, and the 24-row table is read as 4 x 6 (as
    16 x 24 px), never guessed as a square or refused."""
    from leanmim.weights import export_encoder, export_hf, model_from_weights, read_weights
    from leanmim.weights.load import load_encoder

    torch.manual_seed(3)
    model = tiny_model(img_size="16x24", in_chans=3).resolved()
    method = build_method("mae", model, {}).eval()
    with torch.no_grad():
        method.encoder.pos_embed.add_(torch.randn_like(method.encoder.pos_embed))
    if kind == "transformers":
        pytest.importorskip("transformers")
        holder = torch.nn.Module()
        holder.encoder = method.encoder
        out = export_hf(holder, model, tmp_path / "hf")
    else:
        out = export_encoder(method.encoder, model, tmp_path / ("encoder" if kind == "timm folder" else "e.safetensors"))
    weights = read_weights(out)
    again = model_from_weights(weights, in_chans=3)
    assert again.img_hw == (16, 24) and again.grid_size == (4, 6)
    encoder = build_method("mae", again, {}).encoder
    notes = load_encoder(encoder, weights)
    assert not any("resized" in note for note in notes)
    images = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        assert torch.allclose(encoder.eval().forward_features(images), method.encoder.forward_features(images),
                              atol=1e-5)
