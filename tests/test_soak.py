"""`cachecheck soak`: random scenarios from the grammar, clean, with the machine's footprint watched."""

import subprocess
import sys

from harness import scenario, soak


def test_the_grammar_draws_every_step_kind_the_same_way_for_a_seed_and_the_loader_accepts_them(tmp_path):
    kinds = set()
    for i in range(300):
        sc = soak.checked(soak.random_scenario(7, i), tmp_path)
        kinds |= {type(s) for s in sc.steps}
        assert scenario.dump(sc) == scenario.dump(soak.random_scenario(7, i)), i
    assert kinds == {scenario.Message, scenario.Generate, scenario.Regenerate, scenario.Edit, scenario.Truncate,
                     scenario.Tokens}
    assert scenario.dump(soak.random_scenario(7, 0)) != scenario.dump(soak.random_scenario(8, 0))


def test_the_footprint_sees_a_process_and_a_file_left_behind():
    with soak.own_temp_dir() as tmp:
        before = soak.footprint()
        (tmp / "cachecheck-worker-x.log").write_text("left behind")
        child = subprocess.Popen(["sleep", "30"])
        try:
            now = soak.footprint()
        finally:
            child.kill()
            child.wait()
    assert (now.temp_files, now.processes) == (before.temp_files + 1, before.processes + 1)
    assert now.rss_mb > 0 and now.fds > 0


def test_a_short_soak_on_a_correct_engine_passes_flat_and_clean(tmp_path):
    p = subprocess.run([sys.executable, "-m", "harness.cli", "soak", "--minutes", "0.25", "--seed", "3",
                        "--model", "jamba", "--model", "gemma3", "--report-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "soak: zero FAIL, footprint flat, nothing left behind" in p.stdout
    summary = next(line for line in p.stdout.splitlines() if line.startswith("soak: seed 3"))
    assert "x 2 models" in summary and "PASS" in summary and "FAIL" not in summary
    assert not list(tmp_path.iterdir())  # no finding saved
