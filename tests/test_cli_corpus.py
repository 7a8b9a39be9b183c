"""Zero tracebacks: a corpus of bad invocations through the real CLI, each in its own process.

For every case: exit code 2, exactly one line on stderr starting ``leanmim: error:`` (library warnings
aside), no "Traceback", and every file that existed before byte-identical afterwards, with no file or
directory added (a failed start leaves nothing behind).

Most cases run in a process forked from one that has already imported leanmim, torch and Lightning
(``cli.main`` is the console script's entry point; fork keeps each case isolated and the corpus fast);
a few run as ``python -m leanmim`` to cover the real entry point end to end.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_run_config
from leanmim.train.pretrain import pretrain

TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
        "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2", "--precision", "32",
        "--no-progress-bar", "--accelerator", "cpu"]


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha1 of the content ('dir' for directories) of everything under ``root``."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        state[key] = "dir" if path.is_dir() else hashlib.sha1(path.read_bytes()).hexdigest()
    return state


def _child(argv: list[str], err_path: str, cwd: str) -> None:
    os.chdir(cwd)
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    from leanmim.cli import main

    code = main(argv)
    sys.stderr.flush()
    os._exit(code)


def run_forked(argv: list[str], workdir: Path, err_path: Path) -> tuple[int, str]:
    process = multiprocessing.get_context("fork").Process(target=_child, args=(argv, str(err_path), str(workdir)))
    process.start()
    process.join(120)
    return process.exitcode, err_path.read_text()


def run_subprocess(argv: list[str], workdir: Path) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "leanmim", *argv], cwd=workdir, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result.returncode, result.stderr


@pytest.fixture(scope="module")
def workspace(tiny_data, tmp_path_factory):
    """A directory with a trained run, a user's files, and crafted bad checkpoints."""
    root = tmp_path_factory.mktemp("corpus")
    run = root / "run"
    pretrain(tiny_run_config(tiny_data, run, max_steps=2))
    (root / "user").mkdir()
    (root / "user" / "config.yaml").write_text("my: own file\n")
    (root / "user" / "summary.json").write_text('{"mine": true}\n')
    (root / "notes.txt").write_text("a user's file\n")
    (root / "existing.safetensors").write_bytes(b"user bytes")
    (root / "existing.png").write_bytes(b"user picture")
    (root / "emptydir").mkdir()
    (root / "bad.yaml").write_text("train: [unclosed\n")
    (root / "unknown.yaml").write_text("train: {epochs: 2, speed: 9}\n")
    images = root / "images"
    images.mkdir()
    from PIL import Image
    for index in range(4):
        Image.new("L", (16, 16), color=index * 40).save(images / f"{index}.png")
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save({"leanmim": {"config": {"method": "mae"}}, "state_dict": {}}, root / "incomplete.ckpt")
    torch.save({"leanmim": {"config": checkpoint["leanmim"]["config"]},
                "state_dict": {"method.encoder.cls_token": torch.zeros(3)}}, root / "wrong_shapes.ckpt")
    torch.save({"weight": torch.zeros(2)}, root / "plain_state_dict.pt")
    (root / "truncated.ckpt").write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    torch.save({"leanmim": {"config": {}}, "state_dict": {}, "evil": Path("/")}, root / "objects.ckpt")
    (root / "text.ckpt").write_text("not a checkpoint")
    return root


