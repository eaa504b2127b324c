"""Processes of ours and how they end: signals stop a run the way Ctrl-C does, children die with us.

The bottom of the import graph beside `status`: the command line, the results writer and the
engines all stop processes the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from collections.abc import Iterator


def how_it_ended(code: int | None) -> str:
    """A process's exit code as a person reads it: `signal SIGSEGV`, `exit 1`."""
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit {code}"


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a cancelled CI job, a closed terminal): the Ctrl-C cleanup runs for it too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def stop_on_signals() -> None:
    """In the main process: TERM and HUP stop a run the way Ctrl-C does (every engine closed)."""
    def handler(signum: int, _frame) -> None:  # signal API
        raise Stopped(signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """INT, TERM and HUP wait until the block is done, then act as they would have (main thread only).

    For the few renames that publish a report and its results: stopped between them, a run would
    leave a new results.json beside an old report.html.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            os.kill(os.getpid(), got[0])  # now, to the handler it would have met


def die_with_parent(parent: int | None = None) -> None:
    """In a child we start: the kernel kills it when its parent dies, even by SIGKILL (Linux).

    `parent` is the pid the parent had before it forked: asked only here, in the child, a parent
    killed between the fork and this line would already read as its successor (init), and the
    child would outlive it.
    """
    parent = os.getppid() if parent is None else parent
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the parent's own cleanup is all there is
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
