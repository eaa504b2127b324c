"""Run an engine object in a child process, so llama.cpp aborts cannot end the run.

A GGML_ABORT or segfault kills only the child; the parent turns it into an EngineError that
names the signal and carries the last lines the child wrote to stderr. The child ignores
Ctrl-C (the parent decides when to stop) and is always terminated by `close()`.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import re
import signal
import sys
import threading
import traceback
import types
from collections.abc import Iterator
from pathlib import Path

from .. import rundir
from ..processes import die_with_parent, how_it_ended
from ..reproducer import abort_line
from .base import EngineError, ModelUnsupported, Refused, Unsupported

_STDERR_TAIL = 12
SITE = "CACHECHECK_SITE"  # in a worker's env: the site-packages whose llama_cpp it imports instead of ours


def _child(conn, factory: str, args, stderr_path: str, env: dict) -> None:  # process entry
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 2)
    os.environ["GGML_NO_BACKTRACE"] = "1"  # a gdb backtrace per abort is slow and noisy
    os.environ.update(env)  # before llama_cpp is imported: LLAMA_CPP_LIB_PATH picks the libllama it loads
    try:
        if SITE in env:  # another llama-cpp-python (a venv of its own) is found before ours; its own logging
            sys.path.insert(0, env[SITE])
        else:
            from .lowlevel import quiet_logs

            quiet_logs()
        module, name = factory.split(":")
        obj = getattr(importlib.import_module(module), name)(*args)
    except Exception as e:  # reported to the parent, which raises
        conn.send((False, (_describe(e), _kind(e))))
        return
    conn.send((True, None))
    while True:
        try:
            method, margs = conn.recv()
        except EOFError:
            return
        if method == "__close__":  # nothing to keep: skip the interpreter's teardown (a tenth of a second per engine)
            os._exit(0)
        try:
            conn.send((True, getattr(obj, method)(*margs)))
        except Exception as e:
            conn.send((False, (_describe(e), _kind(e))))


def _kind(e: Exception) -> type[Exception]:
    """What the parent raises for it: a refusal (the engine still runs), a model or setting it cannot play
    (SKIP), else an error."""
    return next((k for k in (ModelUnsupported, Unsupported, Refused) if isinstance(e, k)), EngineError)


def _describe(e: Exception) -> str:
    symbol = re.search(r"undefined symbol: (\w+)", str(e))
    if symbol:  # llama-cpp-python binds every function when it is imported
        return (f"libllama lacks {symbol.group(1)}, which the pinned llama-cpp-python calls (a llama.cpp older or "
                "newer than these bindings)")
    if isinstance(e, EngineError | Unsupported) or type(e).__name__ in ("PolicyError", "EngineError"):
        return str(e)
    last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" ({Path(last.filename).name}:{last.lineno})" if last else ""
    return f"{type(e).__name__}: {e}{where}"


def _context(factory: str, env: dict) -> mp.context.BaseContext:
    """How the child is made: forked from a server that has imported the factory's module already.

    Importing llama_cpp, numpy and jinja costs a fifth of a second per child, as much as a fixture's
    whole scenario suite; the fork server pays it once per run. Environment that must be in place
    before that import (LLAMA_CPP_LIB_PATH) needs a fresh interpreter: spawn.
    """
    if env:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([factory.split(":")[0]])
    return ctx


_starting = threading.Lock()


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Start a child that does not run the parent's `__main__` again.

    multiprocessing re-imports the parent's main script in every spawned or forkserver child, so
    that functions defined there can be unpickled. Ours never are (the child runs `_child` with a
    named factory), and the re-import is costly (the CLI imports the fixture writer, gguf and rich)
    and wrong: a script that imports llama_cpp would bind the bundled libllama before
    LLAMA_CPP_LIB_PATH is set. So while the child is being started, `__main__` is a bare module.
    """
    with _starting:
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            yield
        finally:
            sys.modules["__main__"] = main


class Worker:
    """`factory` is named ("module:Class"), not passed: the child imports it only after `env` is set."""

    def __init__(self, factory: str, args: tuple, name: str, timeout: float, env: dict | None = None):
        self.name = name
        self.timeout = timeout
        self.stderr_path = rundir.log_file("worker", name)
        ctx = _context(factory, env or {})
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(child_conn, factory, args, self.stderr_path, env or {}),
                                daemon=True, name=f"cachecheck-{name}")
        # the child must not die of the terminal's Ctrl-C while it boots (before it can ignore it):
        # start it with SIGINT blocked; the parent decides when to stop it
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            with _main_hidden():
                self.proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        child_conn.close()
        self._receive()

    def call(self, method: str, *args):  # returns what the engine method returns
        if self.proc is None:
            raise EngineError(f"{self.name}: engine process is closed")
        try:
            self.conn.send((method, args))
        except (BrokenPipeError, OSError):
            self._died()
        return self._receive()

    def _receive(self):
        if not self.conn.poll(self.timeout):
            self.close()
            raise EngineError(f"{self.name}: engine did not answer within {self.timeout:.0f} s",
                              kind="engine timed out")
        try:
            ok, value = self.conn.recv()
        except (EOFError, ConnectionResetError):
            self._died()
        if not ok:  # named once: the engine's message may already name the model's path
            said, kind = value  # what it said, and what kind of failure (see _kind)
            if issubclass(kind, Unsupported):  # a SKIP's reason, as the engine said it
                raise kind(said)
            raise kind(said if self.name in said else f"{self.name}: {said}")
        return value

    def _died(self) -> None:
        proc = self.proc
        if proc is None:
            raise EngineError(f"{self.name}: engine process is closed")
        proc.join(5)
        code = proc.exitcode
        how = how_it_ended(code)
        tail = self.stderr_tail()
        said = abort_line(self.stderr_text()) or how
        self.close()
        raise EngineError(f"{self.name}: engine process died ({how})" + (f"; stderr: {tail}" if tail else ""),
                          kind=f"engine process died: {said}")

    def stderr_text(self) -> str:
        try:
            return Path(self.stderr_path).read_text(errors="replace")
        except OSError:
            return ""

    def stderr_tail(self) -> str:
        lines = self.stderr_text().splitlines()
        return " | ".join(ln.strip() for ln in lines[-_STDERR_TAIL:] if ln.strip())

    def close(self) -> None:
        # Ctrl-C closes every engine from the main thread while a pool thread may be closing the same
        # one: whoever takes the process first stops it, the other returns
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            self.conn.send(("__close__", ()))
        except (BrokenPipeError, OSError):
            pass
        proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join(2)
        self.conn.close()
        rundir.discard(self.stderr_path)
