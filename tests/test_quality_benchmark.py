"""benchmarks/quality.py end to end on a tiny model and a Fashion-MNIST subset: it plans, pretrains, probes and
tabulates; a rerun reuses every finished run; LoMaR keeps its 7 × 7 windows on a 14 × 14 grid."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"

TINY = """\
method: mae
model:
  name: vit_tiny_patch16
  img_size: 28
  patch_size: 4
  in_chans: 1
  embed_dim: 32
  depth: 2
  num_heads: 2
  decoder_embed_dim: 16
  decoder_depth: 1
  decoder_num_heads: 2
data:
  path: fashion-mnist
train:
  epochs: 1
  batch_size: 64
  base_lr: 1.5e-3
  precision: "32"
"""


def quality(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    return subprocess.run([sys.executable, str(SCRIPT), "--config", str(config), "--minutes", "0.002",
                           "--calibration-steps", "3", "--seeds", "0", "--subset", "512,128", "--finetune-epochs", "0",
                           "--linear-epochs", "2", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "r"),
                           *extra], capture_output=True, text=True, timeout=300)


def test_quality_runs_plans_and_resumes_on_a_14x14_grid(tmp_path):
    first = quality(tmp_path, "--methods", "mae,lomar", "--patch-size", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    report = json.loads((tmp_path / "r" / "quality.json").read_text())
    assert report["grid"] == "14x14" and report["recipe"]["model"]["patch_size"] == 2
    assert report["method_options"]["lomar"] == {}                 # the method's default 7 × 7 windows
    for method in ("mae", "lomar"):
        method_dir = tmp_path / "work" / "seed0" / method
        plan = json.loads((method_dir / "plan.json").read_text())
        (run,) = report["per_seed"][method]
        assert run["steps"] == plan["max_steps"] >= 1               # trained exactly the planned steps
        assert run["images_seen"] == run["steps"] * 64
        assert 0.0 <= run["knn_top1"] <= 1.0 and 0.0 <= run["linear_top1"] <= 1.0
        assert (method_dir / "run" / "run.json").is_file()           # the engine's own run, beside the plan
        assert not (method_dir / "calibration").exists()              # the calibration run is thrown away
    assert "| lomar | 1 |" in (tmp_path / "r" / "quality.md").read_text()
    assert (tmp_path / "r" / "quality_pareto.png").is_file()

    again = quality(tmp_path, "--methods", "mae,lomar", "--patch-size", "2")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "mae seed 0: done before" in again.stderr and "lomar seed 0: done before" in again.stderr
    assert "max_steps" not in again.stderr                            # nothing pretrained twice
    assert json.loads((tmp_path / "r" / "quality.json").read_text())["per_seed"] == report["per_seed"]


def test_quality_keeps_the_small_lomar_window_on_the_7x7_grid():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import quality
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert quality.method_options("lomar", 7) == ("lomar", {"window_size": 5})
    assert quality.method_options("lomar", 14) == ("lomar", {})
    assert quality.method_options("prmim-plain", 14)[0] == "prmim"


@pytest.mark.parametrize("extra, message", [
    (["--patch-size", "3"], "--patch-size 3 does not divide the 28 px images"),
    (["--calibration-steps", "2"], "--calibration-steps must be at least 3"),
])
def test_quality_refuses_bad_arguments_in_one_line_before_writing(tmp_path, extra, message):
    completed = quality(tmp_path, "--methods", "mae", *extra)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert message in completed.stderr
    assert not (tmp_path / "work" / "seed0").exists() and not (tmp_path / "r").exists()
