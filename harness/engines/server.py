"""The real llama-server under test: one class owns one process, one class speaks the Engine interface.

Subject: a server with its prompt cache and context checkpoints on, every request pinned to
slot 0 with `cache_prompt: true` — chat steps through /v1/chat/completions (the server's own
chat template and message-span checkpoints), raw-token steps through /completion. Reference:
a second server process, every request with `cache_prompt: false`, so a full re-process can
never disturb the subject's slot. The server cannot score given tokens (no prompt logprobs),
so there is no teacher forcing: generated tokens' logprobs are compared up to the divergence.
Cache events come from the subject's log (-lv 4), parsed into the in-process timeline's form.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

from .. import rundir
from ..compare import shifts_chunks
from ..models import with_draft_path
from ..processes import die_with_parent, how_it_ended
from .base import (
    Completion,
    EngineError,
    EngineInfo,
    ModelUnsupported,
    Prompt,
    Refused,
    SessionSettings,
    StartError,
    TopK,
    Unsupported,
    damage,
)
from .capabilities import (
    Capabilities,
    check_server_args,
    effective_settings,
    probe,
    server_flags,
    without_overridden,
)

_LOG_TAIL = 15
_REFERENCES_KEPT = 3
_EVENT_PATTERNS = [
    ("created", re.compile(r"created context checkpoint \d+ of \d+ \(pos_min = (-?\d+), pos_max = (-?\d+), "
                           r"n_tokens = (\d+)")),
    ("restored", re.compile(r"restored context checkpoint \(pos_min = (-?\d+), pos_max = (-?\d+), n_tokens = (\d+)")),
    ("erased", re.compile(r"erased invalidated context checkpoint \(pos_min = (-?\d+), pos_max = (-?\d+), "
                          r"n_tokens = (\d+)")),
    ("evicted", re.compile(r"erasing (?:old )?context checkpoint(?: too close to an earlier one)? "
                           r"\(pos_min = (-?\d+), pos_max = (-?\d+), n_tokens = (\d+)")),
    ("superseded", re.compile(r"superseding context checkpoint at n_tokens = (\d+)")),
    ("full-reprocess", re.compile(r"forcing full prompt re-processing")),
]


_SLOT = re.compile(r"\bid\s+(\d+) \| task (-?\d+) \|")  # a slot's log line: `slot update_slots: id  0 | task 7 | ...`
_N_TOKENS = re.compile(r"new prompt, .*task\.n_tokens = (\d+)")


@dataclass
class Task:
    """One request's share of the log: the slot that served it, its prompt's length, its lines."""

    slot: int
    n_tokens: int | None = None
    lines: list[str] = dataclasses.field(default_factory=list)


def split_by_task(lines: list[str]) -> dict[int, Task]:
    """Interleaved log lines of requests served at once (or one after another on one slot), per task;
    a server line (no slot of its own, e.g. the host cache's) goes with the next task line (the task
    it was logged for)."""
    out: dict[int, Task] = {}
    waiting: list[str] = []
    for line in lines:
        m = _SLOT.search(line)
        if m is None or int(m.group(2)) < 0:
            waiting.append(line)
            continue
        task = out.setdefault(int(m.group(2)), Task(int(m.group(1))))
        n = _N_TOKENS.search(line)
        if n and task.n_tokens is None:
            task.n_tokens = int(n.group(1))
        task.lines += [*waiting, line]
        waiting = []
    return out


# the host-memory prompt cache (server_prompt_cache in server-task.cpp, prompt_save/prompt_clear in
# server-context.cpp): server lines name no slot, so they go with the last slot line before them
_SAVING = re.compile(r" - saving prompt with length (\d+)")
_NOT_SAVED = re.compile(r"prompt is already in the cache, skipping|exceeds cache size limit|"
                        r"failed to allocate memory for prompt cache")
_CANDIDATE = re.compile(r" - prompt with length +(\d+), lcp = +(\d+), f_keep = ([\d.]+), f_sim = ([\d.]+)")
_FOUND = re.compile(r"found better prompt with f_keep = ([\d.]+), f_sim = ([\d.]+)")
_DROPPED = re.compile(r"removing obsolete cached prompt with length (\d+)")
_EVICTED = re.compile(r"removing oldest entry")
_CLEARED = re.compile(r"clearing prompt with (\d+) tokens")
_CHECKING = re.compile(r" - checking sim = [\d.]+ \((\d+)/(\d+)\)")
_BY_SIMILARITY = re.compile(r"selected slot by LCP similarity")


def _slot_event(kind: str, n_tokens: int, slot: int, **more: float) -> dict:
    return {"kind": kind, "n_tokens": n_tokens, "pos_min": -1, "pos_max": -1, "slot": slot, **more}


def parse_host_cache(lines: list[str]) -> list[dict]:
    """Server log lines -> the host-cache and slot events, as the in-process slots name them (no prompt
    digest: the log gives lengths; a load also gives its common prefix with the new prompt, `lcp`)."""
    events: list[dict] = []
    slot, candidates, saving = -1, [], None
    checked: dict[int, tuple[int, int]] = {}  # slot -> its common prefix with the prompt, the prompt's length
    for line in lines:
        m = _SLOT.search(line)
        if m:
            slot = int(m.group(1))
        if (m := _CHECKING.search(line)) is not None:
            checked[slot] = (int(m.group(1)), int(m.group(2)))
        elif _BY_SIMILARITY.search(line) and slot in checked:
            lcp, n = checked.pop(slot)
            events.append(_slot_event("selected", lcp, slot, similarity=lcp / n))
        if saving is not None and _NOT_SAVED.search(line):
            events.remove(saving)
            saving = None
        if (m := _SAVING.search(line)) is not None:
            saving = _slot_event("host-saved", int(m.group(1)), slot)
            events.append(saving)
            candidates = []
        elif (m := _CANDIDATE.search(line)) is not None:
            candidates.append(m.groups())
        elif (m := _FOUND.search(line)) is not None:
            # the first candidate with the winning figures (the rule takes a strictly better one only)
            won = next((c for c in candidates if c[2:] == m.groups()), None)
            if won is not None:
                events.append(_slot_event("host-loaded", int(won[0]), slot, lcp=int(won[1])))
        elif (m := _DROPPED.search(line)) is not None:
            events.append(_slot_event("host-dropped", int(m.group(1)), -1))
        elif _EVICTED.search(line):
            events.append(_slot_event("host-evicted", -1, -1))
        elif (m := _CLEARED.search(line)) is not None and int(m.group(1)) > 0:
            events.append(_slot_event("cleared", int(m.group(1)), slot))
    return events


def parse_events(lines: list[str]) -> list[dict]:
    """Server log lines -> the event timeline (kind, n_tokens, pos_min, pos_max), host-cache events first
    (they are logged before the task's prompt is processed)."""
    events = parse_host_cache(lines)
    for line in lines:
        for kind, rx in _EVENT_PATTERNS:
            m = rx.search(line)
            if not m:
                continue
            g = [int(x) for x in m.groups()]
            if kind == "superseded":
                events.append({"kind": kind, "n_tokens": g[0], "pos_min": -1, "pos_max": -1})
            elif kind == "full-reprocess":
                events.append({"kind": kind, "n_tokens": -1, "pos_min": -1, "pos_max": -1})
            else:
                events.append({"kind": kind, "n_tokens": g[2], "pos_min": g[0], "pos_max": g[1]})
            break
    return events


# what a dying server says first, ahead of the progress lines around it
_KEY_LINE = re.compile(r"GGML_ASSERT|error:|error loading model|unknown model architecture|terminate called|"
                       r"invalid argument|unknown argument|\.(?:cpp|c|h):\d+: ", re.IGNORECASE)  # GGML_ABORT: file:line


def _as_written(probs: list[dict], n: int, eog: bool, content: str) -> str:
    """A chat reply as the model wrote it, from its tokens' bytes. The server's reply parser trims the
    content where the template knows tools or reasoning, and puts back a <think> the prompt opened; the
    client we play keeps what was written, as in-process, so both engines send the same next prompt. The
    content as parsed where the bytes are not all there (a token the list leaves out, inside a character
    cut in two, leaves them invalid UTF-8)."""
    written = probs[:n - 1] if eog else probs[:n]
    if len(probs) < n or any("bytes" not in p for p in written):
        return content
    try:
        return b"".join(bytes(p["bytes"]) for p in written).decode("utf-8")
    except UnicodeDecodeError:
        return content


def key_lines(log: str, n: int = 3) -> list[str]:
    return [ln.strip() for ln in log.splitlines() if _KEY_LINE.search(ln)][:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One llama-server: start on a free loopback port, wait for /health, always stop the group."""

    def __init__(self, binary: str, model: str, args: list[str], name: str, timeout: float = 120.0,
                 clock: collections.Counter | None = None):
        self.binary, self.model, self.args, self.name, self.timeout = binary, model, args, name, timeout
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
        raise StartError(f"{self.name} ({self.binary}) {how}: {said}")

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
            raise EngineError(f"{self.name} is not running (exit {self.proc and self.proc.returncode}): {self.tail()}")

    def post(self, path: str, body: dict, timeout: float) -> dict:
        self.check_running()
        t0 = time.perf_counter()
        try:
            r = self.http.post(f"{self.url}{path}", json=body, timeout=timeout)
        except requests.RequestException as e:
            raise EngineError(f"{self.name} {path}: {type(e).__name__}: {e}; {self.last_words()}") from None
        finally:
            self.clock[path.split("?")[0]] += time.perf_counter() - t0
        if r.status_code != 200:
            error = Refused if 400 <= r.status_code < 500 else EngineError
            raise error(f"{self.name} {path} answered {r.status_code}: {r.text[:300]}; log: {self.tail()}")
        return r.json()


class AttachedServer(ServerProcess):
    """A llama-server someone else started (`--server-url`): we never start or stop it, and see no log."""

    def __init__(self, url: str, name: str, clock: collections.Counter | None = None):
        super().__init__("(attached)", "", [], f"{name} at {url.rstrip('/')}", clock=clock)
        self.attached_url = url.rstrip("/")
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


class ServerEngine:
    """The Engine interface over two llama-server processes (subject with cache, reference without)."""

    def __init__(self, binary: str, path: str, name: str, info: EngineInfo, request_timeout: float = 300.0, *,
                 server_url: str | None = None, reference_bin: str | None = None, profile: str = "deployed",
                 server_args: str = ""):
        self.binary, self.path, self.name, self.server_url = binary, path, name, server_url
        # the reference may be another build (master, a PR's base): "does my PR change what the cache gives?"
        self.reference_bin = reference_bin
        self.caps: Capabilities = probe(binary)
        self.ref_caps: Capabilities = probe(reference_bin) if reference_bin else self.caps
        self.profile, self.server_args = profile, server_args
        self.user_flags, self.user_settings = check_server_args(self.caps, server_args)  # BadServerArgs
        build = f"llama-server {self.caps.version} ({binary})"
        reference = f"llama-server {self.ref_caps.version} ({reference_bin or binary})"
        if server_url:  # the reference is ours: --reference-bin's build, else --server-bin's
            build = f"llama-server at {server_url} (attached: no log, its own settings); reference {reference}"
        elif reference_bin:
            build = f"subject {build}; reference {reference}"
        self.info = dataclasses.replace(info, engine="server", model=name, path=path, llama_cpp=build,
                                        profile="" if server_url else f"server-{profile}")
        self.timeout = request_timeout
        self.settings: SessionSettings | None = None
        self.subject: ServerProcess | None = None
        self.ref: ServerProcess | None = None
        # references by their flags, the last few kept: scenarios alternate between a handful of
        # contexts and batch sizes, and a reference (stateless, caching off) serves any number of them
        self.refs: dict[tuple[str, ...], ServerProcess] = {}
        self.slot_dir: str | None = None
        self.subject_flags: list[str] = []  # the subject's command line as we made it (without its slot directory)
        self.resets = 0  # subjects emptied in place instead of restarted
        self.pieces: dict[int, str] = {}  # token -> its text, one model's vocabulary as met
        self.clock: collections.Counter = collections.Counter()  # where the time goes, for benchmarks/
        # the subject's renderings of the latest chat prompts, the reference's too: one build, our template
        # flags on both, renders alike (another --reference-bin, or an attached server, renders its own)
        self.shared_rendering = reference_bin is None and not server_url
        self.rendered: dict[str, list[int]] = {}
        # cache_reuse on memory that shifts: a reference that shifts cached chunks too (see reference())
        self.shifting_flags: list[str] | None = None
        self.shifting_held: list[int] | None = None  # what its one slot holds

    def replay_args(self) -> list[str]:
        args = ["--engine", "server", "--server-bin", str(self.binary)]
        if self.server_url:  # the server under test, and the build of our reference
            args += ["--server-url", self.server_url]
        if self.reference_bin:
            args += ["--reference-bin", str(self.reference_bin)]
        args += ["--server-profile", self.profile]
        if self.server_args:
            args += ["--server-args", self.server_args]
        return args

    def subject_command(self) -> str:
        if self.server_url:
            return f"(attached at {self.server_url}: its own command line)"
        return shlex.join(self.subject.command) if self.subject is not None and self.subject.command else ""

    def start_session(self, settings: SessionSettings) -> SessionSettings:
        """Every scenario starts on an empty subject: no cache survives from the last one. Emptied in
        place where that is verifiably what a fresh process gives (see `_reset_in_place`), restarted
        otherwise. The reference keeps nothing between requests (every cache off, each prompt
        processed in full), so it serves every scenario of the model that starts it with its flags.

        Returns what the subject runs with (the profile's and the user's flags applied)."""
        settings = with_draft_path(settings, self.path, self.name)
        template = self.info.builtin_template
        # Unsupported: the scenario is skipped
        ours = server_flags(self.caps, settings, True, template, self.profile)
        subject_flags = without_overridden(self.caps, ours, self.user_flags) + self.user_flags
        effective = settings if self.server_url else \
            effective_settings(self.caps, settings, self.profile, self.user_settings)
        ref_flags = server_flags(self.ref_caps, settings, False, template)
        self.shifting_flags, self.shifting_held = self._shifting_flags(settings, template), None
        if self._reset_in_place(subject_flags, effective):
            self.settings = dataclasses.replace(effective, n_parallel=1)
            try:
                self.ref = self._reference_server(ref_flags)
            except EngineError:
                self.close()
                raise
            return self.settings
        self.close_subject()
        self.subject_flags = subject_flags
        if "--slot-save-path" in self.caps.options:  # slot: save / restore steps write their files there
            self.slot_dir = rundir.directory("slots", self.name)
            subject_flags = subject_flags + ["--slot-save-path", self.slot_dir]
        self.settings = effective
        self.subject = AttachedServer(self.server_url, f"{self.name} subject server", self.clock) \
            if self.server_url else \
            ServerProcess(self.binary, self.path, subject_flags, f"{self.name} subject server", clock=self.clock)
        try:
            self.subject.start()
            self.ref = self._reference_server(ref_flags)
        except (EngineError, Unsupported):
            self.close()
            raise
        started = "\n".join(self.subject.new_log_lines())
        slots = re.search(r"initializing, n_slots = (\d+)", started)  # `-np` auto: what the build made of it
        if slots:
            self.settings = dataclasses.replace(self.settings, n_parallel=int(slots.group(1)))
        return self.settings

    def _shifting_flags(self, settings: SessionSettings, template: str | None) -> list[str] | None:
        """The shifting reference's command line: one slot, no host cache, no draft, the scenario's
        cache_reuse, the reference's build; None where the design shifts nothing (no cache_reuse, or
        memory that does not shift them, compare.shifts_chunks)."""
        if not settings.cache_reuse or not shifts_chunks(self.info.memory):
            return None
        alone = dataclasses.replace(settings, n_parallel=None, kv_unified=None, cache_ram=0, cache_idle_slots=None,
                                    slot_prompt_similarity=None, speculative=None)
        return server_flags(self.ref_caps, alone, True, template, "isolated")

    def _reset_in_place(self, flags: list[str], settings: SessionSettings) -> bool:
        """Empty the last scenario's subject instead of starting another, where the build lets us verify
        that this is what a fresh process gives: the same command line, one slot (several remember which
        was used last, and choose by it), no host-memory prompt cache (no endpoint of any build empties
        it, so with one on, the default, every scenario gets a new process), no draft model (its own
        context). The slot is erased (its tokens, its memory and, in builds that keep them in the
        prompt, its checkpoints; a checkpoint an older build left behind is past position 0 and goes
        with the next prompt's processing) and /slots must then say it holds no token."""
        subject = self.subject
        if (subject is None or self.server_url or subject.proc is None or subject.proc.poll() is not None
                or flags != self.subject_flags or self.slot_dir is None or settings.cache_ram != 0
                or self.settings is None or self.settings.n_parallel != 1 or settings.speculative is not None):
            return False
        t0 = time.perf_counter()
        try:
            subject.post("/slots/0?action=erase", {}, 10.0)
            slots = subject.http.get(f"{subject.url}/slots", timeout=10.0).json()
        except (EngineError, requests.RequestException, ValueError):
            return False
        finally:
            self.clock["reset (/slots erase, ours)"] += time.perf_counter() - t0
        if not isinstance(slots, list) or [s.get("n_prompt_tokens") for s in slots if isinstance(s, dict)] != [0]:
            return False  # a build whose /slots does not say so cannot be verified: restart
        for f in Path(self.slot_dir).iterdir():  # the last scenario's slot files are not this one's
            f.unlink()
        subject.new_log_lines()  # what the reset logged is not the next request's
        self.resets += 1
        return True

    def _request(self, server: ServerProcess, prompt: Prompt, n_predict: int, k: int, cache: bool,
                 id_slot: int | None = None) -> Completion:
        if id_slot is None:  # the server chooses, as for its users (a pinned request takes another path in some
            # builds: b9093 skips the host cache for it); the reference and an attached server of unknown slots: 0
            id_slot = 0 if not cache or self.server_url else -1
        common = {"temperature": 0.0, "cache_prompt": cache, "id_slot": id_slot, "seed": 0}
        said = ""
        if prompt.tokens is not None:
            tokens = list(prompt.tokens)
            body = server.post("/completion", {**common, "prompt": tokens, "n_predict": n_predict, "n_probs": k,
                                               "return_tokens": True}, self.timeout)
            probs = body.get("completion_probabilities", [])
            text = body.get("content", "")
        else:
            chat = self._chat_body(prompt)
            tokens = self._chat_tokens(server, chat)
            # an agent-loop prompt asks for the reply unparsed (reasoning_format none): the scenario says what of
            # it was reasoning; the conversation takes the reply as written either way (_as_written)
            body = server.post("/v1/chat/completions", {**common, **chat, "max_tokens": n_predict,
                                                        "logprobs": True, "top_logprobs": k}, self.timeout)
            choice = body["choices"][0]
            probs = (choice.get("logprobs") or {}).get("content") or []
            text = choice["message"].get("content") or ""
        # /completion returns the generated ids; its probabilities skip a token now and then (one
        # that ends inside a multi-byte character), so align them to the ids, leaving gaps empty
        out = body.get("tokens") or [p["id"] for p in probs]
        self._learn_pieces(probs)
        top: list[TopK] = []
        j = 0
        for tok in out:
            if j < len(probs) and probs[j]["id"] == tok:
                top.append([(t["id"], float(t["logprob"])) for t in probs[j]["top_logprobs"]])
                j += 1
            else:
                top.append([])
        if cache and self.settings.speculative is not None and k > 0:
            # drafted tokens come back without probabilities in some builds (logprob 0.0, no top-k):
            # those positions are compared by token alone, and the report says so
            blind = sum(1 for p in probs if not p.get("top_logprobs"))
            if blind:
                said = (f"; speculative decoding: the server reported no probabilities for {blind} of "
                        f"{len(out)} tokens (drafted ones), compared by token only")
        t = body.get("timings", {})
        # as in-process: a reply that ended on end-of-generation does not put that token in the conversation
        eog = body.get("stop_type") == "eos" or bool(body.get("stopped_eos")) or \
            (prompt.tokens is None and body["choices"][0].get("finish_reason") == "stop" and len(out) < n_predict)
        if prompt.tokens is None:
            text = _as_written(probs, len(out), eog, text)
        return Completion(tokens, out, text, top, int(t.get("cache_n", 0)), int(t.get("prompt_n", len(tokens))),
                          ends_with_eog=eog, inexact="llama-server batches a prompt its own way; that cannot be "
                                                    "replayed from outside" + said,
                          slot=body.get("id_slot") if isinstance(body.get("id_slot"), int) else None)

    def _learn_pieces(self, probs: list[dict]) -> None:
        """Every token a reply names comes with its piece's bytes (what /detokenize of it would say):
        kept, so the report's texts cost no request per token."""
        for p in probs:
            for t in (p, *p.get("top_logprobs", ())):
                if "bytes" in t and t["id"] not in self.pieces:
                    self.pieces[t["id"]] = bytes(t["bytes"]).decode(errors="replace")

    @staticmethod
    def _chat_body(prompt: Prompt) -> dict:
        """A chat prompt in OpenAI's words; an agent-loop one also asks for the reply as written."""
        options = prompt.chat_options()
        if options or any(len(m) > 2 for m in prompt.messages or ()):
            options["reasoning_format"] = "none"
        return {"messages": prompt.message_dicts(), **options}

    def _chat_tokens(self, server: ServerProcess, body: dict) -> list[int]:
        key = json.dumps(body, sort_keys=True) if self.shared_rendering else ""
        if key in self.rendered:  # the reference's, and a regeneration's: the same build renders them alike
            return self.rendered[key]
        text = server.post("/apply-template", body, self.timeout)["prompt"]
        tokens = server.post("/tokenize", {"content": text, "add_special": True, "parse_special": True},
                             self.timeout)["tokens"]
        if server is self.subject and key:
            if len(self.rendered) > 64:  # a parallel block's worth, and a scenario's latest prompts
                self.rendered.clear()
            self.rendered[key] = tokens
        return tokens

    def complete(self, prompt: Prompt, n_predict: int, top_k: int, id_slot: int | None = None) -> Completion:
        c = self._request(self.subject, prompt, n_predict, top_k, cache=True, id_slot=id_slot)
        t0 = time.perf_counter()
        lines = self.subject.new_log_lines(until="stop processing")
        c.events = parse_events(lines)
        if c.slot is None:  # the chat API does not say which slot served it; the log does
            c.slot = next((t.slot for t in split_by_task(lines).values()), None)
        self.clock["log: waiting for and parsing (ours)"] += time.perf_counter() - t0
        return c

    def complete_parallel(self, requests: list[tuple[Prompt, int, int, int | None]]) -> list[Completion]:
        """All at once from threads of ours; each reply's events are its slot's log lines."""
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            futures = [pool.submit(self._request, self.subject, p, n, k, True, slot) for p, n, k, slot in requests]
            done = [f.result() for f in futures]
        tasks = split_by_task(self.subject.new_log_lines(until="stop processing", count=len(requests)))
        for c in done:  # a reply's task: the one whose prompt had its length (and ran on its slot, where known)
            mine = [t for t in tasks.values() if t.n_tokens == len(c.prompt_tokens) and c.slot in (None, t.slot)]
            if len(mine) == 1:
                c.slot, c.events = mine[0].slot, parse_events(mine[0].lines)
            else:  # two prompts of one length: their events cannot be told apart, so none is judged
                c.events = []
                c.inexact += "; its cache events could not be told from another request's of the same length"
        return done

    def slot_action(self, action: str, file: str | None, id_slot: int) -> int:
        """Through /slots (the subject was started with --slot-save-path in a directory of ours)."""
        if self.server_url:
            raise Unsupported("slot: steps need a llama-server we start (its files go in a directory of ours)")
        if self.slot_dir is None:
            raise Unsupported(f"llama-server {self.caps.version} has no --slot-save-path")
        if action == "damage":
            return damage(Path(self.slot_dir) / file)
        body = {"filename": file} if file else {}
        said = self.subject.post(f"/slots/{id_slot}?action={action}", body, self.timeout)
        self.subject.new_log_lines()  # what the action logged is not the next request's
        return int(said.get({"save": "n_saved", "restore": "n_restored", "erase": "n_erased"}[action], -1))

    def _reference_server(self, flags: list[str]) -> ServerProcess:
        key = tuple(flags)
        ref = self.refs.pop(key, None)
        if ref is not None and (ref.proc is None or ref.proc.poll() is not None):
            ref.close()
            ref = None
        if ref is None:
            while len(self.refs) >= _REFERENCES_KEPT:
                self.refs.pop(next(iter(self.refs))).close()
            ref = ServerProcess(self.reference_bin or self.binary, self.path, flags,
                                f"{self.name} reference server", clock=self.clock)
            ref.start()
        self.refs[key] = ref  # the most recently used last
        return ref

    def reference(self, prompt: Prompt, n_predict: int, top_k: int, held: list[int] | None = None) -> Completion:
        if not held or self.shifting_flags is None:
            return self._request(self.ref, prompt, n_predict, top_k, cache=False)
        # cache_reuse: the subject shifted chunks of `held` into place, so the answer is what they give. The
        # shifting reference gets `held` processed afresh (unless it holds it already: a conversation's turns
        # in a row keep its chunks as they were shifted), then the prompt; the same chunks move. Its build
        # shifts them its own way: a subject that moves them elsewhere, or keeps what it should not, differs.
        ref = self._reference_server(self.shifting_flags)
        afresh = self.shifting_held != held
        if afresh:  # uncached: its slot drops what it held and processes `held` in full
            self._request(ref, Prompt(tokens=tuple(held)), 1, 0, cache=False)
        done = self._request(ref, prompt, n_predict, top_k, cache=True, id_slot=0)
        self.shifting_held = done.prompt_tokens + done.tokens[:-1]
        done.inexact += (f"; cache_reuse {self.settings.cache_reuse}: the reference shifted the same chunks, from the "
                         + (f"slot's {len(held)} tokens processed afresh" if afresh else
                            "conversation's earlier turns as it played them"))
        return done

    def score(self, prompt: Prompt, tokens: list[int], top_k: int) -> None:
        return None  # llama-server has no prompt logprobs: no teacher forcing

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.ref.post("/tokenize", {"content": text, "add_special": add_special, "parse_special": True},
                             self.timeout)["tokens"]

    def detokenize(self, tokens: list[int]) -> list[str]:
        for t in dict.fromkeys(tokens):  # each token of the vocabulary asked once
            if t not in self.pieces:
                self.pieces[t] = self.ref.post("/detokenize", {"tokens": [t]}, self.timeout)["content"]
        return [self.pieces[t] for t in tokens]

    def close(self) -> None:
        # also called from the main thread on Ctrl-C while a pool thread starts a reference server:
        # take what is there, never iterate what the other thread changes
        self.close_subject()
        refs, self.refs = self.refs, {}
        for ref in list(refs.values()):
            ref.close()
        self.ref = None

    def close_subject(self) -> None:
        subject, self.subject = self.subject, None
        if subject is not None:
            subject.close()
        slot_dir, self.slot_dir = self.slot_dir, None
        if slot_dir is not None:
            rundir.discard(slot_dir)
