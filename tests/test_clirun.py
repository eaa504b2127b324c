"""The tests' own bound on a cachecheck process: killed when stuck, never for being slow."""

import sys

import pytest
from clirun import run_bounded


def test_a_process_that_neither_prints_nor_computes_is_killed_as_stuck():
    with pytest.raises(AssertionError, match="stuck, killed after 2 s without output or CPU time"):
        run_bounded([sys.executable, "-c", "import time; time.sleep(60)"], quiet=2)


def test_a_silent_process_that_computes_runs_past_the_bound_and_its_output_is_kept():
    p = run_bounded([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 4: pass\n"
                     "print('done')"], quiet=2)
    assert (p.returncode, p.stdout) == (0, "done\n")
