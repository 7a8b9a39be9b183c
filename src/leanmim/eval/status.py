"""``leanmim status RUN`` and ``leanmim runs DIR``: where a run stands, read from its files alone.

A run directory (pretraining or fine-tuning) holds ``run.json`` (kind and identity), ``checkpoints/`` (the
step reached and the schedule's length), ``summary.json`` (its ``progress`` entry is written by the
run's :class:`leanmim.train.loggers.ProgressLogger` when the run starts and at every logging step: process id, host,
step, last loss, throughput, state) and, for a fine-tuning, ``finetune.json``.

State: ``finished`` (the newest checkpoint ends the schedule; a fine-tuning: its test split was evaluated),
``running`` (the progress entry says running and its process is alive on this host), else ``interrupted``
(stopped, killed or failed before the end: rerun the same command to resume), or ``new`` (nothing trained yet).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..files import CHECKPOINT_DIR, RUN_FILE, read_json_object


def process_alive(pid: Any, host: Any) -> bool:
    """Whether process ``pid`` runs on this host (a run on another host counts as alive: it cannot be checked)."""
    if not isinstance(pid, int):
        return False
    if host and host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def checkpoint_facts(directory: Path) -> dict[str, Any]:
    """Step, epoch and schedule length of the newest checkpoint, plus the checkpoint files (memory-mapped reads)."""
    import torch

    from ..weights import newest_checkpoint

    newest = newest_checkpoint(directory / CHECKPOINT_DIR, warn=False)
    facts: dict[str, Any] = {"last_checkpoint": str(newest) if newest else None}
    best = directory / CHECKPOINT_DIR / "best.ckpt"
    facts["best_checkpoint"] = str(best) if best.is_file() else None
    if newest is not None:
        checkpoint = torch.load(newest, map_location="cpu", weights_only=True, mmap=True)
        entry = checkpoint.get("leanmim", {})
        facts.update(step=int(checkpoint.get("global_step", 0)), epoch=int(checkpoint.get("epoch", 0)),
                     total_steps=entry.get("total_steps") or entry.get("finetune", {}).get("total_steps"),
                     method=entry.get("config", {}).get("method"))
    return facts


def last_logged(directory: Path) -> dict[str, Any]:
    """The last loss (and img/s) in the run's CSV log, ``logs/metrics.csv`` (or older ``logs/version_N``)."""
    import csv

    files = sorted((directory / "logs").glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    found: dict[str, Any] = {}
    if files:
        with open(files[-1], newline="") as handle:
            for row in csv.DictReader(handle):
                for key in ("loss_step", "loss", "img_per_s"):
                    if row.get(key):
                        found[key.replace("_step", "")] = float(row[key])
    return found


def run_status(run: str | Path) -> dict[str, Any]:
    """One run's status (see the module docstring)."""
    directory = Path(run)
    if not directory.is_dir() or not ((directory / RUN_FILE).is_file() or (directory / CHECKPOINT_DIR).is_dir()):
        raise ConfigError(f"'{run}' is not a leanmim run directory (no {RUN_FILE} or {CHECKPOINT_DIR}/): pass the "
                          f"--out of a 'leanmim pretrain' or 'leanmim finetune'")
    record, summary = read_json_object(directory / RUN_FILE), read_json_object(directory / "summary.json")
    progress = summary.get("progress", {})
    kind = record.get("kind") or ("finetune" if (directory / "finetune.json").is_file() else "pretrain")
    status: dict[str, Any] = {"run": str(directory), "kind": kind, **checkpoint_facts(directory)}
    status["method"] = status.get("method") or record.get("identity", {}).get("method") or summary.get("method")
    total = status.get("total_steps") or progress.get("total_steps") or summary.get("total_steps")
    step = max(status.get("step") or 0, progress.get("step") or 0)
    status.update(step=step, total_steps=total, epoch=progress.get("epoch", status.get("epoch")))
    logged = last_logged(directory)
    status["last_loss"] = progress.get("loss", logged.get("loss"))
    status["images_per_second"] = progress.get("images_per_second") or summary.get("images_per_second") \
        or logged.get("img_per_s")
    steps_per_second = progress.get("steps_per_second")
    if kind == "finetune":
        results = read_json_object(directory / "finetune.json")
        finished = results.get("selected_test_top1") is not None
        status.update(selected_epoch=results.get("selected_epoch"), selected_val_top1=results.get("selected_val_top1"),
                      selected_test_top1=results.get("selected_test_top1"), source=results.get("source"))
    else:
        finished = bool(total) and step >= total
    if finished:
        state = "finished"
    elif progress.get("state") == "running" and process_alive(progress.get("pid"), progress.get("host")):
        state = "running"
    elif status.get("last_checkpoint") or step:
        state = "interrupted"
    else:
        state = "new"
    status["state"], status["finished"] = state, finished
    status["eta_seconds"] = (round((total - step) / steps_per_second) if state == "running" and total and
                             steps_per_second else None)
    status["updated_at"] = progress.get("updated_at")
    status["probes"] = sorted(str(p) for p in (directory / "probes").glob("*.json"))
    status["finetunings"] = [str(p.parent) for p in sorted(directory.parent.glob("**/finetune.json"))
                             if Path(read_json_object(p).get("source", "/nonexistent")).parent.parent.resolve() == directory.resolve()]
    return status


def find_runs(directory: str | Path) -> list[dict[str, Any]]:
    """The status of every run directory below ``directory`` (itself included), sorted by path."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"'{directory}' is not a directory: pass a directory that holds runs (e.g. runs/)")
    found = sorted({path.parent for path in root.glob(f"**/{RUN_FILE}")} |
                   {path.parent.parent for path in root.glob(f"**/{CHECKPOINT_DIR}/last.ckpt")})
    return [run_status(path) for path in found]


def format_status(status: dict[str, Any]) -> str:
    """One line: ``runs/mae  pretrain mae  running  step 120/1638 (epoch 2)  loss 0.412  850 img/s  ETA 3m``."""
    def eta(seconds):
        return "" if seconds is None else f"  ETA {seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 \
            else f"  ETA {max(1, seconds // 60)}m"

    loss = f"  loss {status['last_loss']:.4f}" if isinstance(status.get("last_loss"), (int, float)) else ""
    speed = f"  {status['images_per_second']:.0f} img/s" if status.get("images_per_second") else ""
    test = f"  test top-1 {100 * status['selected_test_top1']:.2f}%" if status.get("selected_test_top1") else ""
    return (f"{status['run']}  {status['kind']} {status.get('method') or '?'}  {status['state']}  step "
            f"{status['step']}/{status.get('total_steps') or '?'} (epoch {status.get('epoch')}){loss}{speed}"
            f"{eta(status.get('eta_seconds'))}{test}")
