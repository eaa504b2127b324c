"""The fault table: a fault must replace a real step of the policy, or it would test nothing."""

import pytest

from harness.policy import Fault
from harness.status import Status


def test_a_fault_that_names_no_step_of_the_policy_is_refused():
    with pytest.raises(ValueError, match="'restor', which is no step of CheckpointPolicy"):
        Fault("typo", "restor", lambda self: None, ("swa",), Status.FAIL)

