"""--engine openai: an OpenAI-compatible server under test, a second instance with its cache off as the
reference. Real processes: the pinned llama-server, and llama-cpp-python's own server (llama_cpp.server)."""

import shlex
import socket
import subprocess
import sys
import time

import pytest
import requests
from clirun import cli

from llama_cachecheck import fixtures
from llama_cachecheck.engines.server_process import ServerProcess
from llama_cachecheck.results import read as read_results

CHATS = "multi-turn-extend or edit-middle-turn or regenerate-first-reply or agent-tool-loop or slots-primer"


@pytest.fixture
def llama_servers(server_bin):
    """Subject (the build's defaults: cache on), reference (cache off), and one more with its cache off to
    stand as a subject whose cache never engages; all on fixture llama, all stopped after the test."""
    model = str(fixtures.build_all(["llama"])[0].path)
    made = [ServerProcess(server_bin, model, flags, name) for flags, name in (
        (["-c", "8192"], "openai subject"),
        (["-np", "1", "--no-cache-prompt", "--cache-ram", "0"], "openai reference"),
        (["-c", "8192", "--no-cache-prompt"], "openai subject without cache"))]
    try:
        for s in made:
            s.start()
        yield [s.url for s in made]
    finally:
        for s in made:
            s.close()


def _run(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "r.json"
    p = cli("run", "-k", CHATS, "--engine", "openai", *args, "--json", str(out), "--report-dir", str(tmp_path))
    return p, (read_results(out) if out.exists() else {})


def test_llama_server_behind_the_openai_api_passes_and_reuses(llama_servers, tmp_path):
    subject, reference, _ = llama_servers
    p, doc = _run(tmp_path, "--url", subject, "--reference-url", reference, "--model", "fixture:llama")
    assert p.returncode == 0, p.stdout[-3000:]
    res = doc["results"]
    assert len(res) == 5 and {r["status"] for r in res} <= {"PASS", "NOISE"}
    turns = [t for r in res for t in r["turns"]]
    assert all(t["reference"]["tokens"] or t["subject"]["tokens"] == [] for t in turns)  # compared (a primer: none)
    assert sum(t["reused"] > 0 for t in turns) >= len(turns) - len(res)  # every turn after the first reused
    assert all("OpenAI-compatible server" in t["rule"] for t in turns)
    assert subject in doc["builds"][0] and reference in doc["builds"][0]  # the header names both servers
    assert f"OpenAI-compatible server at {subject}" in (tmp_path / "report.html").read_text()
    replay = res[0]["replay"]
    assert f"--url {subject}" in replay and f"--reference-url {reference}" in replay and "--model-name" in replay
    out = tmp_path / "again.json"  # the replay command plays the case again the same way
    again = cli(*shlex.split(replay)[1:], "--json", str(out), "--report-dir", str(tmp_path / "again"))
    case = read_results(out)["results"][0]
    assert again.returncode == 0 and (case["scenario"], case["status"]) == (res[0]["scenario"], res[0]["status"])


def test_a_server_whose_cache_never_engages_is_lost_reuse(llama_servers, tmp_path):
    _, reference, uncached = llama_servers
    p, doc = _run(tmp_path, "--url", uncached, "--reference-url", reference)
    assert p.returncode == 1, p.stdout[-3000:]
    res = doc["results"]
    assert {r["model"] for r in res} == {f"openai:{fixtures.build_all(['llama'])[0].path}"}  # the served model
    assert {r["status"] for r in res} == {"LOST-REUSE"}
    assert all("cache not engaged" in r["reason"] for r in res)
    assert all(t["reused"] == 0 for r in res for t in r["turns"])


def test_bad_urls_and_names_are_one_line(llama_servers, tmp_path):
    subject, reference, _ = llama_servers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    for args, said in (
        (["--url", closed, "--reference-url", reference], f"{closed}: not an OpenAI-compatible server"),
        (["--url", f"{subject}/health", "--reference-url", reference], "not an OpenAI-compatible server"),
        (["--url", subject, "--reference-url", reference, "--model-name", "nope"],
         "does not serve --model-name 'nope'"),
        (["--url", subject], "needs --url (the server under test) and --reference-url"),
    ):
        p, _ = _run(tmp_path, *args)
        assert p.returncode == 2 and p.stdout == "", (args, p.stdout[-500:])
        assert p.stderr.startswith("cachecheck: error: ") and said in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1


def _lcp_server(model: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(port),
                             "--n_ctx", "4096"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"llama_cpp.server did not answer on port {port} (exit {proc.poll()})")


def test_llama_cpp_python_s_own_server_passes_and_says_it_reports_no_reuse(tmp_path):
    pytest.importorskip("fastapi", reason="llama_cpp.server needs the dev extras (fastapi, uvicorn, ...)")
    model = str(fixtures.build_all(["llama"])[0].path)
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    procs = [_lcp_server(model, port) for port in ports]
    try:
        p, doc = _run(tmp_path, "--url", f"http://127.0.0.1:{ports[0]}", "--reference-url",
                      f"http://127.0.0.1:{ports[1]}", "--model", "fixture:llama")
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert p.returncode == 0, p.stdout[-3000:]
    res = doc["results"]
    assert len(res) == 5 and {r["status"] for r in res} <= {"PASS", "NOISE"}
    rules = {t["rule"] for r in res for t in r["turns"]}
    assert all("reports no cached tokens, so its reuse is not judged" in rule for rule in rules)
    assert all("follows one that shares nothing" in rule for rule in rules)
