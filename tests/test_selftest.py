"""The fault matrix: every fault is caught on every arch it applies to, and clean runs pass."""

import pytest

from llama_cachecheck import faults, models
from llama_cachecheck.faults import CHECKPOINT_FAULTS, SLOT_FAULTS
from llama_cachecheck.scenario import BUNDLED, discover
from llama_cachecheck.selftest import matrix

pytestmark = pytest.mark.slow  # the whole fault matrix on every fixture


def test_every_fault_is_killed_on_every_applicable_arch_and_clean_runs_pass():
    refs = models.resolve(["all"])
    rows, names = matrix(refs, discover([BUNDLED]), threads=1, jobs=2)
    assert names == list(faults.FAULTS)
    for row in rows:
        assert set(row.clean_statuses) <= {"PASS", "SKIP"}, (row.model, row.clean_statuses)  # exact: no NOISE
        assert row.clean_statuses.get("PASS", 0) >= 15
        for f in names:
            applies = row.memory in faults.FAULTS[f].applies_to
            assert row.cells[f] == ("killed" if applies else "n/a"), (row.model, f, row.cells[f])
    # the control model gets no checkpoint fault (its memory rolls back freely), only the slots' own and the
    # --cache-reuse shift's (only memory that shifts moves chunks)
    control = next(r for r in rows if r.memory == "attention").cells
    assert all(control[f] == "n/a" for f in CHECKPOINT_FAULTS if f != "cache-reuse-off-by-one")
    assert control["cache-reuse-off-by-one"] == "killed"
    assert all(control[f] == "killed" for f in SLOT_FAULTS if "attention" in SLOT_FAULTS[f].applies_to)
