"""What a failure is, for grouping and for telling a known one from a new one.

A long soak meets one bug many times. Its failure class (the status and the kind of divergence or
the broken rule, numbers left out) plus the memory kind of the model groups the copies, so the
hundredth copy costs a line, not a minimization. A class that someone has already explained (the
README's findings, per build) is in a known-findings file: a finding that matches it is still
reported, marked known with the explanation, and the summary leads with the new ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import registry
from . import scenario as scn
from .arguments import ENGINES
from .scenario import Scenario
from .status import Status

KNOWN = registry.REGISTRY  # bundled: one file per finding (registry.py); `--known FILE` adds a YAML list
FEATURES = ("conversations", "parallel", "pinned", "save", "restore", "erase", "damage", "raw", "edit",
            "regenerate", "truncate", "splice", "speculative", "cache_reuse", "tools", "template_vars",
            "strip_reasoning")


def failure_class(res) -> tuple[str, str] | None:  # an outcomes.ScenarioResult
    """What kind of failure a result is; None when it did not fail (PASS, NOISE, SKIP).

    Numbers are left out (a smaller scenario fails at another position), the rest is kept: a
    token split, a logprob difference, each broken cache invariant and each engine error are
    different findings.
    """
    if res.status is Status.ERROR and res.error_class:  # what died and of what: its abort line, kept whole
        return res.status.value, res.error_class.replace(res.model, "MODEL")
    if res.status is Status.ERROR:
        first = re.split(r"[;\n]", res.reason or "", maxsplit=1)[0].replace(res.model, "MODEL")
        return res.status.value, _generic(first)[:120]
    if res.status not in (Status.FAIL, Status.LOST_REUSE):
        return None
    bad = res.first_bad
    if res.status is Status.LOST_REUSE:
        return res.status.value, "reused fewer prompt tokens than the policy promises" + _where(res, bad)
    if bad is None:
        return res.status.value, ""
    if bad.violations:
        return res.status.value, "cache invariant broken: " + _generic(bad.violations[0])
    d = bad.verdict.divergence
    return res.status.value, "tokens diverge" if d is not None and not d.noise else "logprobs differ"


def _where(res, bad) -> str:
    """Whether the request that lost reuse ran on its conversation's last slot: a prompt lost in its own
    slot (a restore without checkpoints) and one lost on the way to another (the host cache) differ."""
    if bad is None:
        return ""
    before = [t for t in res.turns[:bad.index - 1] if t.conversation == bad.conversation]
    if not before or None in (before[-1].subject.slot, bad.subject.slot):
        return ""
    return " on its own slot" if before[-1].subject.slot == bad.subject.slot else " on another slot"


def _generic(text: str) -> str:
    """Paths, ports, numbers and conversation names out: what stays is the kind of thing that happened."""
    text = re.sub(r"(/[\w.\-]+)+", "PATH", text)
    text = re.sub(r"conversation [\w-]+", "conversation X", text)
    return re.sub(r"\d+(\.\d+)?", "N", text)


def features(sc: Scenario) -> set[str]:
    """What a scenario does, in words a known finding can require (`pinned`, `restore`, ...)."""
    out: set[str] = set()
    for s in sc.steps:
        if isinstance(s, scn.Switch):
            out.add("conversations")
        elif isinstance(s, scn.Parallel):
            out.add("parallel")
            if any(q.id_slot is not None for q in s.requests):
                out.add("pinned")
        elif isinstance(s, scn.Generate) and s.id_slot is not None:
            out.add("pinned")
        elif isinstance(s, scn.SlotAction):
            out.add(s.action)
        elif isinstance(s, scn.Tokens):
            out.add("raw")
        elif isinstance(s, scn.Edit | scn.Regenerate | scn.Truncate | scn.Splice):
            out.add(type(s).__name__.lower())
    needs = sc.template_needs  # the agent loop's parts, as the scenario says what a template must render
    if "tools" in needs:
        out.add("tools")
    if any(n.startswith("var:") for n in needs):
        out.add("template_vars")
    if sc.settings.speculative is not None:
        out.add("speculative")
    if sc.settings.cache_reuse:
        out.add("cache_reuse")
    if sc.strip_reasoning:
        out.add("strip_reasoning")
    return out


@dataclass(frozen=True)
class Known:
    """A failure class already explained: which status, memory kinds, builds and scenario features."""

    name: str
    status: str
    explanation: str
    cls: str = ".*"  # a regex over the failure class's text
    memory: tuple[str, ...] = ()  # empty: any
    engine: str = ""  # a name of arguments.ENGINES; empty: any
    build: str = ".*"  # a regex over the build as the engine names it ("llama-server 10001 (unknown) (PATH)")
    needs: tuple[str, ...] = ()  # features the (minimized) scenario has
    case: dict | None = None  # a bundled case that shows it: scenario, model, profile, tries (replay_findings.py)
    # the signature: what the subject's cache did at the failing turn (event kinds it logged, or did not)
    has: tuple[str, ...] = ()
    lacks: tuple[str, ...] = ()

    def matches(self, klass: tuple[str, str], memory: str, engine: str, build: str, *, feats: set[str],
                events: set[str] | None) -> bool:
        return (klass[0] == self.status and re.search(self.cls, klass[1]) is not None
                and (not self.memory or memory in self.memory) and self.engine in ("", engine)
                and re.search(self.build, build) is not None and set(self.needs) <= feats
                and self.signed(events))

    def signed(self, events: set[str] | None) -> bool:
        """The failing turn's evidence is this finding's: a finding with a signature needs the evidence, so a
        failure of the same shape with another cause (other cache events) is not credited to it."""
        if not (self.has or self.lacks):
            return True
        return events is not None and set(self.has) <= events and not set(self.lacks) & events


class KnownError(Exception):
    """A known-findings file that cannot be read: one line with the file, entry and field."""


def load_known(path: Path = KNOWN) -> list[Known]:
    """The registry's findings (a directory), or a YAML list of entries in the same fields (a file)."""
    if path.is_dir():
        try:
            return [_known(registry.matcher(front), str(file)) for file, front in registry.entries(path)]
        except registry.RegistryError as e:
            raise KnownError(str(e)) from None
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise KnownError(f"{path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise KnownError(f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML") from None
    if not isinstance(doc, list):
        raise KnownError(f"{path}: expected a list of known findings")
    return [_known(entry, f"{path}: entry {i}") for i, entry in enumerate(doc, 1)]


