"""What a newcomer meets first (issue 30 §2-§3): a quiet console with leanmim's own summary, timm model names,
16-bit images, the raw-pixel probe without a run, absolute data paths, keyword calls of api.pretrain."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from leanmim.config import ConfigError, ModelConfig

TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
        "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2", "--batch-size", "32"]


def test_default_pretraining_prints_only_leanmim(tiny_data, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "leanmim", "pretrain", "--data", str(tiny_data), *TINY, "--max-steps", "3",
               "--out", str(run)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "LEANMIM_VERBOSE": ""})
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    for noise in ("GPU available", "TPU available", "litlogger", "LeafSpec", "log_every_n_steps", "not empty",
                  "weights_only", "site-packages", "Warning", "Epoch 0"):
        assert noise not in output, noise
    assert "leanmim" in result.stderr and "128 images" in result.stderr and "3 in total" in result.stderr
    assert "fp32" in result.stderr or "bf16" in result.stderr
    assert "step 3/3" in result.stderr                       # the progress line (non-TTY: a plain line)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["path"] == str(tiny_data.resolve())   # absolute: --config works from anywhere


@pytest.mark.parametrize("name, expected", [("vit_base_patch16_224", (16, 768, 12, 12, 224)),
                                            ("deit_tiny_patch16_224", (16, 192, 12, 3, 224))])
def test_timm_names_map_to_the_architecture(name, expected):
    model = ModelConfig(name=name).resolved()
    assert (model.patch_size, model.embed_dim, model.depth, model.num_heads, model.img_size) == expected


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "resnet18", "not_a_model"])
def test_non_plain_timm_names_are_refused_in_one_line(name):
    with pytest.raises(ConfigError) as err:
        ModelConfig(name=name).resolved()
    assert "\n" not in str(err.value) and name in str(err.value)


def test_sixteen_bit_images_keep_their_range(tmp_path):
    from leanmim.data.common import load_image

    twelve_bit = np.linspace(200, 4200, 64).reshape(8, 8).astype(np.uint16)
    Image.fromarray(twelve_bit).save(tmp_path / "g12.png")
    with pytest.warns(UserWarning):
        import leanmim.data.common as common
        common._WIDE_NOTED = False
        image = load_image(str(tmp_path / "g12.png"), 1)
    assert image.min() == 0 and image.max() == 255 and len(image.unique()) == 64   # /257 gave 16 levels


def test_probe_raw_baseline_needs_no_run(tiny_data):
    from leanmim import api

    report = api.probe(data=str(tiny_data), baseline="raw", linear_epochs=2)
    assert report["features"] == "raw pixels" and report["feature_dim"] == 16 * 16


def test_api_pretrain_takes_keywords(tiny_data, tmp_path):
    from leanmim import api

    summary = api.pretrain(out=str(tmp_path / "run"), data=str(tiny_data), model="vit_tiny_patch16", img_size=16,
                           patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                           decoder_num_heads=2, batch_size=32, max_steps=2, mask_ratio=0.5)
    assert summary["global_step"] == 2
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        api.pretrain(out=str(tmp_path / "other"), colour="red")


def test_a_skipped_image_is_one_leanmim_warning_line_from_any_folder_of_the_package(tmp_path):
    """Warnings raised anywhere in leanmim (here data/folder.py, decoding) print as one ``leanmim: warning:`` line,
    not Python's ``FILE:LINE: UserWarning`` pair (the console's test of "is it leanmim's" once looked in train/ only)."""
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for index in range(12):
        Image.fromarray(np.full((16, 16), index * 20, dtype=np.uint8)).save(images / f"{index}.png")
    (images / "broken.png").write_bytes(b"not a picture")
    command = [sys.executable, "-m", "leanmim", "pretrain", "--data", str(images), *TINY, "--max-steps", "1",
               "--batch-size", "4", "--out", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "LEANMIM_VERBOSE": ""})
    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stderr.splitlines() if "broken.png" in line]
    assert skipped and all(line.startswith("leanmim: warning: skipping unreadable image") for line in skipped), skipped
    assert "UserWarning" not in result.stderr and "warn_skip(" not in result.stderr


def test_a_runs_config_resumes_that_run_from_any_directory(tiny_data, tmp_path, monkeypatch):
    """`--out runs/x` typed in one directory is stored absolute in RUN/config.yaml: `--config RUN/config.yaml` from
    elsewhere resumes (here: finds finished) that run, and starts nothing beside the caller."""
    from leanmim import api

    first, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    first.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(first)
    api.pretrain(data=str(tiny_data), out="runs/x", max_steps=2, batch_size=32, img_size=16, patch_size=4, embed_dim=32, depth=2,
                 num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, precision="32",
                 progress_bar=False, logger="csv")
    stored = yaml.safe_load((first / "runs" / "x" / "config.yaml").read_text())
    assert stored["train"]["out"] == str(first / "runs" / "x")
    monkeypatch.chdir(elsewhere)
    again = api.pretrain(str(first / "runs" / "x" / "config.yaml"))
    assert again["already_finished"] and again["run_dir"] == str(first / "runs" / "x")
    assert not list(elsewhere.iterdir())
