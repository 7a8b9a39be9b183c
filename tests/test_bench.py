"""``leanmim bench``: every registered method measured side by side, relative to MAE."""

import json
import statistics

import pytest
import torch

from leanmim import api
from leanmim.eval.bench import format_bench_table, resolve_methods
from leanmim.cli import main
from leanmim.config import ConfigError
from leanmim.methods import METHODS

# 28 px / patch 4: a 7×7 grid, where every method's default options fit.
TINY = dict(model="vit_tiny_patch16", img_size=28, patch_size=4, in_chans=1,
            model_overrides=dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                                 decoder_num_heads=2))
TINY_FLAGS = ["--img-size", "28", "--patch-size", "4", "--in-chans", "1", "--precision", "32", "--steps", "1",
              "--warmup-steps", "0", "--batch-size", "2"]


pytestmark = pytest.mark.usefixtures("single_thread")


def test_bench_measures_every_registered_method(tmp_path):
    result = api.bench(None, steps=3, warmup_steps=1, batch_size=4, precision="32", plot=tmp_path / "bench.png", **TINY)
    assert list(result["methods"]) == ["mae", *sorted(set(METHODS) - {"mae"})]
    for name, entry in result["methods"].items():
        assert entry["train_macs"] > entry["forward_macs"] > 0, name          # backward costs more than nothing
        assert entry["peak_mem_bytes"] > 0 and entry["img_per_s"] > 0, name
        assert len(entry["step_seconds"]) == 3
        assert entry["img_per_s"] == pytest.approx(4 / statistics.median(entry["step_seconds"]))
        for key, ratio in entry["ratio_to_mae"].items():
            assert ratio == pytest.approx(entry[key] / result["methods"]["mae"][key]), (name, key)
    assert result["methods"]["mae"]["ratio_to_mae"] == {"train_macs": 1.0, "img_per_s": 1.0, "peak_mem_bytes": 1.0}
    mae_cost = api.cost("mae", TINY["model"], 28, 4, 1, model_overrides=TINY["model_overrides"])
    assert result["methods"]["mae"]["forward_macs"] == mae_cost["macs"]["total"]
    assert result["machine"]["precision"] == "32-true" and result["machine"]["torch"] == torch.__version__
    assert result["machine"]["threads"] >= 1 and result["machine"]["cpu"]
    json.dumps(result)
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_bench_table(result)
    assert all(name in table for name in METHODS)


def test_cli_bench_json_and_errors(capsys, tmp_path):
    other = sorted(set(METHODS) - {"mae"})[0]
    code = main(["bench", "--methods", other, "--config", str(write_tiny_config(tmp_path)), *TINY_FLAGS, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out[captured.out.index("{"):])
    assert list(result["methods"]) == ["mae", other]          # MAE is always the reference
    for entry in result["methods"].values():
        assert set(entry) >= {"forward_macs", "train_macs", "img_per_s", "peak_mem_bytes", "ratio_to_mae"}
        assert set(entry["ratio_to_mae"]) == {"train_macs", "img_per_s", "peak_mem_bytes"}
    assert result["setup"]["embed_dim"] == 32 and result["setup"]["img_size"] == 28
    for args, fragment in [(["bench", "--methods", "mae,simclr"], "unknown method 'simclr'"),
                           (["bench", "--option", "lomar.window_size"], "METHOD.NAME=VALUE")]:
        assert main(args) == 2
        err = capsys.readouterr().err
        line = [text for text in err.splitlines() if text.startswith("leanmim")]
        assert len(line) == 1 and fragment in line[0], err


def test_unknown_methods_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown method 'byol'"):
        resolve_methods(["mae", "byol"])
    assert resolve_methods(["mae", "mae"]) == ["mae"]
    with pytest.raises(ConfigError, match="not benchmarked"):
        api.bench("mae", options={"lomar": {"window_size": 3}}, **TINY)


def write_tiny_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("model: {name: vit_tiny_patch16, embed_dim: 32, depth: 2, num_heads: 2, decoder_embed_dim: 32, "
                    "decoder_depth: 1, decoder_num_heads: 2}\n")
    return path
