"""cachecheck repro: a finding as a directory that needs nothing but llama-server and python3's standard library."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import cli

# the interpreter without our venv, and `-I -S`: no site-packages at all, no PYTHONPATH, no user site; the script
# can import the standard library and nothing else
BARE = [str(Path(sys.base_prefix) / "bin" / "python3"), "-I", "-S"]


def reproduce(directory: Path, server: str, plant: str = "") -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", **({"CACHECHECK_PLANT": plant} if plant else {})}
    return subprocess.run([*BARE, str(directory / "repro.py"), server], capture_output=True, text=True,
                          cwd=directory.parent, env=env, timeout=600)


def test_a_crash_reproduces_with_the_server_binary_and_the_standard_library_alone(server_bin, tmp_path):
    out = tmp_path / "f12"
    p = cli("repro", "spec-ngram-batch-overflow", "--model", "fixture:llama", "--engine", "server", "--server-bin",
            server_bin, "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("ERROR spec-ngram-batch-overflow [fixture:llama]: subject server died: "
                               "server-context.cpp:508: GGML_ASSERT(add_ok")
    names = sorted(f.name for f in out.iterdir())
    assert names[:2] == ["ISSUE.md", "case.json"] and names[2].endswith(".gguf") and names[3:] == ["repro.py", "run.sh"]
    r = reproduce(out, server_bin)
    assert r.returncode == 1 and r.stdout.count("\n") == 1, r.stdout + r.stderr
    assert r.stdout.startswith("BUG: the server died (signal SIGABRT) during /completion: server-context.cpp:508: "
                               'GGML_ASSERT(add_ok && "batch must be large enough'), r.stdout
    issue = (out / "ISSUE.md").read_text()
    for field in ("### Name and Version", "### Operating systems", "### Command line", "### First Bad Commit",
                  "### Problem description & steps to reproduce", "### Relevant log output"):
        assert field in issue
    assert "-b 17 -ub 8 --spec-type ngram-simple" in issue and "finding 12:" in issue
    # the same requests with a batch that holds the drafts: nothing to see, and the script says so
    case = json.loads((out / "case.json").read_text())
    case["subject_args"][case["subject_args"].index("-b") + 1] = "64"
    (out / "case.json").write_text(json.dumps(case))
    r = reproduce(out, server_bin)
    assert r.returncode == 0 and r.stdout.startswith("NOT REPRODUCED: "), r.stdout + r.stderr


@pytest.mark.build
def test_a_wrong_answer_reproduces_on_the_build_that_has_it_and_not_on_one_without(planted_server, tmp_path):
    """The planted restore off by one (the same binary without the switch is the pinned code): the case's
    request is judged against a second server of the same build with every cache off, fed the same token ids."""
    out = tmp_path / "planted"
    p = cli("repro", "seed-regenerate", "--model", "fixture:jamba", "--engine", "server", "--server-bin",
            planted_server, "--out", str(out), env={**os.environ, "CACHECHECK_PLANT": "restore-off-by-one"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("FAIL seed-regenerate [fixture:jamba]: turn "), p.stdout
    case = json.loads((out / "case.json").read_text())
    assert [s["judge"] for s in case["steps"] if "judge" in s] == [{"kind": "answer"}]
    bad = reproduce(out, planted_server, plant="restore-off-by-one")
    assert bad.returncode == 1 and bad.stdout.startswith("BUG: wrong answer at request "), bad.stdout + bad.stderr
    good = reproduce(out, planted_server)
    assert good.returncode == 0 and good.stdout.startswith("NOT REPRODUCED: "), good.stdout + good.stderr


@pytest.mark.parametrize("args, said", [
    (["seed-regenerate", "--model", "fixture:llama"], "repro writes what a llama-server of ours was sent: it needs "
                                                      "--engine server"),
    (["seed-regenerate", "--model", "fixture:llama", "--engine", "server"], "seed-regenerate on fixture:llama: PASS "
                                                                           "on llama-server"),
    (["swa-long-chat-edit", "--model", "fixture:llama", "--engine", "server"], "swa-long-chat-edit on fixture:llama: "
                                                                              "the engine cannot play it (needs swa "
                                                                              "memory)"),
])
def test_a_case_with_nothing_to_reproduce_is_one_line_and_exit_2(server_bin, tmp_path, args, said):
    binary = ["--server-bin", server_bin] if "server" in args else []
    p = cli("repro", *args, *binary, "--out", str(tmp_path / "r"))
    assert p.returncode == 2 and p.stdout == "", p.stdout
    assert len(p.stderr.strip().splitlines()) == 1 and said in p.stderr, p.stderr
    assert not (tmp_path / "r").exists()
