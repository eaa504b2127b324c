"""Shrink a failing scenario to the smallest one that still fails the same way (delta debugging).

A CI failure on turn 7 of a random stress scenario is where a contributor's work starts; what
they paste into an issue is the two-turn conversation that still breaks. `minimize` plays
candidate scenarios through the same engine and keeps a candidate when it fails in the same
class as the original (`failure_class`): first ddmin over the steps (Zeller's complement
removal), then each remaining piece on its own: message and token texts, random lengths,
regeneration counts, reply lengths and settings. Every candidate is written as YAML and loaded
back before it runs, so what is kept is always a scenario the loader accepts.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path

from . import scenario as scn
from .arguments import engine_options, positive
from .campaign import Engines
from .findings import failure_class
from .outcomes import ScenarioResult
from .scenario import Scenario, Step, dump, reload


class Exhausted(Exception):
    """The run or time budget ran out: the smallest failing scenario so far is the answer."""


@dataclass(frozen=True)
class Size:
    steps: int
    requests: int
    prompt_tokens: int
    reply_tokens: int

    def __str__(self) -> str:
        return (f"{self.steps} steps, {self.requests} requests, {self.prompt_tokens} prompt tokens, "
                f"{self.reply_tokens} reply tokens")


def size_of(sc: Scenario, res: ScenarioResult) -> Size:
    """Steps as ddmin counts them (`regenerate: {times: 3}` is three), requests, tokens sent and generated."""
    return Size(len(sc.steps), res.requests, sum(len(t.subject.prompt_tokens) for t in res.turns),
                sum(len(t.subject.tokens) for t in res.turns))


# candidates -----------------------------------------------------------------------------------

def _ddmin(steps: tuple[Step, ...]) -> Iterator[tuple[str, tuple[Step, ...]]]:
    """Complements of ever finer chunks; the caller restarts on the first one it keeps."""
    n = 2
    while len(steps) >= 2 and n <= len(steps):
        size = -(-len(steps) // n)
        for i in range(0, len(steps), size):
            dropped = f"step {i + 1}" if size == 1 else f"steps {i + 1}-{min(i + size, len(steps))}"
            yield f"dropped {dropped}", steps[:i] + steps[i + size:]
        n *= 2


def _halves(text: str) -> Iterator[str]:
    """Either half, then three quarters (a reply may need most of a prompt to go wrong)."""
    words = text.split(" ")
    if len(words) >= 2:
        h = len(words) // 2
        yield " ".join(words[:h])
        yield " ".join(words[h:])
        if len(words) >= 4:
            yield " ".join(words[: len(words) - len(words) // 4])
    elif len(text) >= 2:
        yield text[: len(text) // 2]


def _piece_candidates(sc: Scenario) -> Iterator[tuple[str, Scenario]]:
    """Each step and setting made smaller on its own."""
    for i, step in enumerate(sc.steps):
        smaller: list[Step] = []
        if isinstance(step, scn.Message | scn.Edit):
            smaller = [replace(step, content=t) for t in _halves(step.content)]
        elif isinstance(step, scn.Tokens) and step.text is not None:
            smaller = [replace(step, text=t) for t in _halves(step.text)]
        elif isinstance(step, scn.Tokens) and step.random_length >= 2:
            smaller = [replace(step, random_length=step.random_length // 2)]
        for small in smaller:
            yield f"shortened step {i + 1} ({type(step).__name__.lower()})", \
                replace(sc, steps=sc.steps[:i] + (small,) + sc.steps[i + 1:])
    n = sc.sampling.n_predict
    for m in sorted({n // 2, n - n // 4} - {0, n}):
        yield f"n_predict {n} -> {m}", replace(sc, sampling=replace(sc.sampling, n_predict=m))
    for f in fields(sc.settings):  # a setting back at its default is one thing less to explain
        default = getattr(scn.DEFAULT_SETTINGS, f.name)
        if f.name != "threads" and getattr(sc.settings, f.name) != default:
            back = replace(sc.settings, **{f.name: default})
            yield f"settings.{f.name} back to {default}", replace(sc, settings=back)


# the search -----------------------------------------------------------------------------------

@dataclass
class Search:
    """One minimization: the budget, what was kept, and what it cost."""

    run: Callable[[Scenario], ScenarioResult]
    target: tuple[str, str]
    max_runs: int
    deadline: float
    on_accept: Callable[[str, Scenario, ScenarioResult], None]
    runs: int = 0
    best: Scenario | None = None  # the smallest kept so far

    def fails_alike(self, sc: Scenario) -> ScenarioResult | None:
        if self.runs >= self.max_runs:
            raise Exhausted(f"--max-runs {self.max_runs} reached")
        if time.monotonic() > self.deadline:
            raise Exhausted("--timeout reached")
        self.runs += 1
        res = self.run(sc)
        return res if failure_class(res) == self.target else None

    def shrink(self, sc: Scenario, workdir: Path) -> Scenario:
        """Keep the first smaller candidate that still fails alike; until none does."""
        path = workdir / f"{sc.name}.yaml"
        tried = {dump(sc)}  # a candidate met again after a kept reduction is not run twice
        while True:
            for what, candidate in self._candidates(sc):
                loaded = reload(candidate, path)
                if loaded is None or dump(loaded) in tried:
                    continue
                tried.add(dump(loaded))
                res = self.fails_alike(loaded)
                if res is not None:
                    sc = self.best = loaded
                    self.on_accept(what, sc, res)
                    break
            else:
                return sc

    @staticmethod
    def _candidates(sc: Scenario) -> Iterator[tuple[str, Scenario]]:
        for what, steps in _ddmin(sc.steps):
            yield what, replace(sc, steps=steps)
        yield from _piece_candidates(sc)


def minimize(sc: Scenario, run: Callable[[Scenario], ScenarioResult], target: tuple[str, str], *, max_runs: int,
             timeout: float, on_accept: Callable[[str, Scenario, ScenarioResult], None]) -> tuple[Scenario, str]:
    """The smallest scenario found that fails like `target`, and why the search stopped."""
    search = Search(run, target, max_runs, time.monotonic() + timeout, on_accept, best=sc)
    with tempfile.TemporaryDirectory(prefix="cachecheck-minimize-") as tmp:
        try:
            return search.shrink(sc, Path(tmp)), "no smaller candidate fails the same way"
        except Exhausted as e:
            return search.best, str(e)


# the command ----------------------------------------------------------------------------------

def add_parser(sub, name: str) -> None:  # argparse's subparsers
    """`cachecheck minimize`: its options, declared beside the code that runs it."""
    mn = sub.add_parser(name, help="shrink a failing scenario to the smallest one that fails the same way",
                        description="Delta debugging over a failing scenario: drop steps (ddmin), then shorten "
                                    "texts, random token runs, reply lengths and settings, keeping each change "
                                    "after which the scenario still fails in the same class (FAIL stays FAIL on the "
                                    "same kind of divergence or the same broken invariant, LOST-REUSE stays "
                                    "LOST-REUSE). Writes REPORT_DIR/NAME.min.yaml as soon as a reduction is kept "
                                    "(Ctrl-C keeps the smallest so far); a report.html there that has this case "
                                    "links to it. Exit 0 when done, 2 when the scenario does not fail.")
    mn.add_argument("scenario", metavar="SCENARIO", help="one scenario YAML file")
    mn.add_argument("--model", required=True, metavar="MODEL", help="a fixture name, gemma3-270m or PATH.gguf")
    engine_options(mn)
    mn.add_argument("--fault", metavar="NAME", help="inject a known cache bug (see `cachecheck faults`)")
    mn.add_argument("--threads", type=positive, metavar="N", help="llama.cpp threads (default: the scenario's)")
    mn.add_argument("--max-runs", type=positive, default=200, metavar="N",
                    help="stop after N candidate runs (default 200)")
    mn.add_argument("--timeout", type=positive, default=1800, metavar="SECONDS",
                    help="stop after this long (default 1800)")
    mn.add_argument("--report-dir", metavar="DIR", default="reports", help="where NAME.min.yaml goes (default: "
                    "reports/)")
    mn.set_defaults(func=main)


def main(args) -> int:  # argparse's namespace
    """`cachecheck minimize`: exit 0 with the smallest scenario written, 2 on bad input."""
    from . import faults, models
    from .library import engine_factory
    from .report import console
    from .results import write_atomic
    from .scenario import discover
    from .status import InputError

    found = discover([args.scenario])
    if len(found) != 1:
        raise InputError(f"{args.scenario}: minimize takes one scenario file, found {len(found)}")
    original = found[0]
    try:
        faults.check(args.fault)
    except faults.UnknownFault as e:
        raise InputError(str(e)) from None
    (ref,) = models.resolve([args.model])
    out_dir = Path(args.report_dir)
    target_path = out_dir / f"{original.name}.min.yaml"
    engines = Engines(engine_factory(args, args.fault))

    def run(sc: Scenario) -> ScenarioResult:
        if args.threads:  # how it runs here, not part of the scenario written
            sc = sc.with_settings(threads=args.threads)
        return engines.play(sc, ref, args.fault)

    t0 = time.monotonic()
    try:
        first = run(original)
        target = failure_class(first)
        if target is None:
            raise InputError(f"{original.path}: {first.status} on {ref.name}"
                             + (f" under --fault {args.fault}" if args.fault else "")
                             + (f" ({first.reason})" if first.reason else "") + ": nothing to minimize")
        before = size_of(original, first)
        console.say(f"minimizing {original.name} on {ref.name}: {target[0]}, {target[1]} ({before})")
        last = [before]

        def accepted(what: str, sc: Scenario, res: ScenarioResult) -> None:
            now = size_of(sc, res)
            # on disk before it is said: a Ctrl-C at any point keeps the smallest so far
            write_atomic(target_path, dump(sc, _purpose(original, before, now, ref.name, args.fault, target)))
            console.say(f"  {what}: {last[0]} -> {now} ({time.monotonic() - t0:.1f} s)")
            last[0] = now

        best, why = minimize(original, run, target, max_runs=args.max_runs, timeout=args.timeout,
                             on_accept=accepted)
    finally:
        engines.close()
    if best is original:
        console.say(f"no smaller scenario found that fails the same way; stopped: {why}; nothing written")
        return 0
    console.say(f"{original.name}: {before} -> {last[0]} in {time.monotonic() - t0:.1f} s; stopped: {why}")
    console.say(f"wrote {target_path}")
    _link_from_report(out_dir, original.name, ref.name, target_path.name)
    return 0


def _purpose(original: Scenario, before: Size, now: Size, model: str, fault: str | None,
             target: tuple[str, str]) -> str:
    under = f" under --fault {fault}" if fault else ""
    return (f"Minimized from {original.path.resolve()} ({before}) to {now}: {target[0]}, {target[1]}, on "
            f"{model}{under}. It was: {original.purpose}")


def _link_from_report(out_dir: Path, scenario: str, model: str, filename: str) -> None:
    """Where a report of a run with this case sits in the same directory, its case links to the file."""
    from .report import RESULTS_NAME, write_report
    from .results import read
    from .status import InputError

    try:
        doc = read(out_dir / RESULTS_NAME)
    except InputError:
        return
    hit = False
    for case in doc.get("results", []):
        if case.get("scenario") == scenario and case.get("model") == model:
            case["minimized"] = filename
            hit = True
    if hit:
        write_report(doc, out_dir)
