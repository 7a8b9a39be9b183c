"""The command line: the contract other work relies on, and one-line errors for bad input."""

import json
import os
from pathlib import Path

import pytest
import timm
import torch
import yaml

from conftest import tiny_run_config
from leanmim.weights import load_run
from leanmim.cli import main
from leanmim.train.pretrain import pretrain

TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
        "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2", "--precision", "32",
        "--no-progress-bar"]


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    pretrain(tiny_run_config(tiny_data, run, epochs=3))
    return run


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(capsys, args, fragment):
    code, out, err = run_cli(capsys, *args)
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.startswith("leanmim")]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err


def test_bad_inputs_get_one_line_errors(capsys, tiny_data, trained_run, tmp_path):
    pre = ["pretrain", "--data", tiny_data, "--out", tmp_path / "x", *TINY, "--max-steps", "1"]
    assert_one_line_error(capsys, ["pretrain", "--data", tmp_path / "missing", *TINY], "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(capsys, ["pretrain", "--data", empty, *TINY], "no")
    assert_one_line_error(capsys, [*pre, "--method", "simclr"], "unknown method 'simclr'")
    assert_one_line_error(capsys, [*pre, "--model", "vit_gigantic"], "unknown model 'vit_gigantic'")
    assert_one_line_error(capsys, [*pre, "--frobnicate", "3"], "unrecognized arguments: --frobnicate")
    assert_one_line_error(capsys, [*pre, "--mask-ratio", "1.0"], "mask_ratio must lie strictly between 0 and 1")
    assert_one_line_error(capsys, [*pre, "--mask-ratio", "0"], "mask_ratio")
    assert_one_line_error(capsys, [*pre, "--img-size", "18"], "not divisible by patch size")
    assert_one_line_error(capsys, [*pre, "--batch-size", "lots"], "expected int")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {name: vit_tiny_patch16\ntrain: [")
    assert_one_line_error(capsys, ["pretrain", "--config", bad_yaml], "not valid YAML")
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("train: {epochs: 2, learning_speed: 9}\n")
    assert_one_line_error(capsys, ["pretrain", "--config", unknown_key], "unknown option(s) learning_speed")
    # a run directory of another model or method
    assert_one_line_error(capsys, ["pretrain", "--data", tiny_data, "--out", trained_run, *TINY, "--depth", "3"],
                          "holds a different pretrain run (model.depth: 2 -> 3;")
    not_a_checkpoint = tmp_path / "junk.ckpt"
    not_a_checkpoint.write_bytes(b"not a checkpoint")
    assert_one_line_error(capsys, ["export", not_a_checkpoint, "--out", tmp_path / "e.safetensors"],
                          "is truncated or corrupt")
    assert_one_line_error(capsys, ["export", tmp_path, "--out", tmp_path / "e.safetensors"], "holds no readable checkpoint")


def test_written_config_feeds_back(capsys, trained_run, tmp_path):
    written = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert written["model"]["img_size"] == 16 and written["options"]["mask_ratio"] == 0.75
    code, out, err = run_cli(capsys, "pretrain", "--config", trained_run / "config.yaml", "--out", tmp_path / "again",
                             "--max-steps", "2", "--json")
    assert code == 0, err
    summary = json.loads(out[out.index("{"):])
    assert summary["global_step"] == 2 and summary["model"] == "vit_tiny_patch16"
    again = yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())
    assert again["model"] == written["model"] and again["options"] == written["options"]


def test_export_loads_into_timm_with_same_features(capsys, trained_run, tmp_path):
    out = tmp_path / "encoder.safetensors"
    code, _, err = run_cli(capsys, "export", trained_run, "--out", out)
    assert code == 0, err
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a plain file's permissions (safetensors alone gives 0600)
    assert not list(tmp_path.glob(".*tmp*"))
    loaded = load_run(trained_run)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=5, img_size=16, patch_size=4,
                              in_chans=1, embed_dim=32, depth=2, num_heads=2,
                              pretrained_cfg_overlay=dict(file=str(out))).eval()
    images = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        ours = loaded.method.encoder.forward_features(images)
        theirs = model.forward_features(images)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # strict load: only the classifier head is absent from the file
    from safetensors.torch import load_file
    missing, unexpected = model.load_state_dict(load_file(str(out)), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []


def test_probe_reconstruct_cost_methods(capsys, trained_run, tmp_path):
    code, out, err = run_cli(capsys, "probe", trained_run, "--json", "--linear-epochs", "20")
    assert code == 0, err
    report = json.loads(out)
    assert 0.5 < report["knn_top1"] <= 1 and 0.5 < report["linear_top1"] <= 1   # two easy classes
    assert report["saved_to"].startswith(str(trained_run / "probes" / "encoder-mean-step12-"))
    assert json.loads(Path(report["saved_to"]).read_text())["knn_top1"] == report["knn_top1"]
    # another setting gets its own file: results never overwrite each other
    code, out, _ = run_cli(capsys, "probe", trained_run, "--json", "--linear-epochs", "5", "--k", "5")
    assert code == 0 and json.loads(out)["saved_to"] != report["saved_to"]
    assert len(json.loads((trained_run / "summary.json").read_text())["probes"]) == 2

    picture = tmp_path / "recon.png"
    code, _, err = run_cli(capsys, "reconstruct", trained_run, "--out", picture, "--num-images", "3")
    assert code == 0 and picture.stat().st_size > 1000, err

    code, out, _ = run_cli(capsys, "cost", "--method", "mae", "--model", "vit_tiny_patch16", "--img-size", "32",
                           "--patch-size", "8", "--json")
    cost = json.loads(out)
    assert {"encoder", "decoder", "total", "train_step"} <= set(cost["macs"])
    assert cost["macs"]["encoder"] + cost["macs"]["decoder"] == cost["macs"]["total"]
    code, out, _ = run_cli(capsys, "cost", "--model", "vit_tiny_patch16", "--img-size", "32", "--patch-size", "8",
                           "--inference", "--json")
    assert set(json.loads(out)["macs"]) == {"encoder"}

    code, out, _ = run_cli(capsys, "methods")
    assert code == 0 and "mae" in out and "--mask-ratio" in out


def test_pretrain_help_shows_each_methods_own_default(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "[default per method: ddae True, mae False, prmim False]" in text  # --dynamic-weighting
    assert "ddae 0.75, lomar 0.8, mae 0.75" in text  # --mask-ratio differs for LoMaR
    assert "[default: 1.0 (ddae, mae, prmim)]" in text  # --beta-end: shared default, not every method takes it
