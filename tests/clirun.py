"""The one way the tests run `cachecheck` as a user does: a separate process, output captured, bounded.

Bounded by progress, not by the clock: a run on a machine that also compiles llama.cpp can take
three times as long and is still a run. A run that neither prints nor spends CPU time (its own or
its children's: workers, llama-servers) for `quiet` seconds is stuck; it is killed, and the failure
says so.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

QUIET = 600.0  # seconds without output or CPU time: stuck


def _tree_cpu(root: int) -> int:
    """Clock ticks of CPU spent by `root` and every live descendant (and the children it reaped)."""
    parent, ticks = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[int(pid)] = int(fields[1])
        ticks[int(pid)] = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(p for p, pp in parent.items() if pp == pid)
    return total


def run_bounded(cmd: list[str], quiet: float = QUIET, **popen) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen)
    out: dict[str, list[str]] = {"stdout": [], "stderr": []}
    readers = [threading.Thread(target=lambda s=s, f=f: out[s].extend(iter(f.readline, "")), daemon=True)
               for s, f in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for r in readers:
        r.start()
    seen, last_change, wait = None, time.monotonic(), 0.01
    try:
        while True:
            try:
                proc.wait(wait)  # most runs end within a second: look often at first
                break
            except subprocess.TimeoutExpired:
                wait = min(1.0, wait * 2)
            now = (len(out["stdout"]), len(out["stderr"]), _tree_cpu(proc.pid))
            if now != seen:
                seen, last_change = now, time.monotonic()
            elif time.monotonic() - last_change > quiet:
                raise AssertionError(f"{' '.join(cmd[2:])}: stuck, killed after {quiet:.0f} s without output or CPU "
                                     f"time (a progress bound, not a time limit); stderr: "
                                     f"{''.join(out['stderr'])[-2000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for r in readers:
        r.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out["stdout"]), "".join(out["stderr"]))


def cli(*args: str, quiet: float = QUIET, **popen) -> subprocess.CompletedProcess:
    return run_bounded([sys.executable, "-m", "llama_cachecheck.cli", *args], quiet, **popen)