def corpus(data: str) -> list[tuple[list[str], str]]:
    """(argv, a fragment the error line must contain); paths are relative to the workspace."""
    pre = ["pretrain", "--data", data, "--out", "new", *TINY, "--max-steps", "1"]
    probe = ["probe", "run", "--linear-epochs", "1"]
    return [
        # pretrain: ranges as typed
        ([*pre, "--lr", "-1"], "lr must be a finite number >= 0, got -1.0"),
        ([*pre, "--base-lr", "-0.1"], "base_lr must be a finite number >= 0, got -0.1"),
        ([*pre, "--lr", "nan"], "lr must be a finite number"),
        ([*pre, "--beta1", "1.5"], "beta1 must lie in [0, 1)"),
        ([*pre, "--beta2", "-0.1"], "beta2 must lie in [0, 1)"),
        (["pretrain", "--data", data, "--out", "new", *TINY, "--epochs", "-3"], "epochs must be at least 1"),
        ([*pre, "--max-steps", "0"], "max_steps must be positive"),
        ([*pre, "--accelerator", "gpu"], "no GPU is visible"),
        ([*pre, "--accelerator", "quantum"], "accelerator 'quantum'"),
        ([*pre, "--devices", "0"], "devices must be a positive number"),
        ([*pre, "--num-workers", "-1"], "num_workers must be 0"),
        ([*pre, "--crop-min-scale", "0"], "crop_min_scale must lie in (0, 1]"),
        ([*pre, "--crop-min-scale", "1.5"], "crop_min_scale must lie in (0, 1]"),
        ([*pre, "--warmup-fraction", "2"], "warmup_fraction must lie in [0, 1]"),
        ([*pre, "--weight-decay", "-1"], "weight_decay must be a finite number >= 0"),
        ([*pre, "--grad-clip", "0"], "grad_clip must be positive"),
        ([*pre, "--img-size", "4", "--patch-size", "4"], "single patch"),
        ([*pre, "--img-size", "18"], "not divisible by patch size"),
        ([*pre, "--batch-size", "0"], "batch_size and accumulate_grad_batches must be at least 1"),
        ([*pre, "--batch-size", "1.5"], "expected int"),
        ([*pre, "--in-chans", "2"], "in_chans must be 1 or 3"),
        ([*pre, "--drop-path", "1.5"], "drop_path must lie in [0, 1)"),
        ([*pre, "--keep-checkpoints", "-5"], "keep_checkpoints"),
        ([*pre, "--checkpoint-every-steps", "-1"], "checkpoint_every_steps"),
        ([*pre, "--method", "simclr"], "unknown method 'simclr'"),
        ([*pre, "--model", "vit_gigantic"], "unknown model 'vit_gigantic'"),
        ([*pre, "--precision", "fp8"], "'fp8' is not one of auto, bf16, 32"),
        ([*pre, "--mask-ratio", "1.5"], "mask_ratio must lie strictly between 0 and 1"),
        ([*pre, "--window-size", "3"], "not an option of method 'mae'"),
        (["pretrain", "--data", "missing_dir", "--out", "new", *TINY], "does not exist"),
        (["pretrain", "--data", "emptydir", "--out", "new", *TINY], "no"),
        (["pretrain", "--config", "missing.yaml"], "does not exist"),
        (["pretrain", "--config", "bad.yaml"], "not valid YAML"),
        (["pretrain", "--config", "unknown.yaml"], "unknown option(s) speed"),
        # pretrain: where it writes
        (["pretrain", "--data", data, "--out", "notes.txt", *TINY, "--max-steps", "1"], "is a file"),
        (["pretrain", "--data", data, "--out", "user", *TINY, "--max-steps", "1"], "is not empty and is not a leanmim"),
        (["pretrain", "--config", "run/config.yaml", "--seed", "1"], "(train.seed: 0 -> 1)"),
        (["pretrain", "--config", "run/config.yaml", "--embed-dim", "64"], "model.embed_dim: 32 -> 64"),
        (["pretrain", "--config", "run/config.yaml", "--data", "images"], "data.fingerprint: 4 files"),
        (["pretrain", "--config", "run/config.yaml", "--batch-size", "16"],
         "train.batch_size: 32 -> 16; train.global_batch_size: 32 -> 16"),
        (["pretrain", "--config", "run/config.yaml", "--max-steps", "5"], "add --extend"),
        (["pretrain", "--config", "run/config.yaml", "--max-steps", "1", "--extend"], "only lengthens"),
        (["pretrain", "--config", "run/config.yaml", "--max-steps", "5", "--seed", "3", "--extend"], "train.seed"),
        # export
        (["export", "run", "--out", "user"], "exists and is not empty: pass --overwrite"),
        (["export", "run", "--out", "notes.txt"], "is a file"),
        (["export", "run", "--out", "run/checkpoints/exported"], "inside a run's checkpoints/"),
        (["export", "run", "--out", "x.safetensors", "--format", "onnx"], "invalid choice"),
        (["export", "run", "--out", "existing.safetensors"], "already exists: pass --overwrite"),
        (["export", "run", "--out", "run/checkpoints/encoder.safetensors"], "inside a run's checkpoints/"),
        (["export", "no_such_run", "--out", "e.safetensors"], "does not exist"),
        (["export", "emptydir", "--out", "e.safetensors"], "holds no readable checkpoint"),
        (["export", "incomplete.ckpt", "--out", "e.safetensors"], "without a complete run config"),
        (["export", "wrong_shapes.ckpt", "--out", "e.safetensors"], "does not fit"),
        (["export", "plain_state_dict.pt", "--out", "e.safetensors"], "is not a leanmim checkpoint"),
        (["export", "truncated.ckpt", "--out", "e.safetensors"], "truncated or corrupt"),
        (["export", "objects.ckpt", "--out", "e.safetensors"], "refused to read"),
        (["export", "text.ckpt", "--out", "e.safetensors"], "truncated or corrupt"),
        # reconstruct
        (["reconstruct", "run", "--out", "picture.txt"], "must end in .png"),
        (["reconstruct", "run", "--out", "r.png", "--num-images", "0"], "--num-images must lie between 1"),
        (["reconstruct", "run", "--out", "r.png", "--num-images", "-3"], "--num-images must lie between 1"),
        (["reconstruct", "run", "--out", "existing.png"], "already exists"),
        (["reconstruct", "run", "--out", "emptydir"], "is a directory"),
        # probe
        ([*probe, "--k", "100000"], "larger than the"),
        ([*probe, "--k", "0"], "--k must be at least 1"),
        ([*probe, "--temperature", "0"], "--temperature must be positive"),
        ([*probe, "--linear-epochs", "-1"], "--linear-epochs must be 0"),
        (["probe"], "needs a run directory"),
        # finetune
        (["finetune", "run", "--out", "notes.txt", "--epochs", "1"], "is a file"),
        (["finetune", "run", "--out", "user", "--epochs", "1"], "is not empty and is not a leanmim"),
        (["finetune", "run", "--epochs", "-3"], "epochs"),
        # bench, cost, top level
        (["bench", "--methods", "mae", "--model", "vit_tiny_patch16", "--img-size", "16", "--patch-size", "4",
          "--steps", "1", "--out", "existing.png"], "already exists"),
        (["bench", "--steps", "0", "--model", "vit_tiny_patch16", "--img-size", "16", "--patch-size", "4"],
         "--steps >= 1"),
        (["cost", "--method", "nosuch"], "unknown method"),
        (["cost", "--option", "novalue"], "expects NAME=VALUE"),
        # checked when the method is built: still before anything is written
        ([*pre, "--batch-size", "8", "--method", "lomar", "--window-size", "5"], "window_size 5 does not fit the 4×4"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ]


SUBPROCESS_CASES = {0, 34, 41}  # a few through ``python -m leanmim`` itself


def test_bad_invocation_corpus(workspace, tiny_data, single_thread):
    cases = corpus(str(tiny_data))
    assert len(cases) >= 40
    errors_dir = workspace.parent / "stderr"
    errors_dir.mkdir(exist_ok=True)
    before = snapshot(workspace)
    failures = []
    for number, (argv, fragment) in enumerate(cases):
        if number in SUBPROCESS_CASES:
            code, err = run_subprocess(argv, workspace)
        else:
            code, err = run_forked(argv, workspace, errors_dir / f"{number}.txt")
        lines = [line for line in err.splitlines() if line.startswith("leanmim")]
        problems = []
        if code != 2:
            problems.append(f"exit {code}")
        if len(lines) != 1 or not lines[0].startswith("leanmim: error: "):
            problems.append(f"stderr lines {lines}")
        elif fragment not in lines[0]:
            problems.append(f"'{fragment}' not in '{lines[0]}'")
        if "Traceback" in err:
            problems.append("traceback")
        after = snapshot(workspace)
        if after != before:
            changed = sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))
            problems.append(f"files changed: {changed[:5]}")
            before = after
        if problems:
            failures.append(f"{' '.join(argv)} -> {'; '.join(problems)}")
    assert not failures, "\n".join(failures)
