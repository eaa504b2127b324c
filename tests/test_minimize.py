"""`cachecheck minimize`: the smallest scenario that still fails the same way, written and linked."""

import os
import signal
import subprocess
import sys

import pytest
from clirun import cli

from llama_cachecheck import scenario
from llama_cachecheck.results import read as read_results
from llama_cachecheck.scenario import BUNDLED, discover, load


def played(path, *extra):
    """The one case of a scenario run on jamba: its status and reason."""
    p = cli("run", str(path), "--model", "fixture:jamba", "--report-dir", str(path.parent / "rep"), *extra)
    (case,) = read_results(path.parent / "rep" / "results.json")["results"]
    return p, case


def test_every_bundled_scenario_is_written_back_as_yaml_the_loader_reads_the_same(tmp_path):
    for sc in discover([BUNDLED]):
        path = tmp_path / f"{sc.name}.yaml"
        path.write_text(scenario.dump(sc))
        back = load(path)
        assert (back.steps, back.settings, back.sampling, back.expect, back.requires, back.tags, back.purpose) == \
            (sc.steps, sc.settings, sc.sampling, sc.expect, sc.requires, sc.tags, sc.purpose), sc.name


@pytest.fixture(scope="module")
def minimized(tmp_path_factory):
    out = tmp_path_factory.mktemp("min")
    # a run's report first: minimize then links its failing case to the smaller scenario
    cli("run", str(BUNDLED / "seed-regenerate.yaml"), "--model", "fixture:jamba", "--fault", "no-restore",
        "--report-dir", str(out))
    p = cli("minimize", str(BUNDLED / "seed-regenerate.yaml"), "--model", "jamba", "--fault", "no-restore",
            "--report-dir", str(out))
    return p, out


def test_seed_regenerate_under_no_restore_shrinks_and_says_each_step(minimized):
    p, out = minimized
    assert p.returncode == 0, p.stdout + p.stderr
    assert "minimizing seed-regenerate on fixture:jamba: FAIL, tokens diverge (7 steps, 5 requests" in p.stdout
    assert "dropped step" in p.stdout and "n_predict 16 -> 8" in p.stdout and " s)" in p.stdout
    small = load(out / "seed-regenerate.min.yaml")
    assert len(small.steps) < 7
    assert small.purpose.startswith(f"Minimized from {BUNDLED / 'seed-regenerate.yaml'} (7 steps")


def test_the_minimized_scenario_fails_the_same_way_under_the_fault_and_passes_without(minimized, tmp_path):
    _, out = minimized
    path = tmp_path / "s.yaml"
    path.write_text((out / "seed-regenerate.min.yaml").read_text())
    p, case = played(path, "--fault", "no-restore")
    assert case["status"] == "FAIL" and "tokens diverge" in case["reason"], case["reason"]
    p, case = played(path)
    assert p.returncode == 0 and case["status"] == "PASS", case["reason"]


def test_the_report_of_the_failing_run_links_the_minimized_scenario(minimized):
    _, out = minimized
    (case,) = read_results(out / "results.json")["results"]
    assert case["minimized"] == "seed-regenerate.min.yaml"
    assert '<a href="seed-regenerate.min.yaml">seed-regenerate.min.yaml</a>' in (out / "report.html").read_text()


def test_the_run_budget_stops_the_search_and_keeps_what_it_has(tmp_path):
    p = cli("minimize", str(BUNDLED / "seed-regenerate.yaml"), "--model", "jamba", "--fault", "no-restore",
            "--report-dir", str(tmp_path), "--max-runs", "2")
    assert p.returncode == 0, p.stderr
    assert "stopped: --max-runs 2 reached" in p.stdout
    # the first candidate that runs passes (no regeneration left); the second one fails alike and is kept
    assert len(load(tmp_path / "seed-regenerate.min.yaml").steps) == 5


@pytest.mark.parametrize("args, said", [
    (["seed-regenerate.yaml"], "seed-regenerate.yaml: PASS on fixture:jamba: nothing to minimize"),
    (["no-such.yaml", "--fault", "no-restore"], "no-such.yaml: no such scenario file or directory"),
    (["seed-regenerate.yaml", "--fault", "no-such-fault"], "no-such-fault"),
])
def test_bad_input_to_minimize_is_one_line_and_exit_2(tmp_path, args, said):
    p = cli("minimize", str(BUNDLED / args[0]), *args[1:], "--model", "jamba", "--report-dir", str(tmp_path))
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], p.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_ctrl_c_keeps_the_smallest_scenario_so_far(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "llama_cachecheck.cli", "minimize",
                          str(BUNDLED / "random-stress-2.yaml"),
                          "--model", "jamba", "--fault", "no-restore", "--report-dir", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in p.stdout:  # the first kept reduction is on disk before it is printed
        if line.startswith("  dropped"):
            p.send_signal(signal.SIGINT)
            break
    p.wait(60)
    assert p.returncode == 130, p.stderr.read()
    kept = load(tmp_path / "random-stress-2.min.yaml")
    assert 0 < len(kept.steps) < 11 and kept.purpose.startswith("Minimized from")
