"""cachecheck as an installed tool: a wheel in a fresh venv works from an empty directory,
and the pytest plugin works from anywhere and under pytest-xdist."""

import site
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import run_bounded

from llama_cachecheck import fixtures
from llama_cachecheck.results import read as read_results

pytestmark = [pytest.mark.pypi, pytest.mark.slow]  # a wheel installed in a fresh venv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, installed (without dependencies) into a new venv that borrows ours for them."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q",
                    "-w", str(tmp / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("llama_cachecheck-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (new_site,) = venv.glob("lib/python*/site-packages")
    # llama-cpp-python and the rest come from our venv; not the editable harness (its finder is not loaded
    # from a .pth-added directory), so the package under test is the wheel's
    (new_site / "borrowed.pth").write_text(site.getsitepackages()[0] + "\n")
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    empty = tmp / "empty"
    empty.mkdir()
    return venv, empty


def test_the_wheel_runs_the_bundled_scenarios_from_an_empty_directory(installed):
    venv, empty = installed
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import llama_cachecheck; print(llama_cachecheck.__file__)"],
                           capture_output=True, text=True, cwd=empty, check=True).stdout
    assert where.startswith(str(venv)), where  # the installed package, not this checkout
    p = run_bounded([str(venv / "bin" / "cachecheck"), "run", "seed-regenerate", "--model", "fixture:jamba",
                     "--report-dir", "out"], cwd=empty)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = read_results(empty / "out" / "results.json")
    assert doc["counts"] == {"PASS": 1} and doc["results"][0]["path"].startswith(str(venv))
    assert (empty / "out" / "report.html").is_file()
    assert sorted(p.name for p in empty.iterdir()) == ["out"]  # caches go to the user's cache directory


def test_the_installed_pytest_plugin_takes_gguf_from_any_directory(installed):
    venv, empty = installed
    jamba = fixtures.build_all(["jamba"])[0].path
    p = run_bounded([str(venv / "bin" / "python"), "-m", "pytest", "--gguf", str(jamba), "-k", "seed", "-q",
                     "-p", "no:cacheprovider"], cwd=empty)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 passed" in p.stdout


def test_xdist_workers_share_out_the_items_and_the_controller_writes_one_report(tmp_path):
    p = run_bounded([sys.executable, "-m", "pytest", "-n", "2", str(REPO / "scenarios"), "-k",
                     "seed or (long-prompt and not slots and not spec)", "--report-dir", str(tmp_path / "rep"), "-q",
                     "-p", "no:cacheprovider"], cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    passed = int(p.stdout.split(" passed")[0].split()[-1])
    doc = read_results(tmp_path / "rep" / "results.json")
    names = [(c["scenario"], c["model"]) for c in doc["results"]]
    assert len(names) == passed == len(set(names)) == 22  # 2 scenarios x 11 fixtures, each once
    assert doc["counts"] == {"PASS": 22}
    assert "cachecheck report:" in p.stdout


def test_the_plugin_costs_a_project_that_does_not_use_it_no_heavy_import(tmp_path):
    """The pytest11 entry point loads in every pytest session of an environment with cachecheck: it
    must not pull numpy, gguf or llama.cpp into a project that never asks for a scenario."""
    (tmp_path / "test_other.py").write_text(
        "import sys\n\n"
        "def test_nothing_heavy_was_imported():\n"
        "    assert 'llama_cachecheck.pytest_plugin' in sys.modules  # the plugin did load\n"
        "    assert not {'numpy', 'gguf', 'llama_cpp'} & set(sys.modules), sorted(\n"
        "        m for m in ('numpy', 'gguf', 'llama_cpp') if m in sys.modules)\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