_FIELDS = {"name", "status", "explanation", "class", "memory", "engine", "build", "needs", "case", "signature"}
# the event kinds a subject's turn can log (engines/server_log.py; the in-process timeline names them alike)
EVENT_KINDS = ("created", "restored", "erased", "evicted", "superseded", "full-reprocess", "selected", "host-saved",
               "host-loaded", "host-dropped", "host-evicted", "cleared")


def _known(entry, where: str) -> Known:
    if not isinstance(entry, dict):
        raise KnownError(f"{where}: expected a mapping")
    unknown = set(entry) - _FIELDS
    if unknown:
        raise KnownError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    for f in ("name", "status", "explanation"):
        if not isinstance(entry.get(f), str):
            raise KnownError(f"{where}: {f} must be given as text")
    if entry.get("engine", "inproc") not in ENGINES:
        raise KnownError(f"{where}: engine must be one of {', '.join(ENGINES)}")
    statuses = {s.value for s in (Status.FAIL, Status.LOST_REUSE, Status.ERROR)}
    if entry["status"] not in statuses:
        raise KnownError(f"{where}: status must be one of {', '.join(sorted(statuses))}")
    bad = set(entry.get("needs", ())) - set(FEATURES)
    if bad:
        raise KnownError(f"{where}: needs: {sorted(bad)[0]!r} is not a feature ({', '.join(FEATURES)})")
    for f in ("class", "build"):
        try:
            re.compile(entry.get(f, ".*"))
        except (re.error, TypeError):
            raise KnownError(f"{where}: {f} is not a regular expression") from None
    has, lacks = _signature(entry.get("signature"), where)
    return Known(entry["name"], entry["status"], entry["explanation"].strip(), entry.get("class", ".*"),
                 tuple(entry.get("memory", ())), entry.get("engine", ""), entry.get("build", ".*"),
                 tuple(entry.get("needs", ())), _case(entry.get("case"), where), has, lacks)


def _signature(sig, where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if sig is None:
        return (), ()
    if not isinstance(sig, dict) or set(sig) - {"has", "lacks"} or not sig:
        raise KnownError(f"{where}: signature gives has and/or lacks, lists of event kinds")
    for f in ("has", "lacks"):
        bad = [k for k in sig.get(f, ()) if k not in EVENT_KINDS]
        if not isinstance(sig.get(f, []), list) or bad:
            raise KnownError(f"{where}: signature.{f}: {bad[0] if bad else sig[f]!r} is not an event kind "
                             f"({', '.join(EVENT_KINDS)})")
    return tuple(sig.get("has", ())), tuple(sig.get("lacks", ()))


_CASE = {"scenario": str, "model": str, "profile": str, "tries": int}


def _case(case, where: str) -> dict | None:
    """A known finding's bundled case: the scenario and model that show it, the server profile, how many tries a
    flaky one gets."""
    if case is None:
        return None
    if not isinstance(case, dict) or not {"scenario", "model"} <= set(case) or set(case) - set(_CASE):
        raise KnownError(f"{where}: case must give scenario and model (and may give profile, tries)")
    for k, typ in _CASE.items():
        if k in case and not isinstance(case[k], typ):
            raise KnownError(f"{where}: case.{k} must be {typ.__name__}")
    if case.get("profile", "deployed") not in ("deployed", "isolated") or case.get("tries", 1) < 1:
        raise KnownError(f"{where}: case.profile is deployed or isolated, case.tries at least 1")
    return {"profile": "deployed", "tries": 1, **case}


def evidence(res) -> set[str] | None:  # an outcomes.ScenarioResult
    """What the subject's cache did at the failing turn: the kinds of event it logged there."""
    bad = res.first_bad
    return None if bad is None else {e["kind"] for e in bad.subject.events}


def explain(known: list[Known], klass: tuple[str, str], *, memory: str, engine: str, build: str, sc: Scenario,
            events: set[str] | None) -> Known | None:
    """The first known finding this one matches, judged on the scenario that shows it (the minimized one) and
    on the failing turn's cache events (`evidence`)."""
    feats = features(sc)
    return next((k for k in known if k.matches(klass, memory, engine, build, feats=feats, events=events)), None)
