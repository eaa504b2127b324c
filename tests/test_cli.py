"""The CLI end to end on the real engine and fixtures: exit codes, summaries, JSON."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from clirun import cli

from llama_cachecheck.results import read as read_results
from llama_cachecheck.scenario import BUNDLED

SEED = str(BUNDLED / "seed-regenerate.yaml")


def test_clean_run_passes_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    p = cli(SEED, str(BUNDLED / "long-prompt.yaml"), "--model", "fixture:jamba", "--model", "fixture:gemma3",
            "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    doc = read_results(out)
    assert {r["status"] for r in doc["results"]} == {"PASS"}
    r = doc["results"][0]
    assert {"scenario", "model", "status", "first_divergence", "max_distance", "replay", "turns"} <= set(r)
    assert r["turns"][0]["reference"]["tokens"], "the reference must have run"


def test_a_clean_run_is_a_line_per_model_and_a_finding_is_a_row_of_its_own(tmp_path):
    clean = cli(SEED, str(BUNDLED / "long-prompt.yaml"), "--model", "fixture:jamba", "--model", "fixture:gemma3",
                "--report-dir", str(tmp_path))
    assert clean.returncode == 0, clean.stderr
    lines = clean.stdout.splitlines()
    assert [ln.split()[:4] for ln in lines if ln.startswith("fixture:")] == [
        ["fixture:jamba", "hybrid", "PASS", "2"], ["fixture:gemma3", "swa", "PASS", "2"]]
    assert "│" not in clean.stdout and len(lines) < 10  # nothing to look at: no table
    every = cli(SEED, "--model", "fixture:jamba", "-v", "--report-dir", str(tmp_path))
    assert "│ seed-regenerate" in every.stdout
    found = cli(SEED, "--model", "fixture:jamba", "--model", "fixture:llama", "--fault", "no-restore",
                "--report-dir", str(tmp_path))
    assert found.returncode == 1
    rows = [ln for ln in found.stdout.splitlines() if ln.startswith("│")]
    assert len(rows) == 1 and "fixture:jamba" in rows[0] and "FAIL" in rows[0]  # llama skipped: no row
    assert [ln.split()[2:4] for ln in found.stdout.splitlines() if ln.startswith("fixture:")] == [
        ["FAIL", "1"], ["SKIP", "1"]]


def test_no_restore_on_jamba_fails_and_names_the_divergence(tmp_path):
    out = tmp_path / "r.json"
    p = cli("--model", "fixture:jamba", "--fault", "no-restore", "--json", str(out))
    assert p.returncode == 1, p.stderr
    assert "FAIL seed-regenerate [fixture:jamba]" in p.stdout
    assert "replay: cachecheck run" in p.stdout
    seed = next(r for r in read_results(out)["results"] if r["scenario"] == "seed-regenerate")
    regen = [t for t in seed["turns"] if t["step"].startswith("regenerate")]
    # every regenerated reply is wrong from its first position on (its logits; the token may survive it)
    # and the streams split: the confused regeneration
    for t in regen:
        assert t["status"] == "FAIL" and t["divergence"] is not None
        assert t["subject"]["tokens"] != t["reference"]["tokens"]
        assert t["distances"][0] > 0.5


@pytest.mark.parametrize("args, expected", [
    (["--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf: no such file"),
    (["--model", __file__], f"{__file__}: not a GGUF file"),
    (["--fault", "bogus"], "unknown fault 'bogus'; valid faults: no-restore"),
    (["--model", "fixture:nope"], "fixture:nope: unknown fixture"),
    (["-k", "nothing-matches-this"], "selects no scenario"),
    (["-k", "regen*"], "'*' is not understood"),
    (["--threads", "0"], "--threads: must be at least 1, got 0"),
    (["--jobs", "-1"], "--jobs: must be at least 1, got -1"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected):
    p = cli(*args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], p.stderr


def test_fixtures_list_json():
    p = cli("fixtures", "list", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    kinds = {r["memory"] for r in rows}
    assert kinds == {"attention", "swa", "recurrent", "hybrid"}
    assert all({"name", "arch", "memory"} <= set(r) for r in rows)
    assert sum(r["memory"] == "hybrid" for r in rows) >= 5


def test_help_explains_the_commands():
    p = cli("--help")
    assert p.returncode == 0
    for word in ("run", "selftest", "fixtures", "faults", "calibrate"):
        assert word in p.stdout


def under_a_file(d):
    (d / "f").write_text("x")
    return d / "f" / "sub"


@pytest.mark.parametrize("make, flag, said", [
    (lambda d: d, "--json", "is a directory, not a file"),
    (under_a_file, "--report-dir", "is not a directory"),
])
def test_output_paths_are_checked_before_the_first_scenario(tmp_path, make, flag, said):
    target = make(tmp_path)
    p = cli(SEED, "--model", "fixture:llama", flag, str(target), *(["--report-dir", str(tmp_path / "r")]
                                                                  if flag == "--json" else []))
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0] and "runs" not in p.stdout, p.stderr


def test_report_and_results_are_published_together_or_not_at_all(tmp_path, monkeypatch):
    import tempfile

    from llama_cachecheck import results

    old = {tmp_path / "report.html": "old report", tmp_path / "results.json": "old results"}
    for path, text in old.items():
        path.write_text(text)
    real_mkstemp = tempfile.mkstemp
    made = []

    def disk_full_on_second_file(*args, **kw):  # the first file is staged, the second finds the disk full
        if made:
            raise OSError(28, "No space left on device")
        made.append(real_mkstemp(*args, **kw))
        return made[-1]
    monkeypatch.setattr(tempfile, "mkstemp", disk_full_on_second_file)
    with pytest.raises(OSError, match="No space left"):
        results.publish({tmp_path / "results.json": "new results", tmp_path / "report.html": "new report"})
    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)
    assert {p: p.read_text() for p in old} == old  # both old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "results.json"]  # no leftovers


def test_pytest_with_a_missing_gguf_says_so_once(tmp_path):
    # from a directory of its own: the plugin is an entry point, so `--gguf PATH` is known before pytest
    # picks its rootdir (as a conftest.py it was not, and PATH became the rootdir)
    p = subprocess.run([sys.executable, "-m", "pytest", "--gguf", str(tmp_path / "missing.gguf"), "-q"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 4  # pytest's usage error
    said = [ln for ln in (p.stdout + p.stderr).splitlines() if "missing.gguf: no such file" in ln]
    assert len(said) == 1, p.stdout + p.stderr


def test_a_truncated_gguf_is_one_error_naming_the_path_once(tmp_path):
    from llama_cachecheck import fixtures

    good = fixtures.build_all(["jamba"])[0].path
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(good.read_bytes()[:300_000])
    out = tmp_path / "r.json"
    p = cli(SEED, str(BUNDLED / "long-prompt.yaml"), "--model", str(bad), "--json", str(out),
            "--report-dir", str(tmp_path / "r"))
    assert p.returncode == 1
    rows = read_results(out)["results"]
    assert [r["status"] for r in rows] == ["ERROR", "SKIP"]
    assert rows[0]["reason"].count(str(bad)) == 1 and "could not load" in rows[0]["reason"]
    assert rows[0]["replay"].startswith("cachecheck run ") and str(bad) in rows[0]["replay"]


@pytest.mark.parametrize("keep", [False, True])
def test_the_logs_of_a_run_are_one_directory_removed_at_the_end_or_kept_on_request(tmp_path, keep):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = cli("run", SEED, "--model", "fixture:jamba", "--model", "fixture:mamba", "--report-dir", str(tmp_path / "r"),
            *(["--keep-logs"] if keep else []), env={**os.environ, "TMPDIR": str(tmp)})
    assert p.returncode == 0, p.stderr
    left = list(tmp.iterdir())
    if not keep:
        assert left == [] and "logs kept" not in p.stderr
        return
    (run_dir,) = left
    assert f"cachecheck: logs kept in {run_dir}" in p.stderr
    assert sorted(f.name.split("-")[1] for f in run_dir.iterdir()) == ["fixture", "fixture"]  # a worker per model


def test_the_replay_command_keeps_the_tolerance(tmp_path):
    first, again = tmp_path / "first.json", tmp_path / "again.json"
    p = cli(SEED, "--model", "fixture:jamba", "--tolerance", "calibrated", "--json", str(first),
            "--report-dir", str(tmp_path / "a"))
    assert p.returncode == 0, p.stderr
    doc = read_results(first)
    replay = shlex.split(doc["results"][0]["replay"])
    assert replay[replay.index("--tolerance") + 1] == "calibrated" and replay[replay.index("--engine") + 1] == "inproc"
    q = cli(*replay[2:], "--json", str(again), "--report-dir", str(tmp_path / "b"))
    assert q.returncode == 0, q.stderr
    for d in (doc, read_results(again)):  # both judged the same way: the reference chunked its own way
        assert all(t["rule"].startswith("calibrated tolerance") for t in d["results"][0]["turns"])
