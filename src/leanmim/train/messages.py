"""How leanmim's own warnings are printed: one ``leanmim: warning: …`` line each, whichever folder of the package
raised them; third-party warnings as Python prints them. And the one line of a multi-process run whose other
process died (``peer_lost``), printed as the collective fails. Stdlib only, so that every command (even the torch-free
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


PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
             "Socket Timeout", "Timed out waiting", "ProcessGroupNCCL's watchdog")


def peer_lost(err: Exception) -> str | None:
    """The one line for a multi-process run whose other process died (killed, out of memory, its node lost): the
    collective this process was in fails with a transport error from gloo or NCCL."""
    message = str(err)
    distributed = type(err).__name__ in ("DistBackendError", "DistNetworkError", "DistError") or "gloo" in message \
        or "NCCL" in message or "ProcessGroup" in message
    if not distributed or not any(marker in message for marker in PEER_LOST):
        return None
    return ("another process of this multi-process run stopped (its connection was lost in the middle of a collective "
            "operation); the last checkpoint is intact: find why it stopped (the launcher's report names it: out of "
            "memory, killed, node lost), then rerun the same command to resume")


_peer_lost_reported = False   # whether this process has printed the peer-lost line


def report_peer_lost(err: BaseException) -> bool:
    """Print the one line of :func:`peer_lost` for ``err`` now, once per process (True when ``err`` is one).
    Called where a multi-process run's collective fails: the launcher (torchrun) sends this process SIGTERM as soon
    as it sees the other one die, and Lightning's teardown has put SIGTERM's default action back, so the line must
    be out before that signal lands. ``leanmim``'s error handler prints nothing more (:func:`peer_lost_reported`):
    the exception that reaches it may be another object wrapping this one."""
    global _peer_lost_reported
    line = peer_lost(err) if isinstance(err, Exception) else None
    if line is None or _peer_lost_reported:
        return line is not None
    try:
        print(f"leanmim: error: {line}", file=sys.stderr, flush=True)
    except OSError:
        pass
    _peer_lost_reported = True
    return True


def peer_lost_reported() -> bool:
    """Whether this process has printed the peer-lost line already."""
    return _peer_lost_reported
