"""The vocabulary every layer shares: the verdicts (one type, their order from best to worst, which
fail a run) and the kinds of memory a model has.

A `str` enum, so a status is still its own text in JSON, templates and comparisons with
strings read back from a results file.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

# how a model remembers: what a scenario may require, a fault applies to, thresholds are calibrated per
MEMORY_KINDS = ("attention", "swa", "recurrent", "hybrid")


class Status(str, Enum):
    PASS = "PASS"
    SKIP = "SKIP"
    NOISE = "NOISE"
    LOST_REUSE = "LOST-REUSE"
    FAIL = "FAIL"
    ERROR = "ERROR"

    def __str__(self) -> str:
        return self.value

    # as the text hashes, so "LOST-REUSE" read back from a results file finds Status.LOST_REUSE in a set
    __hash__ = str.__hash__

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


ORDER = tuple(Status)  # worst last
FAILING = frozenset({Status.LOST_REUSE, Status.FAIL, Status.ERROR})  # exit 1; a failed pytest item
GOOD = frozenset({Status.PASS, Status.NOISE})  # what bisect and diff count as fine


def worst(statuses: Iterable[str]) -> Status:
    return Status(max(statuses, key=ORDER.index, default=Status.PASS))


class InputError(Exception):
    """Bad input the user gave (a flag, a file): printed as one line, exit 2."""
