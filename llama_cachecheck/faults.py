"""Every fault by name, the checkpoint policy's, the slot policy's and the speculative decoder's: the one place a
name is checked."""

from __future__ import annotations

from .policy import FAULTS as CHECKPOINT_FAULTS
from .slots import SLOT_FAULTS
from .speculation import SPEC_FAULTS

FAULTS = {**CHECKPOINT_FAULTS, **SLOT_FAULTS, **SPEC_FAULTS}


class UnknownFault(ValueError):
    def __init__(self, name: str):
        super().__init__(f"unknown fault {name!r}; valid faults: {', '.join(FAULTS)}")


def check(name: str | None) -> None:
    """Refuse a fault name that is none of ours (UnknownFault says which are)."""
    if name and name not in FAULTS:
        raise UnknownFault(name)


def applies(name: str | None):  # a predicate on memory kinds
    """Whether a fault can act on a memory kind (no fault: every kind)."""
    return (lambda memory: memory in FAULTS[name].applies_to) if name else (lambda memory: True)
