"""A run directory's identity: resume exactly the same run or refuse and say what differs; never overwrite.

A run directory holds ``run.json``: everything that defines the run (its *identity*: method, model,
method options, a fingerprint of the data, seed, batch sizes, schedule, optimiser, precision), plus
facts that do not (where the data lay, the world size). Rerunning a command with the same identity
resumes; any difference in the identity refuses with one line naming every differing field as
``field: old -> new``. ``--extend`` is the one deliberate way to change a run: it allows a longer
schedule (more epochs / steps) and nothing else.

Used by ``pretrain`` and ``finetune`` alike; the output-file guard by ``export``, ``reconstruct``,
``bench`` and ``probe``.

Stdlib only (no torch): the CLI imports it to validate before anything heavy is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from stat import S_ISREG
from typing import Any, Iterable

from ..config import ConfigError
from ..files import CHECKPOINT_DIR, RUN_FILE, atomic_write_text, dumps_strict, read_json_object, remove_stale_temporaries
from .lock import LOCK_FILE

# Fields that change how a run is executed or reported, not what it computes.
OPERATIONAL_FIELDS = frozenset({
    "train.out", "train.accelerator", "train.devices", "train.num_nodes", "train.strategy", "train.compile",
    "train.checkpoint_every_epochs", "train.checkpoint_every_steps", "train.keep_checkpoints", "train.extend",
    "train.log_every_steps", "train.progress_bar", "train.logger", "train.overwrite",
    "data.path", "data.max_memory_gb", "data.num_workers",
    # fine-tuning
    "out", "accelerator", "devices", "log_every_steps", "progress_bar", "data", "extend", "overwrite",
    "keep_checkpoints", "checkpoint_every_steps",
})
# Identity fields added after runs were first recorded, with the value every older run had in effect: a stored
# identity without one of them compares as this value, so older run directories still resume.
ADDED_FIELDS = {"eval_hflip": False, "model.decoder_drop_path": 0.0}
# Fields ``--extend`` may change (a longer schedule).
EXTENDABLE_FIELDS = frozenset({"train.epochs", "train.max_steps", "epochs", "max_steps"})


def data_fingerprint(path: str, exclude: Iterable[str | Path] = ()) -> str:
    """A cheap content fingerprint of a data source: ``"<N> files, <hash>"`` over sorted relative paths, sizes and
    modification times (``st_mtime_ns``) of the files the run reads.

    Fashion-MNIST: its idx files. A directory: every regular, non-hidden file below it (recursively, each real
    directory once, so symlink cycles end), except those under ``exclude`` (the run's own directory when
    ``--out`` lies inside ``--data``): a ``.DS_Store`` appearing or the run's own checkpoints change nothing, an
    image replaced by another of the same size changes the fingerprint (its mtime; contents are not hashed, which
    would read the whole data set at every start — copies that keep mtimes, ``cp -a`` / ``rsync -a``, still match).
    Anything else (e.g. a shard pattern or URL): the string itself, plus the sizes of the local files it names.
    """
    from ..data import FASHION_MNIST_ALIASES, FASHION_MNIST_DIR

    root = Path(FASHION_MNIST_DIR if str(path).lower() in FASHION_MNIST_ALIASES else path).expanduser()
    digest = hashlib.sha1()
    count = 0
    if root.is_dir():
        for relative, size, mtime in sorted(_walk_files(root, exclude)):
            digest.update(f"{relative}\0{size}\0{mtime}\n".encode())
            count += 1
    elif root.is_file():
        info = root.stat()
        digest.update(f"{root.name}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        count = 1
    else:
        digest.update(str(path).encode())
        for local in _expand_braces(str(path)):
            if os.path.isfile(local):
                digest.update(f"{os.path.basename(local)}\0{os.path.getsize(local)}\n".encode())
                count += 1
    return f"{count} files, {digest.hexdigest()[:16]}"


def _walk_files(root: Path, exclude: Iterable[str | Path] = ()) -> Iterable[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of every regular, non-hidden file below ``root``; each real directory is
    entered once (symlink cycles end), FIFOs and devices are never opened, ``exclude`` directories are skipped."""
    skip = {os.path.realpath(item) for item in exclude}
    seen: set[tuple[int, int]] = set()
    for directory, subdirs, files in os.walk(root, followlinks=True):
        try:
            info = os.stat(directory)
        except OSError:
            subdirs.clear()
            continue
        if (info.st_dev, info.st_ino) in seen or os.path.realpath(directory) in skip:
            subdirs.clear()
            continue
        seen.add((info.st_dev, info.st_ino))
        subdirs[:] = sorted(name for name in subdirs if not name.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            full = os.path.join(directory, name)
            try:
                stat = os.stat(full)
            except OSError:
                continue
            if S_ISREG(stat.st_mode):
                yield os.path.relpath(full, root), stat.st_size, stat.st_mtime_ns


def _expand_braces(pattern: str) -> list[str]:
    """``a{000..002}b`` -> [a000b, a001b, a002b] (one numeric range; enough to find local shard files)."""
    import re

    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    first, last = match.group(1), match.group(2)
    width = len(first)
    numbers = range(int(first), int(last) + 1)
    if len(numbers) > 100_000:
        return []
    return [pattern[:match.start()] + str(n).zfill(width) + pattern[match.end():] for n in numbers]


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (lists kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def identity_of(settings: dict[str, Any], derived: dict[str, Any]) -> dict[str, Any]:
    """The identity: every flattened setting that is not operational, plus ``derived`` facts (fingerprint, …)."""
    flat = {key: value for key, value in flatten(settings).items() if key not in OPERATIONAL_FIELDS}
    flat.update(derived)
    return dict(sorted(flat.items()))


def show(value: Any) -> str:
    return "none" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def identity_differences(old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """``["field: old -> new", …]`` for every field that differs (absent counts as none, except that a field of
    ``ADDED_FIELDS`` absent from ``old`` counts as its value there)."""
    skip = set(ignore)

    def before(key: str) -> Any:
        return old[key] if key in old else ADDED_FIELDS.get(key)

    return [f"{key}: {show(before(key))} -> {show(new.get(key))}"
            for key in sorted(set(old) | set(new)) if key not in skip and before(key) != new.get(key)]


def read_run_file(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"'{path}' is unreadable or not JSON: the run directory is damaged; "
                          f"choose another --out (or restore the file)") from None
    if not isinstance(record, dict) or not isinstance(record.get("identity"), dict):
        raise ConfigError(f"'{path}' is not a leanmim run record: choose another --out")
    return record


def is_leanmim_run(run_dir: Path) -> bool:
    return (run_dir / RUN_FILE).is_file() or ((run_dir / "config.yaml").is_file() and (run_dir / CHECKPOINT_DIR).is_dir())


def check_run_directory(run_dir: Path, kind: str, identity: dict[str, Any], extend: bool,
                        legacy_identity: dict[str, Any] | None = None, flag: str = "--out") -> dict[str, Any] | None:
    """Decide whether ``run_dir`` may be used for a run with ``identity``; returns the stored record (or None: new).

    Refuses (one-line ConfigError) when ``run_dir`` is a file, a non-empty directory that is not a leanmim
    run, a run of another kind, or a run whose identity differs (naming every difference).
    ``legacy_identity``: the identity of a run written before ``run.json`` existed (from its checkpoint).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{flag} '{run_dir}' is a file, not a directory: choose a new directory for {flag}")
    if not run_dir.exists():
        return None
    remove_stale_temporaries(run_dir)  # a kill between mkdir and run.json leaves .run.json.tmp-PID: not the user's
    record = read_run_file(run_dir)
    if record is None:
        if legacy_identity is not None:
            record = {"kind": kind, "identity": legacy_identity, "legacy": True}
        elif any(entry.name != LOCK_FILE for entry in run_dir.iterdir()):
            raise ConfigError(f"{flag} '{run_dir}' exists, is not empty and is not a leanmim {kind} run: "
                              f"choose a new or empty directory (nothing was written there)")
        else:
            return None
    if record.get("kind", kind) != kind:
        raise ConfigError(f"{flag} '{run_dir}' holds a {record.get('kind')} run, not a {kind} run: choose another {flag}")
    stored = record["identity"]
    ignore = set()
    if record.get("legacy"):  # old runs recorded no fingerprint: compare what they did record
        ignore = {key for key in identity if key not in stored}
    if stored.get("train.global_batch_size") == identity.get("train.global_batch_size"):
        ignore.add("train.batch_size")  # same global batch on another number of processes: same run
    differences = identity_differences(stored, identity, ignore)
    if not differences:
        return record
    blocking = [d for d in differences if d.split(":", 1)[0] not in EXTENDABLE_FIELDS]
    if not has_checkpoint(run_dir):  # a start that failed before its first checkpoint: nothing to resume or lose
        warnings.warn(f"{flag} '{run_dir}' holds a {kind} run that never wrote a checkpoint: its record is replaced "
                      f"by this run's settings ({len(differences)} differ, e.g. {differences[0]})")
        return None
    if extend and not blocking:
        _check_longer(stored, identity, run_dir)
        return record
    ways = (f"choose another {flag} for a new run, or rerun with the recorded settings to resume"
            + ("" if blocking else "; to train this run longer, add --extend (the warmup-cosine learning-rate "
                                   "schedule is recomputed over the new length)"))
    raise ConfigError(f"{flag} '{run_dir}' holds a different {kind} run ({'; '.join(differences)}): {ways}")


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir/checkpoints`` holds any ``*.ckpt`` file (readable or not)."""
    directory = run_dir / CHECKPOINT_DIR
    return directory.is_dir() and any(directory.glob("*.ckpt"))


def _check_longer(stored: dict[str, Any], new: dict[str, Any], run_dir: Path) -> None:
    for key in EXTENDABLE_FIELDS:
        if key in stored and key in new and isinstance(new[key], int) and isinstance(stored[key], int):
            if new[key] < stored[key] and new[key] > 0:
                raise ConfigError(f"--extend only lengthens a run: {key} {stored[key]} -> {new[key]} is shorter "
                                  f"('{run_dir}'); pass a larger value")


def write_run_file(run_dir: Path, kind: str, identity: dict[str, Any], facts: dict[str, Any]) -> None:
    from .. import __version__

    atomic_write_text(run_dir / RUN_FILE, dumps_strict({"kind": kind, "leanmim_version": __version__,
                                                        "identity": identity, "facts": facts}))


def check_output_file(path: str | Path, overwrite: bool, flag: str = "--out", suffixes: tuple[str, ...] = ()) -> Path:
    """Validate a file a command is about to write; one-line ConfigError when it must not be written."""
    path = Path(path)
    if path.is_symlink():  # a dangling link passes exists(); writing through a link would change the user's file
        raise ConfigError(f"{flag} '{path}' is a symbolic link (to '{os.readlink(path)}'): leanmim never writes "
                          f"through links, even with --overwrite; remove the link or choose another name")
    if str(path).strip() == "" or path.name in ("", ".", ".."):
        raise ConfigError(f"{flag} '{path}' is not a file name: pass a path such as out{suffixes[0] if suffixes else ''}")
    if path.is_dir():
        raise ConfigError(f"{flag} '{path}' is a directory: pass a file path inside it, e.g. "
                          f"'{path / ('out' + (suffixes[0] if suffixes else ''))}'")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{flag} '{path}' must end in {' or '.join(suffixes)}")
    if CHECKPOINT_DIR in path.resolve().parent.parts and is_leanmim_run(_run_dir_above(path.resolve().parent)):
        raise ConfigError(f"{flag} '{path}' lies inside a run's {CHECKPOINT_DIR}/ directory, which leanmim manages: "
                          f"write it elsewhere")
    if path.exists() and not overwrite:
        raise ConfigError(f"{flag} '{path}' already exists: pass --overwrite to replace it, or choose another name")
    if path.parent.exists() and not path.parent.is_dir():
        raise ConfigError(f"{flag} '{path}': '{path.parent}' is a file, not a directory")
    return path


def check_output_directory(path: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    """A directory a command is about to fill: refused when it is a file, lies in a run's ``checkpoints/``, or
    exists non-empty without ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} '{path}' is a file: pass a directory name (or a .safetensors file for timm)")
    if CHECKPOINT_DIR in path.resolve().parts and is_leanmim_run(_run_dir_above(path.resolve())):
        raise ConfigError(f"{flag} '{path}' lies inside a run's {CHECKPOINT_DIR}/ directory, which leanmim manages: "
                          f"write it elsewhere")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"{flag} '{path}' exists and is not empty: pass --overwrite to replace its files, or "
                          f"choose another directory")
    return path


def _run_dir_above(directory: Path) -> Path:
    while directory.name != CHECKPOINT_DIR and directory != directory.parent:
        directory = directory.parent
    return directory.parent


def write_summary(run_dir: Path, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into ``RUN_DIR/summary.json`` (written atomically)."""
    path = run_dir / "summary.json"
    summary = read_json_object(path)
    if not summary and path.is_file() and path.stat().st_size:  # damaged (a crash elsewhere, an edit): say so, go on
        warnings.warn(f"'{path}' was not a JSON object (damaged?): it is rewritten with what this command knows")
    summary.update(updates)
    atomic_write_text(path, dumps_strict(summary))
    return summary


def write_json(path: Path, values: dict[str, Any]) -> None:
    """A leanmim record (finetune.json, …): strict JSON (NaN/inf as null), written atomically."""
    atomic_write_text(path, dumps_strict(values))
