"""The fault matrix: every fault is caught on every arch it applies to, and clean runs pass."""

from harness import models, policy
from harness.scenario import BUNDLED, discover
from harness.selftest import matrix


def test_every_fault_is_killed_on_every_applicable_arch_and_clean_runs_pass():
    refs = models.resolve(["all"])
    rows, faults = matrix(refs, discover([BUNDLED]), threads=1, jobs=2)
    assert faults == list(policy.FAULTS)
    for row in rows:
        assert set(row.clean_statuses) <= {"PASS", "SKIP"}, (row.model, row.clean_statuses)  # exact: no NOISE
        assert row.clean_statuses.get("PASS", 0) >= 15
        for f in faults:
            applies = row.memory in policy.FAULTS[f].applies_to
            assert row.cells[f] == ("killed" if applies else "n/a"), (row.model, f, row.cells[f])
    # the control model gets no fault at all; every other memory kind gets several
    assert all(c == "n/a" for c in next(r for r in rows if r.memory == "attention").cells.values())
