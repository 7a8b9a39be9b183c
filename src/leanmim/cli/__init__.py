"""The ``leanmim`` command. Thin: parse, validate, call :mod:`leanmim.api`, print.

Errors the user can fix are printed as one line (``leanmim: error: …``) with exit code 2.

    __init__.py  main(): run one command, turn errors into one line
    parser.py    every subcommand and flag, generated from the typed configs and the method catalogue
    commands.py  what each subcommand does

The top of the house: may import anything in leanmim; nothing imports it.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Sequence

from ..config import ConfigError
from .parser import build_parser


def one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


def worker_error(message: str) -> str | None:
    """The original error of a DataLoader worker (``Caught X in DataLoader worker process N. Original Traceback
    ...``): its last line without the exception's module path, e.g. ``DataError: none of the ... could be read``."""
    if "in DataLoader worker process" not in message or "Original Traceback" not in message:
        return None
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    name, _, text = last.partition(": ")
    if name.endswith("DataError"):
        return text
    return f"{name.rsplit('.', 1)[-1]}: {text} (while loading data in a worker process: did the data change during the run?)"


OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")  # torch CPU and CUDA allocators
def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every failure ends in one ``leanmim: error:`` line and exit code 2 (a signal that stopped
    training: one ``leanmim: interrupted`` line and 128 + the signal number, e.g. 130 for Ctrl-C)."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        command = next((arg for arg in argv if not arg.startswith("-")), "")
        args = build_parser(only=command).parse_args(argv)
        if getattr(args, "verbose", False):  # read by leanmim.console, here and in DDP / loader child processes
            os.environ["LEANMIM_VERBOSE"] = "1"
        from ..train.messages import leanmim_warnings   # stdlib only: torch-free commands stay torch-free

        with leanmim_warnings():
            return args.handler(args)
    except ConfigError as err:
        print(f"leanmim: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanmim: interrupted (rerun the same command to resume from the last checkpoint)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns every failure into one line
        engine = sys.modules.get("leanmim.train.trainer")  # loaded only when a command trained
        if engine is not None and isinstance(err, engine.TrainingInterrupted):
            print(f"leanmim: {err}", file=sys.stderr)
            return err.exit_code
        data = sys.modules.get("leanmim.data")
        known = (data.DataError,) if data is not None else ()
        known += (engine.NonFiniteLossError,) if engine is not None else ()
        if isinstance(err, known):
            print(f"leanmim: error: {one_line(err)}", file=sys.stderr)
            return 2
        if os.environ.get("LEANMIM_DEBUG"):
            raise
        if isinstance(err, MemoryError) or any(marker in str(err).lower() for marker in OUT_OF_MEMORY):
            print("leanmim: error: out of memory: lower --batch-size or the model's size (--embed-dim, --depth, "
                  "--img-size), or --max-memory-gb for the data", file=sys.stderr)
            return 2
        if isinstance(err, OSError) and err.errno == errno.ENOSPC or "file write failed" in str(err):
            print(f"leanmim: error: no space left on the device while writing"
                  f"{' ' + repr(err.filename) if getattr(err, 'filename', None) else ''} (torch: file write failed): the "
                  f"previous checkpoint is intact; free disk space (or point --out elsewhere), then rerun to resume",
                  file=sys.stderr)
            return 2
        from ..train.messages import peer_lost, peer_lost_reported

        if peer_lost_reported():   # its line is out already, printed when the collective failed: not twice
            return 2
        lost = peer_lost(err)
        if lost is not None:
            print(f"leanmim: error: {lost}", file=sys.stderr)
            return 2
        worker = worker_error(str(err))
        if worker is not None:  # an error inside a DataLoader worker arrives as a flattened traceback: its last line
            print(f"leanmim: error: {one_line(worker)}", file=sys.stderr)
            return 2
        if isinstance(err, OSError) and getattr(err, "filename", None):
            print(f"leanmim: error: {err.strerror or type(err).__name__}: '{err.filename}'", file=sys.stderr)
            return 2
        print(f"leanmim: error: unexpected {type(err).__name__}: {one_line(err, 240)} (an unchecked input or a bug: "
              f"rerun with LEANMIM_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return 2
