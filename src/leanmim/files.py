"""How leanmim names and writes files: atomic writes, a run directory's file names, strict JSON.

Every file leanmim writes goes to a hidden temporary beside its target (``.NAME.tmp-PID``) and is renamed into
place, so a kill mid-write leaves the previous file intact; a later start removes temporaries whose writer is
gone. Stdlib only, imports nothing of leanmim: everything else may import it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
TMP_MARKER = ".tmp-"  # temporary files: ``.NAME.tmp-PID`` next to their target


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object written by leanmim (summary.json, finetune.json, …), or {} when missing, damaged or not an object:
    for tools that only report (status, model cards) and must never fail on a half-written file."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def dumps_strict(values: Any) -> str:
    """JSON with NaN/inf written as null (strict JSON; Python's default writes NaN)."""
    return json.dumps(_finite(values), indent=2, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: beside it (same filesystem), hidden."""
    return path.with_name(f".{path.name}{TMP_MARKER}{os.getpid()}")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    publish(tmp, path)


def publish(tmp: Path, path: Path) -> None:
    """Rename a finished temporary file into place with the permissions a plain ``open`` would give it
    (some writers, e.g. safetensors, create their files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete ``.NAME.tmp-PID`` files a killed write left behind in ``directory`` (those of this process, or of a
    PID no longer alive on this host; a live writer's are left alone); returns them."""
    removed = []
    if directory.is_dir():
        for candidate in directory.glob(f".*{TMP_MARKER}*"):
            if candidate.is_file() and not candidate.is_symlink() and not _writer_alive(candidate):
                candidate.unlink(missing_ok=True)
                removed.append(candidate)
    return removed


def _writer_alive(temporary: Path) -> bool:
    """Whether the process named by a ``.NAME.tmp-PID`` file's PID still runs (and is not this one)."""
    pid_text = temporary.name.rsplit(TMP_MARKER, 1)[-1]
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


LAST_CHECKPOINT = "last.ckpt"


RESULTS_FILE = "finetune.json"
BEST_CHECKPOINT = "best.ckpt"
