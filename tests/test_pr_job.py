"""The PR job's script (scripts/pr-job.sh), run as CI runs it, on two local llama-server builds."""

import json
import os
from pathlib import Path

import pytest
from clirun import run_bounded

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pr-job.sh"


def job(pr: str, base: str, out: Path, summary: Path):
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(summary)}
    return run_bounded(["bash", str(SCRIPT), pr, base, str(out), "-k", "seed", "--model", "fixture:jamba",
                        "--model", "fixture:llama"], env=env)


@pytest.mark.build
def test_a_pr_that_breaks_the_restore_fails_the_job_with_its_regression(good_and_bad_servers, tmp_path):
    good, bad = good_and_bad_servers
    p = job(bad, good, tmp_path / "out", tmp_path / "summary.md")
    assert p.returncode == 1, p.stdout + p.stderr
    summary = (tmp_path / "summary.md").read_text()  # what the job page shows
    assert summary.startswith("## cachecheck: 1 regression(s)")
    assert "| seed-regenerate [fixture:jamba] | **regression** | status | PASS | ERROR |" in summary
    assert "seed-regenerate [fixture:llama]" not in summary  # attention needs no restore: unchanged
    for f in ("base/report.html", "pr/report.html", "diff.html", "diff.json"):
        assert (tmp_path / "out" / f).exists(), f
    assert json.loads((tmp_path / "out" / "diff.json").read_text())["regressions"] == 1


@pytest.mark.build
def test_the_same_build_on_both_sides_passes_with_no_changes(good_and_bad_servers, tmp_path):
    good, _ = good_and_bad_servers
    p = job(good, good, tmp_path / "out", tmp_path / "summary.md")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "No changes." in (tmp_path / "summary.md").read_text()


def test_a_run_that_cannot_start_stops_the_job_with_its_reason(tmp_path):
    p = job("/nonexistent/llama-server", "/nonexistent/llama-server", tmp_path / "out", tmp_path / "s.md")
    assert p.returncode == 2 and "cachecheck run on the base build failed (exit 2)" in p.stderr
    assert "not an executable llama-server binary" in p.stderr
