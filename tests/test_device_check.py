"""benchmarks/device_check.py --smoke: every part of the prepared GPU check runs on the CPU at tiny sizes."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


def test_device_check_smoke_runs_every_part(tmp_path):
    out = tmp_path / "out"
    completed = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--work", str(tmp_path / "w")],
                               capture_output=True, text=True, timeout=240)
    report = json.loads((out / "device_check.json").read_text())
    assert completed.returncode == 0, report["errors"]
    assert report["ceiling"]["flops"] > 0
    assert {row["method"] for row in report["steps"]["rows"]} == {"mae", "pcae", "prmim", "lomar", "ddae"}
    assert all(row["images_per_second"] > 0 and row["train_macs_per_image"] > 0 for row in report["steps"]["rows"])
    cli = report["cli"]
    assert cli["sigterm_exit_143"] and cli["saved_step"] > 0 and cli["resumed_from_saved_step"]
    assert cli["step_after_resume"] > cli["saved_step"]
    assert 0 <= report["probe"]["knn_top1"] <= 1 and report["finetune"]["epochs"] == 1
    assert [row["method"] for row in report["quality"]["rows"]] == ["mae", "lomar"]
    assert "| mae |" in (out / "device_check.md").read_text()


def test_device_check_rejects_a_bad_time_budget(tmp_path):
    completed = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--minutes", "0", "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and "--minutes must be a positive number" in completed.stderr
    assert "Traceback" not in completed.stderr
