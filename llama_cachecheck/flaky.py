"""A finding that did not come back when played again: how often it does, and in which order of service.

A soak's failure that a replay does not repeat is a race in the server, or noise of ours; a guess
helps nobody. Played again N times (bounded in time), its rate is measured; for a scenario with
parallel requests, each replay also records the order the server took them up in (its log), so a
failure that needs one order is named with that order, and one that never comes back says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import findings


def order_of(res) -> str:  # an outcomes.ScenarioResult
    """The order of service of a result's parallel blocks, as `a>b | b>a` (first taken up first); '' when it
    had none, or the server's log did not say."""
    blocks: list[list] = []
    current: list | None = None
    for t in res.turns:  # a block's replies stand together, each conversation once
        if t.subject.order is None:
            current = None
            continue
        if current is None or t.conversation in {x.conversation for x in current}:
            current = []
            blocks.append(current)
        current.append(t)
    return " | ".join(">".join(t.conversation for t in sorted(b, key=lambda x: x.subject.order)) for b in blocks)


@dataclass
class Rate:
    """Replays of one finding: how many failed alike, per order of service."""

    replays: int = 0
    failed: int = 0
    orders: dict[str, list[int]] = field(default_factory=dict)  # order -> [failed, replays]
    seconds: float = 0.0

    def add(self, failed: bool, order: str) -> None:
        self.replays += 1
        self.failed += failed
        seen = self.orders.setdefault(order, [0, 0])
        seen[0] += failed
        seen[1] += 1

    def text(self) -> str:
        said = f"failed alike in {self.failed} of {self.replays} replays ({self.seconds:.0f} s)"
        ordered = {o: n for o, n in self.orders.items() if o}
        if ordered:
            said += "; by order of service: " + ", ".join(f"{o}: {f}/{n}" for o, (f, n) in sorted(ordered.items()))
            needs = [o for o, (f, n) in ordered.items() if f == n and f > 0]
            if len(needs) == 1 and all(f == 0 for o, (f, _) in ordered.items() if o != needs[0]):
                said += f" (fails only when served {needs[0]})"
        if self.failed == 0:
            said += "; it never came back"
        return said

    def as_dict(self) -> dict:
        return {"replays": self.replays, "failed": self.failed, "orders": self.orders, "seconds": self.seconds}


def measure(play: Callable[[], object], klass: tuple[str, str], replays: int, seconds: float, *,
            first=None) -> Rate:  # play: () -> outcomes.ScenarioResult
    """Up to `replays` plays (`first`, a replay already made, counts as one) within `seconds`."""
    rate, t0 = Rate(), time.monotonic()
    if first is not None:
        rate.add(findings.failure_class(first) == klass, order_of(first))
    while rate.replays < replays and time.monotonic() - t0 < seconds:
        res = play()
        rate.add(findings.failure_class(res) == klass, order_of(res))
    rate.seconds = time.monotonic() - t0
    return rate
