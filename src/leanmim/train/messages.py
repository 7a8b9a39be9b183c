"""How leanmim's own warnings are printed: one ``leanmim: warning: …`` line each, whichever folder of the package
raised them; third-party warnings as Python prints them. Stdlib only, so that every command (even the torch-free
``leanmim methods`` and ``--help``) can run inside :func:`leanmim_warnings`.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Iterator


def leanmim_showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    """leanmim's own warnings as one ``leanmim: warning:`` line; any other warning as Python prints it."""
    stream = file or sys.stderr
    if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
        text = " ".join(str(message).split())
        try:
            stream.write(f"leanmim: warning: {text}\n")
        except OSError:
            pass
        return
    _ORIGINAL_SHOWWARNING(message, category, filename, lineno, file, line)


_ORIGINAL_SHOWWARNING = warnings.showwarning
PACKAGE_DIR = Path(__file__).resolve().parents[1]   # src/leanmim: every leanmim module, any folder


_DEFAULT_SHOWWARNMSG = getattr(warnings, "_showwarnmsg_impl", None)


def recording_warnings() -> bool:
    """Whether something records warnings right now (pytest.warns, ``catch_warnings(record=True)``): then leave
    their display alone."""
    return getattr(warnings, "_showwarnmsg_impl", None) is not _DEFAULT_SHOWWARNMSG


@contextlib.contextmanager
def leanmim_warnings() -> Iterator[None]:
    """leanmim's own warnings as one ``leanmim: warning:`` line each for the duration (not while something records
    warnings, e.g. pytest.warns); third-party warnings unchanged. What every command runs inside."""
    with warnings.catch_warnings():
        if not recording_warnings():
            warnings.showwarning = leanmim_showwarning
        yield
