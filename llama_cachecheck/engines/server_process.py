"""One llama-server process of ours (start on a free loopback port, wait for /health, always stop its group),
or one someone else started (`--server-url`); requests to it, and what it said when it failed.

llama.cpp's tools/server/tests/utils.py is the model: one small class owns one server.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

from .. import rundir
from ..processes import die_with_parent, how_it_ended
from ..reproducer import abort_line
from .base import EngineError, ModelUnsupported, Refused, StartError
from .server_log import key_lines

_LOG_TAIL = 15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One llama-server: start on a free loopback port, wait for /health, always stop the group."""

    def __init__(self, binary: str, model: str, args: list[str], name: str, timeout: float = 120.0,
                 clock: collections.Counter | None = None):
        self.binary, self.model, self.args, self.name, self.timeout = binary, model, args, name, timeout
        # which server, in a failure's class: "subject server", "reference server" (the name also has the model)
        self.role = next((r for r in ("subject server", "reference server") if name.endswith(r)), "server")
        self.clock = collections.Counter() if clock is None else clock  # seconds: start, each endpoint
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.command: list[str] = []  # as last started, for the report
        self.log_path = rundir.log_file("server", name)
        self._log_offset = 0
        self._attempt_at = 0  # where the log of the current start attempt begins
        self._no_end_marker = False
        # one connection pool for all its requests; a loopback server of ours needs no proxy settings
        # (requests reads them from the environment on every call otherwise)
        self.http = requests.Session()
        self.http.trust_env = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        t0 = time.perf_counter()
        try:
            self._start()
        finally:
            self.clock["start (spawn, model load, /health)"] += time.perf_counter() - t0

    def _start(self) -> None:
        for _ in range(3):  # a port taken between free_port() and bind: try another
            self.port = free_port()
            cmd = [self.binary, "-m", self.model, "--host", "127.0.0.1", "--port", str(self.port), *self.args]
            self.command = cmd
            self._attempt_at = Path(self.log_path).stat().st_size if Path(self.log_path).exists() else 0
            with open(self.log_path, "ab") as log:
                # its own process group, so we stop all of it; an abort's gdb backtrace would bury the
                # assert line in the log tail we report
                # ... and killed by the kernel if we die without stopping it (die_with_parent)
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True,
                                             preexec_fn=functools.partial(die_with_parent, os.getpid()),
                                             env={**os.environ, "GGML_NO_BACKTRACE": "1"})
            if self._wait_healthy():
                return
            if "couldn't bind" not in self.log_text()[-2000:]:
                break
        said, code = self.last_words(), self.proc and self.proc.poll()
        self.stop()
        arch = re.search(r"unknown model architecture: '([^']+)'", said)
        if arch:
            raise ModelUnsupported(f"this llama-server does not know architecture {arch.group(1)}")
        how = f"died before it became healthy ({how_it_ended(code)})" if code is not None else \
            f"did not become healthy within {self.timeout:.0f} s"
        raise StartError(f"{self.name} ({self.binary}) {how}: {said}",
                         kind=self._died_of(code) + " (before it became healthy)" if code is not None else
                         f"{self.role} did not become healthy")

    def _wait_healthy(self) -> bool:
        """Healthy, and ours: a /health answer on our port may come from another program's server that
        took the port between free_port() and our bind (two soaks on one machine did), so our own log
        must say it listens there. A build that never says so is taken at its word after a second."""
        deadline = time.monotonic() + self.timeout
        first_ok = None
        while time.monotonic() < deadline:
            proc = self.proc  # None once stopped from another thread (Ctrl-C)
            if proc is None or proc.poll() is not None:
                return False
            try:
                ok = self.http.get(f"{self.url}/health", timeout=2).status_code == 200
            except requests.RequestException:
                ok = False
            if ok:
                said = self._attempt_log()
                if "couldn't bind" in said:
                    return False  # start() tries another port
                if re.search(rf"listening on \S*:{self.port}\b", said):
                    return True
                first_ok = first_ok or time.monotonic()
                if time.monotonic() - first_ok > 1.0:
                    return True
            time.sleep(0.002)  # a fixture loads in 30 ms: a coarse poll would add a good part of that
        return False

    def _attempt_log(self) -> str:
        """What this start attempt logged (the log file is appended to across attempts and restarts)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._attempt_at)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        # Ctrl-C stops every server from the main thread while a pool thread may be stopping the same
        # one: whoever takes the process first stops it
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            # nothing of a server we are done with is wanted (its log is on disk): its graceful shutdown
            # took a tenth of a second, as long as a fixture's whole scenario
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def close(self) -> None:
        self.stop()
        self.http.close()
        rundir.discard(self.log_path)

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = _LOG_TAIL) -> str:
        return " | ".join(ln.strip() for ln in self.log_text().splitlines()[-n:] if ln.strip())

    def last_words(self) -> str:
        """What a failed server said: its abort or error lines first, then the log's tail."""
        said = " | ".join(key_lines(self.log_text()))
        return (f"{said} || log tail: " if said else "log: ") + self.tail()

    def new_log_lines(self, until: str | None = None, timeout: float = 5.0, count: int = 1) -> list[str]:
        """The whole lines written since the last call.

        llama-server logs from a thread of its own: a request's last lines (a restore, the slot's
        release) can land after its response, and would then count as the next request's. With
        `until`, wait for a line that ends the request first; a build whose log never says it is
        waited for once, then not again.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(self._log_offset)
                    new = f.read()
            except OSError:
                new = b""
            new = new[:new.rfind(b"\n") + 1]  # a line still being written is read next time
            if until is None or new.count(until.encode()) >= count or self._no_end_marker:
                break
            if time.monotonic() > deadline:
                self._no_end_marker = True
                break
            time.sleep(0.001)  # its last lines follow the response within a millisecond or two
        self._log_offset += len(new)
        return new.decode(errors="replace").splitlines()

    def check_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = self.proc and self.proc.returncode
            raise EngineError(f"{self.name} is not running ({how_it_ended(code)}): {self.tail()}",
                              kind=self._died_of(code))

    def _died_of(self, code: int | None) -> str:
        """A dead server's failure class: what it died of, as its log says (the abort line), else how it ended."""
        return f"{self.role} died: {abort_line(self._attempt_log()) or how_it_ended(code)}"

    def _failed(self, path: str, e: requests.RequestException, timeout: float) -> EngineError:
        """A request without an answer: the server died under it (it may take a moment to exit after the
        connection dropped), or it lives and did not answer in time, or the connection failed."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            if self.proc is not None:
                self.proc.wait(2.0)
        code = self.proc.poll() if self.proc is not None else None
        said = f"{self.name} {path}: {type(e).__name__}: {e}; {self.last_words()}"
        if code is not None:
            return EngineError(f"{self.name} died during {path} ({how_it_ended(code)}); {self.last_words()}",
                               kind=self._died_of(code))
        if isinstance(e, requests.Timeout):
            return EngineError(said, kind=f"{self.role} gave no answer to {path} within {timeout:.0f} s")
        return EngineError(said, kind=f"{self.role} connection failed on {path}: {type(e).__name__}")

    def post(self, path: str, body: dict, timeout: float) -> dict:
        self.check_running()
        t0 = time.perf_counter()
        try:
            r = self.http.post(f"{self.url}{path}", json=body, timeout=timeout)
        except requests.RequestException as e:
            raise self._failed(path, e, timeout) from None
        finally:
            self.clock[path.split("?")[0]] += time.perf_counter() - t0
        if r.status_code != 200:
            if 400 <= r.status_code < 500:
                raise Refused(f"{self.name} {path} answered {r.status_code}: {r.text[:300]}; log: {self.tail()}")
            said = _message(r)
            raise EngineError(f"{self.name} {path} answered {r.status_code}: {r.text[:300]}; log: {self.tail()}",
                              kind=f"{self.role} answered {r.status_code} on {path.split('?')[0]} and lived"
                                   + (f": {said}" if said else ""))
        return r.json()


class AttachedServer(ServerProcess):
    """A llama-server someone else started (`--server-url`): we never start or stop it, and see no log."""

    def __init__(self, url: str, name: str, clock: collections.Counter | None = None):
        super().__init__("(attached)", "", [], f"{name} at {url.rstrip('/')}", clock=clock)
        self.attached_url = url.rstrip("/")
        self.role = "attached server"
        self.http.trust_env = True  # someone else's server may sit behind the user's proxy

    @property
    def url(self) -> str:
        return self.attached_url

    def check_health(self) -> None:
        """EngineError, in one line, unless the server answers /health with 200."""
        try:
            r = self.http.get(f"{self.url}/health", timeout=10)
        except requests.RequestException as e:
            raise EngineError(f"{self.name}: /health failed: {type(e).__name__}") from None
        if r.status_code != 200:
            raise EngineError(f"{self.name}: /health answered {r.status_code}: {r.text[:200]!r}")

    def props(self) -> dict:
        """What a llama-server says of itself (/props): its slots, each slot's context, its build and chat template.
        EngineError, in one line, where the answer is not a llama-server's (another program on that port)."""
        try:
            r = self.http.get(f"{self.url}/props", timeout=10)
            doc = r.json() if r.status_code == 200 else None
        except (requests.RequestException, ValueError) as e:
            raise EngineError(f"{self.name}: /props failed: {type(e).__name__}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("default_generation_settings"), dict):
            raise EngineError(f"{self.name}: not a llama-server (its /props answered {r.status_code} without the "
                              f"server's default_generation_settings: {r.text[:120]!r})")
        return doc

    def start(self) -> None:
        self.check_health()
        # a fresh conversation: forget what the slot holds, where the server allows it (--slot-save-path);
        # otherwise its earlier prompts stay cached, which a correct server must handle anyway
        try:
            r = self.http.post(f"{self.url}/slots/0?action=erase", json={}, timeout=30)
        except requests.RequestException as e:
            raise EngineError(f"{self.name}: slot erase failed: {type(e).__name__}") from None
        if r.status_code not in (200, 501):
            raise EngineError(f"{self.name} /slots/0?action=erase answered {r.status_code}: {r.text[:300]}")

    def stop(self) -> None:
        pass

    def log_text(self) -> str:
        return ""

    def tail(self, n: int = _LOG_TAIL) -> str:
        return "(attached by URL: no server log)"

    def check_running(self) -> None:
        pass  # not our process: a request that fails says so


def _message(r) -> str:  # a requests.Response
    """What a 5xx said it was (llama-server's `error.message`), numbers left out: part of the failure's class,
    so two 500s of different causes are two classes."""
    try:
        said = r.json().get("error", {}).get("message", "")
    except (ValueError, AttributeError):
        return ""
    return re.sub(r"\d+", "N", str(said))[:160]


def attached_said(url: str) -> str:
    """What the report says of an attached server: what its /props tells, and what nothing tells."""
    server = AttachedServer(url, "--server-url")
    try:
        props = server.props()
    except EngineError:
        props = {}
    finally:
        server.close()
    slots, n_ctx = props.get("total_slots", "?"), props.get("default_generation_settings", {}).get("n_ctx", "?")
    return (f"attached: build {props.get('build_info', '?')}, {slots} slots of {n_ctx} tokens; no log; its batch "
            "sizes, flash attention, repacking and KV types cannot be read, so the reference takes its build's "
            "defaults")
