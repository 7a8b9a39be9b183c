"""The benchmark scripts' own arguments: a malformed one is a one-line usage error, and nothing is run or written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune_recipes.py"


@pytest.mark.parametrize("configs, message", [
    (["noColon"], "is not NAME: OPTIONS"),
    ([": --pool tokens"], "is not NAME: OPTIONS"),
    (["../escape: --pool tokens"], "must be letters, digits"),
    (["a: --pool 'tokens"], "cannot be split like a shell line"),
    (["a: --pool tokens", "a: --pool mean"], "configuration names must differ"),
])
def test_finetune_recipes_rejects_malformed_configs(tmp_path, configs, message):
    work = tmp_path / "work"
    arguments = [argument for config in configs for argument in ("--config", config)]
    completed = subprocess.run([sys.executable, str(SCRIPT), "--work", str(work), "--results", str(tmp_path / "r"),
                                *arguments], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2
    assert message in completed.stderr and "Traceback" not in completed.stderr
    assert not work.exists() and not (tmp_path / "r").exists()    # nothing was fine-tuned or tabulated


def test_finetune_recipes_refuses_a_name_reused_with_other_options(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    done = {"name": "a", "options": "--pool tokens", "run": "runs/demo-mae"}
    (work / "a.json").write_text(json.dumps(done))
    completed = subprocess.run([sys.executable, str(SCRIPT), "--work", str(work), "--results", str(tmp_path / "r"),
                                "--config", "a: --pool mean"], capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert "was run before with --run runs/demo-mae and options '--pool tokens'" in completed.stderr
    assert json.loads((work / "a.json").read_text()) == done                  # the earlier result is untouched


def test_flip_tta_refuses_a_directory_that_is_not_a_finetuning_in_one_line(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "flip_tta.py"
    completed = subprocess.run([sys.executable, str(script), str(tmp_path / "missing"), "--results", str(tmp_path / "r")],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1 and "flip_tta.py: error:" in completed.stderr
    assert not (tmp_path / "r").exists()
