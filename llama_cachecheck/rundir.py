"""One directory per run for the logs of every process it starts (llama-server, engine workers).

A process's log is read while the run needs it (a server's cache events, the last words of
one that died) and deleted when that process is stopped, unless the run keeps its logs
(`--keep-logs`): then the directory stays and the run says where it is. Either way nothing
of ours is scattered over the temp directory, and a run killed outright (SIGKILL: no code of
ours runs) leaves one directory.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

_lock = threading.Lock()
_dir: Path | None = None
keep = False  # set by --keep-logs
_registered = False


def _run_dir() -> Path:
    global _dir, _registered
    with _lock:
        if _dir is None or not _dir.is_dir():
            _dir = Path(tempfile.mkdtemp(prefix=f"cachecheck-run-{os.getpid()}-"))
            if not _registered:  # whoever uses it (the CLI, pytest, a script) leaves no empty directory
                atexit.register(finish)
                _registered = True
        return _dir


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[-50:]


def log_file(kind: str, name: str) -> str:
    """A new empty log file for one process (a server, a worker) in this run's directory."""
    fd, path = tempfile.mkstemp(prefix=f"{kind}-{_safe(name)}-", suffix=".log", dir=_run_dir())
    os.close(fd)
    return path


def directory(kind: str, name: str) -> str:
    """A new empty directory in this run's directory (a server's slot files), with a trailing slash:
    llama-server joins its --slot-save-path and a file name as they are."""
    return tempfile.mkdtemp(prefix=f"{kind}-{_safe(name)}-", dir=_run_dir()) + "/"


def discard(path: str) -> None:
    """A stopped process's log (or directory): gone, unless the run keeps its logs (an empty directory
    keeps nothing: gone either way)."""
    if not keep or (os.path.isdir(path) and not os.listdir(path)):
        try:
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        except OSError:
            pass


def finish() -> Path | None:
    """At the end of the run: the directory if its logs are kept, else it is removed (and None)."""
    global _dir
    with _lock:
        d, _dir = _dir, None
    if d is None or not d.is_dir():
        return None
    if keep:
        return d
    shutil.rmtree(d, ignore_errors=True)
    return None
