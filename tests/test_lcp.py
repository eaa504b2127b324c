"""--engine llama-cpp-python: the high-level Llama's own prompt cache (its prefix match in generate, and
LlamaRAMCache / LlamaDiskCache on top) against a second Llama that processes every prompt in full."""

import json
import os
import shlex
import shutil
from pathlib import Path

import llama_cpp
import pytest
from clirun import cli

from llama_cachecheck import pins
from llama_cachecheck.results import read as read_results

PICK = "multi-turn-extend or regenerate-first-reply or swa-regenerate-long-reply or long-prompt"


def _run(tmp_path: Path, *args: str, env: dict | None = None) -> tuple:
    out = tmp_path / "r.json"
    p = cli("run", "-k", PICK, "--engine", "llama-cpp-python", *args, "--json", str(out), "--report-dir",
            str(tmp_path), env=None if env is None else {**os.environ, **env})
    return p, (read_results(out) if out.exists() else {})


@pytest.mark.parametrize("cache", ["ram", "disk", "none"])
def test_the_pinned_release_reuses_its_prefix_and_answers_as_a_full_re_process(tmp_path, cache):
    p, doc = _run(tmp_path, "--lcp-cache", cache, "--model", "fixture:llama", "--model", "fixture:jamba")
    assert p.returncode == 0, p.stdout[-3000:]
    res = [r for r in doc["results"] if r["status"] != "SKIP"]  # swa-regenerate-long-reply: SWA memory only
    assert {r["status"] for r in res} <= {"PASS", "NOISE"} and sum(r["status"] == "PASS" for r in res) >= 6
    llama = [t for r in res if r["model"] == "fixture:llama" for t in r["turns"]]
    assert all(t["reused"] >= t["promised_reuse"] for t in llama)
    assert sum(t["promised_reuse"] > 0 for t in llama) >= 4  # a regeneration keeps all but the prompt's last token
    assert all(t["reference"]["tokens"] for t in llama)
    assert doc["builds"] == [f"llama-cpp-python {pins.LLAMA_CPP_PYTHON_VERSION} (Llama, cache {cache})"]
    assert doc["builds"][0] in (tmp_path / "report.html").read_text()  # the report's header names the release
    assert f"--lcp-cache {cache}" in res[0]["replay"] and "--engine llama-cpp-python" in res[0]["replay"]
    if cache == "disk":  # the replay command plays the case again the same way
        out = tmp_path / "again.json"
        again = cli(*shlex.split(res[0]["replay"])[1:], "--json", str(out), "--report-dir", str(tmp_path / "again"))
        case = read_results(out)["results"][0]
        assert again.returncode == 0 and (case["scenario"], case["model"], case["status"]) == \
            (res[0]["scenario"], res[0]["model"], res[0]["status"])
        assert [t["subject"]["tokens"] for t in case["turns"]] == [t["subject"]["tokens"] for t in res[0]["turns"]]


def test_every_fixture_loads_and_only_prefix_reuse_past_a_sliding_window_fails(tmp_path):
    """Finding 14 (README): generate keeps the prefix of an SWA cache whose window cells are gone."""
    p, doc = _run(tmp_path, "--model", "all")
    assert p.returncode == 1, p.stdout[-3000:]
    ran = [r for r in doc["results"] if r["status"] != "SKIP"]
    assert {r["model"] for r in ran} == {r["model"] for r in doc["results"]} and len({r["model"] for r in ran}) == 11
    bad = {(r["model"], r["scenario"]) for r in ran if r["status"] not in ("PASS", "NOISE")}
    assert bad == {("fixture:gemma2", "swa-regenerate-long-reply"), ("fixture:gemma3", "swa-regenerate-long-reply")}
    for r in ran:
        if (r["model"], r["scenario"]) in bad:
            assert r["status"] == "FAIL" and r["turns"][1]["reused"] > 0, r["reason"]


def test_bad_lcp_options_are_one_line(tmp_path):
    for args, said in ((["--lcp-version", "abc"], "expected a release number"),
                       (["--lcp-version", "9.9.9"], "PyPI has no llama-cpp-python 9.9.9"),
                       (["--lcp-cache", "cloud"], "invalid choice: 'cloud'")):
        p, _ = _run(tmp_path, *args, "--model", "fixture:llama", env={"CACHECHECK_SERVER_CACHE": str(tmp_path)})
        assert p.returncode == 2 and p.stdout == "", (args, p.stdout[-500:])
        assert said in p.stderr and p.stderr.strip().splitlines()[-1].startswith("cachecheck: error:"), p.stderr
    p = cli("run", "--engine", "server", "--lcp-version", "0.3.9")
    assert p.returncode == 2 and "--lcp-version needs --engine llama-cpp-python" in p.stderr


def test_another_release_runs_from_its_own_venv(tmp_path):
    """The venv of another release, as `lib venv` records it, is what the engine imports: recorded here
    with a copy of the pinned package that names itself 0.3.0-recorded (CI compiles no release)."""
    home = tmp_path / "lcp" / "llama-cpp-python-0.3.0"
    site = home / "venv" / "lib" / "python3" / "site-packages"
    package = site / "llama_cpp"
    shutil.copytree(Path(llama_cpp.__file__).parent, package)
    init = package / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{llama_cpp.__version__}"',
                                             '__version__ = "0.3.0-recorded"'))
    (home / "installed.json").write_text(json.dumps({"version": "0.3.0", "site": str(site)}))
    p, doc = _run(tmp_path, "--lcp-version", "0.3.0", "--model", "fixture:llama",
                  env={"CACHECHECK_SERVER_CACHE": str(tmp_path)})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-1000:]
    assert doc["builds"] == ["llama-cpp-python 0.3.0-recorded (Llama, cache ram)"]
    assert {r["status"] for r in doc["results"]} <= {"PASS", "NOISE", "SKIP"}
    assert "--lcp-version 0.3.0 " in doc["results"][0]["replay"]
    venv = cli("lib", "venv", "--lcp-version", "0.3.0", env={**os.environ, "CACHECHECK_SERVER_CACHE": str(tmp_path)})
    assert venv.returncode == 0 and venv.stdout.strip() == str(site)  # recorded: nothing is built again
