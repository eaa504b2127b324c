"""Every way of stopping a run stops every process it started, at every moment, and keeps the report.

INT, TERM and HUP run one cleanup (exit 130 / 143 / 129); KILL leaves no last word, so the kernel
ends our children (a parent-death signal, passed on by the engines' fork server). Each run is
tagged through its environment, so every process it started can be found, reparented or not.
"""

import functools
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from llama_cachecheck import fixtures, results
from llama_cachecheck.processes import Stopped, die_with_parent, stop_on_signals

SIGNALS = [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGKILL, -9)]


def tagged(tag: str) -> list[str]:
    """Processes whose environment carries the run's tag, with their command lines."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"CACHECHECK_TEST_TAG={tag}".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except OSError:
            continue
    return found


def stop_at(tmp_path, moment, sig, *run_args) -> tuple[subprocess.Popen, str]:
    """Start a run, wait for `moment` (a predicate on the run's processes), send `sig`."""
    tag = uuid.uuid4().hex
    (tmp_path / "report.html").write_text("the previous report")
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cachecheck.cli", "run", *run_args,
                             "--report-dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CACHECHECK_TEST_TAG": tag, "TMPDIR": str(tmp_path / "tmp")})
    deadline = time.monotonic() + 120
    while not moment(tagged(tag)) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None and moment(tagged(tag)), "the run never reached the moment"
    proc.send_signal(sig)
    return proc, tag


def servers(n):
    return lambda procs: sum("llama-server" in p.split()[0] for p in procs) >= n


def worker_running(procs):
    return sum("multiprocessing.forkserver" in p for p in procs) >= 2  # the fork server and a worker from it


def check_stopped(proc, tag, sig, code, report_dir):
    proc.wait(30)
    said = proc.stderr.read()
    assert proc.returncode == code, said
    if sig != signal.SIGKILL:  # SIGKILL leaves no last word
        assert ("interrupted" if sig == signal.SIGINT else f"stopped by {sig.name}") in said
    deadline = time.monotonic() + 10
    while tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not tagged(tag), tagged(tag)
    assert (report_dir / "report.html").read_text() == "the previous report"
    ours = [d.name for d in (report_dir / "tmp").iterdir() if d.name.startswith("cachecheck")]
    if sig == signal.SIGKILL:  # no code of ours runs: the run's one log directory stays, nothing beside it
        assert len(ours) == 1 and ours[0].startswith("cachecheck-run-"), ours
    else:
        assert ours == []


@pytest.mark.parametrize("moment, wait", [("booting", 1), ("mid-request", 2)])
@pytest.mark.parametrize("sig, code", SIGNALS)
def test_server_engine_stopped_while_booting_or_mid_request_leaves_no_process(server_bin, tmp_path, sig, code,
                                                                               moment, wait):
    # booting: the subject server has started, not yet healthy; mid-request: subject and reference both up
    path = str(fixtures.build_all(["jamba"])[0].path)
    proc, tag = stop_at(tmp_path, servers(wait), sig, "--engine", "server", "--server-bin", server_bin, "--model",
                        path)
    check_stopped(proc, tag, sig, code, tmp_path)


@pytest.mark.parametrize("sig, code", SIGNALS)
def test_in_process_engine_stopped_mid_run_leaves_no_worker(tmp_path, sig, code):
    proc, tag = stop_at(tmp_path, worker_running, sig, "--model", "fixture:gemma3", "--model", "fixture:jamba")
    check_stopped(proc, tag, sig, code, tmp_path)


def test_a_child_whose_parent_died_before_it_could_say_so_ends_at_once():
    # a parent killed between fork and prctl: the child reads another parent than the one that forked
    # it and must not run on (a llama-server did outlive a SIGKILLed run before the pid was taken
    # before the fork)
    child = subprocess.Popen(["sleep", "30"], preexec_fn=functools.partial(die_with_parent, os.getpid() + 1))
    assert child.wait(10) == 1
    alive = subprocess.Popen(["sleep", "0.1"], preexec_fn=functools.partial(die_with_parent, os.getpid()))
    assert alive.wait(10) == 0


def test_a_signal_while_publishing_waits_for_the_pair(tmp_path, monkeypatch):
    # mid-write: TERM arrives between the two renames; both files end up new, then the run stops
    old = {tmp_path / "results.json": "old results", tmp_path / "report.html": "old report"}
    for p, text in old.items():
        p.write_text(text)
    real_replace = os.replace

    def signalled_replace(src, dst):
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    stop_on_signals()
    monkeypatch.setattr(os, "replace", signalled_replace)
    try:
        with pytest.raises(Stopped):
            results.publish({tmp_path / "results.json": "new results", tmp_path / "report.html": "new report"})
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGHUP, before[1])
    assert {p.name: p.read_text() for p in old} == {"results.json": "new results", "report.html": "new report"}
