"""What a long run does to the machine: memory, open files, processes, temp files (Linux /proc).

A soak plays thousands of scenarios; a harness or a server that leaks a little per scenario is
found only this way. cachecheck (with its engine workers) is measured as one; each llama-server is
measured on its own, since a subject lives for one scenario and a reference for the whole run.
"""

from __future__ import annotations

import contextlib
import multiprocessing.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .engines.capabilities import REFERENCE_ALIAS


@dataclass(frozen=True)
class Footprint:
    rss_mb: float  # cachecheck and every process under it but the llama-servers
    fds: int  # cachecheck's open files (sockets left out)
    processes: int  # processes under cachecheck
    temp_files: int  # worker logs and server logs of ours in the (soak's own) temp directory
    servers: dict[int, tuple[str, float]] = field(default_factory=dict)  # pid -> (what it serves, RSS MB)

    def __str__(self) -> str:
        servers = f", {len(self.servers)} llama-server {sum(r for _, r in self.servers.values()):.0f} MB" \
            if self.servers else ""
        return (f"RSS {self.rss_mb:.0f} MB, {self.fds} open files, {self.processes} child processes, "
                f"{self.temp_files} temp files{servers}")

    def as_dict(self) -> dict:
        return {"rss_mb": round(self.rss_mb, 1), "fds": self.fds, "processes": self.processes,
                "temp_files": self.temp_files,
                "servers": [{"pid": pid, "serves": name, "rss_mb": round(rss, 1)}
                            for pid, (name, rss) in sorted(self.servers.items())]}


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _server_of(pid: int) -> str | None:
    """`llama-server MODEL (subject|reference)` for a llama-server process, else None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not argv or not argv[0].endswith("llama-server"):
        return None
    model = Path(argv[argv.index("-m") + 1]).stem if "-m" in argv[:-1] else "?"
    # the reference is named so (capabilities.reference_flags)
    named = any(a in ("--alias", "-a") and b == REFERENCE_ALIAS for a, b in zip(argv, argv[1:], strict=False))
    role = "reference" if named else "subject"
    return f"{model} {role}"


def footprint() -> Footprint:
    """Linux /proc figures for this process and everything it started."""
    me = os.getpid()
    kids = _descendants(me)
    servers = {p: (name, _rss_mb(p)) for p in kids if (name := _server_of(p)) is not None}
    temp = [p for p in Path(tempfile.gettempdir()).rglob("*") if p.is_file()]
    return Footprint(sum(_rss_mb(p) for p in [me, *kids] if p not in servers), _files(me), len(kids), len(temp),
                     servers)


def _files(pid: int) -> int:
    """Open files but sockets: a server's HTTP connections come and go with its keep-alive pool."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # closed meanwhile
    return n


def leaks(before: Footprint, warm: Footprint, end: Footprint, after: Footprint, *, servers_kept: int = 0) -> list[str]:
    """What grew between the warm baseline and the end, and what stayed behind after the run.

    RSS may grow within 10 % + 20 MB (measured: a worker makes contexts of new batch shapes for a while).
    A llama-server is judged where the same process is seen at both points (a reference lives all run).
    llama-servers are counted apart from the other processes: an engine keeps a subject and up to a few
    references (one per set of flags the scenarios asked for, the latest kept), so a reference started after
    the warm mark for flags not seen before is no leak, while more servers than the engines keep
    (`servers_kept`) is; every other process must not grow at all.
    After the run, only multiprocessing's fork server and resource tracker may stay (they are this process's)."""
    out = []
    if end.rss_mb > warm.rss_mb * 1.10 + 20:
        out.append(f"memory of cachecheck grew from {warm.rss_mb:.0f} to {end.rss_mb:.0f} MB")
    for pid, (name, rss) in end.servers.items():
        if pid in warm.servers and rss > warm.servers[pid][1] * 1.10 + 20:
            out.append(f"llama-server {name} (pid {pid}) grew from {warm.servers[pid][1]:.0f} to {rss:.0f} MB")
    if end.fds > warm.fds:
        out.append(f"open files grew from {warm.fds} to {end.fds}")
    others = (warm.processes - len(warm.servers), end.processes - len(end.servers))
    if others[1] > others[0]:
        out.append(f"processes other than llama-servers grew from {others[0]} to {others[1]}")
    if len(end.servers) > max(servers_kept, len(warm.servers)):
        out.append(f"{len(end.servers)} llama-servers ran at the end, more than the {servers_kept} the engines keep")
    if after.servers:
        out.append(f"{len(after.servers)} llama-server(s) left running")
    if after.temp_files > before.temp_files:
        out.append(f"{after.temp_files - before.temp_files} temp files left behind")
    return out


@contextlib.contextmanager
def own_temp_dir() -> Iterator[Path]:
    """A temp directory for this run and every process it starts, so that what is left there is ours."""
    multiprocessing.util.get_temp_dir()  # its own (the fork server's socket) stays where it was, for the process
    path = Path(tempfile.mkdtemp(prefix="cachecheck-soak-"))
    old_env, old_default = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(path), str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = old_default
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
        shutil.rmtree(path, ignore_errors=True)
