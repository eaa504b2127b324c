"""What playing a scenario produced: one result per (scenario, model), one per generate step.

Apart from the runner that makes them, so the JSON writer, the reports and the commands that read
results need not import the orchestrator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import compare
from .engines.base import Completion, SessionSettings
from .scenario import MAIN, Scenario
from .status import Status


@dataclass
class TurnResult:
    index: int  # 1-based among the scenario's generate steps
    step: str  # generate / regenerate / a label
    messages: list[tuple[str, str]] | None  # the conversation that was sent (chat scenarios)
    subject: Completion
    reference: Completion
    subject_pieces: list[str]
    reference_pieces: list[str]
    verdict: compare.Verdict
    scored: list | None = None  # the reference's top-k at each subject position (teacher forcing)
    focus: int | None = None  # the divergence, or the position where the distance peaks
    top_pieces: dict[int, str] = field(default_factory=dict)  # text of the top-k ids at focus
    violations: list[str] = field(default_factory=list)  # cache invariants this request broke
    conversation: str = MAIN  # which conversation of the scenario asked
    at_once: bool = False  # one of requests sent at once: the order the server took them in chose its slot

    def divergence_text(self) -> str:
        """Where the two replies split: turn, position, both tokens, the distance there."""
        d = self.verdict.divergence
        if d is None:
            return ""
        s = repr(self.subject_pieces[d.position]) if d.subject else "end of reply"
        r = repr(self.reference_pieces[d.position]) if d.reference else "end of reply"
        dist = self.verdict.distances[d.position] if d.position < len(self.verdict.distances) else None
        return f"turn {self.index} pos {d.position}: {s} vs {r}" + (f" (Δ {dist:.2g})" if dist is not None else "")


@dataclass
class ScenarioResult:
    scenario: Scenario
    model: str
    engine: str
    memory: str
    fault: str | None
    status: Status = Status.PASS
    reason: str = ""
    turns: list[TurnResult] = field(default_factory=list)
    seconds: float = 0.0
    replay: str = ""
    start_failed: bool = False  # the engine could not start for this model (its other scenarios are skipped)
    sent: int = 0  # requests sent to the subject, the one an ERROR broke off included (it has no turn)
    build: str = ""  # the llama.cpp under test, as the engine names it (version, commit, binary)
    command: str = ""  # how the subject was started (a server's full command line), or ''
    settings: SessionSettings | None = None  # what the subject ran with (a server profile may leave some to the build)
    thresholds: compare.Thresholds | None = None  # what judged it (the report shows these, not today's file)
    error_class: str = ""  # an ERROR's class: what died and of what (its abort line), a 5xx, a time-out

    @property
    def requests(self) -> int:
        """Requests sent, the one an ERROR broke off included (results read back from JSON: their turns)."""
        return max(self.sent, len(self.turns))

    @property
    def first_bad(self) -> TurnResult | None:
        return next((t for t in self.turns if t.verdict.status == self.status), None)

    @property
    def max_distance(self) -> float:
        return max((t.verdict.max_distance for t in self.turns), default=0.0)

    @property
    def reused(self) -> tuple[int, int]:
        """(prompt tokens reused, prompt tokens in all) over the subject's requests."""
        return (sum(t.subject.n_reused for t in self.turns),
                sum(t.subject.prompt_length for t in self.turns))
