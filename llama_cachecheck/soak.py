"""`cachecheck soak`: random scenarios from a seed against an engine, every finding minimized.

The bundled library is a fixed set of conversations someone thought of; bugs nobody has reported
yet are found by volume and variety. A soak draws scenarios from the whole grammar (grammar.py),
plays each on every model through the engine under test (in-process, or a real llama-server)
against a full re-process, and for each new failure class shrinks the first scenario that shows it
(`minimize`), so a maintainer reads two requests, not twenty. The hundredth copy of a class costs
one line. A class already explained (the findings/ registry, or `--known FILE`) is still reported,
marked known. It also watches what a long run does to the machine (footprint.py). Ctrl-C keeps
everything found so far: the report is rewritten after every finding and at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import findings, flaky, grammar, minimize
from .arguments import engine_options, positive
from .engines.server import REFERENCES_KEPT
from .footprint import Footprint, footprint, leaks, own_temp_dir
from .scenario import Scenario, dump

SOAK_HTML, SOAK_JSON = "soak.html", "soak.json"


@dataclass
class Group:
    """One failure class on one memory kind: the first scenario that showed it, minimized, and its copies."""

    status: str
    klass: str
    memory: str
    scenario: str
    reason: str
    size: str
    replay: str
    count: int = 1
    models: list[str] = field(default_factory=list)
    minimized: dict | None = None
    minimize_note: str = ""
    known: findings.Known | None = None
    flaky: bool = False  # played again, it did not fail alike
    rate: flaky.Rate | None = None  # then: how often it does, in which order of service

    def as_dict(self) -> dict:
        known = {"name": self.known.name, "explanation": self.known.explanation} if self.known else None
        return {"status": self.status, "class": self.klass, "memory": self.memory, "scenario": self.scenario,
                "reason": self.reason, "size": self.size, "replay": self.replay, "count": self.count,
                "models": self.models, "minimized": self.minimized, "minimize_note": self.minimize_note,
                "known": known, "flaky": self.flaky, "rate": self.rate.as_dict() if self.rate else None}


@dataclass
class Soak:
    """What a soak has seen so far; everything the report shows."""

    args: object  # argparse's namespace
    out_dir: Path
    known: list[findings.Known]
    groups: dict[tuple, Group] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)  # (kind, model, status) -> runs
    builds: dict[str, str] = field(default_factory=dict)  # model -> build
    scenarios: int = 0
    runs: int = 0
    requests: int = 0
    t0: float = field(default_factory=time.monotonic)
    stopped: str = ""
    marks: dict[str, Footprint] = field(default_factory=dict)  # start, warm, end, after

    def statuses(self) -> Counter:
        """Runs per status, over every kind and model."""
        out: Counter = Counter()
        for (_, _, status), n in self.counts.items():
            out[status] += n
        return out

    def document(self, leaks_found: list[str]) -> dict:
        groups = sorted(self.groups.values(), key=lambda g: (g.known is not None, g.status, g.klass))
        seconds = time.monotonic() - self.t0
        statuses = sorted(self.statuses())
        rows: dict[tuple[str, str], dict] = {}
        for (kind, model, status), n in sorted(self.counts.items()):
            rows.setdefault((kind, model), {"kind": kind, "model": model})[status] = n
        new = sum(g.known is None for g in groups)
        verdict = "FAIL" if new or leaks_found else ("LOST-REUSE" if groups else "PASS")
        headline = (f"{new} new finding(s), {len(groups) - new} known, {len(leaks_found)} leak(s)"
                    if groups or leaks_found else "zero findings, footprint flat, nothing left behind")
        a = self.args
        return {"schema": 1, "verdict": verdict, "headline": headline, "engine": a.engine,
                "profile": a.server_profile or ("deployed" if a.engine == "server" else ""),
                "server_args": a.server_args or "", "builds": sorted(set(self.builds.values())),
                "seed": a.seed, "seconds": seconds, "stopped": self.stopped, "scenarios": self.scenarios,
                "runs": self.runs, "requests": self.requests,
                "requests_per_minute": self.requests / max(seconds, 1e-9) * 60, "command": " ".join(sys.argv),
                "new": new, "known": len(groups) - new, "findings": [g.as_dict() for g in groups],
                "statuses": statuses, "count_rows": list(rows.values()),
                "footprint": {k: v.as_dict() for k, v in self.marks.items()}, "leaks": leaks_found}

    def publish(self, leaks_found: list[str]) -> Path:
        import json

        from .report.html import render_soak
        from .results import publish

        doc = self.document(leaks_found)
        publish({self.out_dir / SOAK_JSON: json.dumps(doc, indent=1), self.out_dir / SOAK_HTML: render_soak(doc)})
        return self.out_dir / SOAK_HTML


# the command ----------------------------------------------------------------------------------

def add_parser(sub, name: str) -> None:  # argparse's subparsers
    """`cachecheck soak`: its options, declared beside the code that runs it."""
    sk = sub.add_parser(name, help="random scenarios from a seed against an engine; every finding minimized",
                        description="Draw random scenarios from the whole scenario grammar (chat turns, "
                                    "regenerations, edits, truncations, raw token runs, several conversations on "
                                    "the slots, parallel blocks, pinned requests, slot save / erase / restore / "
                                    "damage; batch, checkpoint, slot and host-cache settings drawn too) and play "
                                    "them, in turn on every model, against a full re-process, until the time is up "
                                    "or --until-findings. The first run of each failure class (status, kind of "
                                    "divergence or broken rule, memory kind) is saved as REPORT_DIR/soak-SEED-I.yaml "
                                    "and minimized to soak-SEED-I.min.yaml with the same engine; later copies are "
                                    "counted. A class explained in the known-findings file is marked known; new ones "
                                    "lead. The memory, open files and processes of cachecheck and of each "
                                    "llama-server must stay flat, and nothing may be left in the temp directory. "
                                    "REPORT_DIR/soak.html and soak.json are rewritten after every finding (Ctrl-C "
                                    "keeps them). Exit 0 when nothing was found, 1 otherwise, 2 on bad input.")
    sk.add_argument("--minutes", type=float, default=10.0, metavar="N", help="how long (default 10)")
    sk.add_argument("--until-findings", type=positive, metavar="N",
                    help="stop once N failure classes were found (each minimized)")
    sk.add_argument("--seed", type=int, default=0, metavar="S", help="the same seed draws the same scenarios")
    sk.add_argument("--model", action="append", metavar="MODEL", help="default: all fixtures")
    engine_options(sk)
    sk.add_argument("--known", metavar="PATH", help="known findings of your own, matched after the bundled ones: "
                    "a directory of finding files like findings/, or a YAML list of entries with their front "
                    "matter's fields (name, status, explanation, class, memory, engine, build, needs)")
    sk.add_argument("--minimize-runs", type=positive, default=60, metavar="N",
                    help="candidate runs per finding's minimization (default 60)")
    sk.add_argument("--minimize-minutes", type=float, default=5.0, metavar="N",
                    help="time per finding's minimization (default 5)")
    sk.add_argument("--replays", type=positive, default=10, metavar="N",
                    help="a finding that did not fail again when played again is replayed up to N times "
                         "(within --minimize-minutes) and its rate reported, per order of service of its parallel "
                         "requests (default 10)")
    sk.add_argument("--threads", type=positive, metavar="N", help="llama.cpp threads per engine (default 1)")
    sk.add_argument("--jobs", type=positive, metavar="N", help="models playing each drawn scenario at once "
                    "(default: cores / threads); findings are minimized one at a time")
    sk.add_argument("--report-dir", metavar="DIR", default="reports", help="where findings and soak.html go "
                    "(default: reports/)")
    sk.set_defaults(func=main)


def main(args) -> int:  # argparse's namespace
    """Exit 0 when nothing was found (no finding, no leak), 1 otherwise, 2 on bad input."""
    from .library import engine_factory
    from .status import InputError

    if args.known:
        try:
            extra = findings.load_known(Path(args.known))
        except findings.KnownError as e:
            raise InputError(f"--known: {e}") from None
    known = findings.load_known() + (extra if args.known else [])
    make = engine_factory(args)  # checks every engine option before anything starts
    scratch = Path(tempfile.mkdtemp(prefix="cachecheck-soak-scenarios-"))  # outside the temp dir it watches
    try:
        with own_temp_dir():
            return _soak(args, make, Soak(args, Path(args.report_dir), known), scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _soak(args, make, soak: Soak, scratch: Path) -> int:
    from . import models
    from .campaign import Engines
    from .library import default_models
    from .report import console

    refs = models.resolve(args.model or default_models(make))
    soak.marks["1 start"] = footprint()
    engines = Engines(make)
    deadline = soak.t0 + args.minutes * 60
    jobs = args.jobs or max(1, (os.cpu_count() or 1) // (args.threads or 1))
    pool = ThreadPoolExecutor(max_workers=min(jobs, len(refs)))
    try:
        while time.monotonic() < deadline and not soak.stopped:
            sc = _draw(args, soak.out_dir, soak.scenarios, scratch)
            # the models play it at once; what they found is handled in model order, one at a time
            played = [pool.submit(engines.play, sc, ref, None) for ref in refs]
            for ref, future in zip(refs, played, strict=True):
                res = future.result()
                soak.builds[ref.name] = res.build
                soak.runs += 1
                soak.requests += res.requests
                soak.counts[(grammar.kind_of(sc), ref.name, str(res.status))] += 1
                klass = findings.failure_class(res)
                if klass is not None and not soak.stopped:
                    _found(soak, engines, sc, ref, res, klass, scratch, console.say)
                    if args.until_findings and len(soak.groups) >= args.until_findings:
                        soak.stopped = f"--until-findings {args.until_findings} reached"
            soak.scenarios += 1
            # the baseline to stay flat against: engines up, and contexts of most batch shapes made once (the
            # allocator keeps what the largest needed: measured, a worker grows 14 MB over its first 100
            # random scenarios, 2 MB over the next 400)
            if "2 warm" not in soak.marks and time.monotonic() - soak.t0 >= 0.2 * (deadline - soak.t0):
                soak.marks["2 warm"] = footprint()
            if soak.scenarios % 20 == 0:
                console.say(f"  {time.monotonic() - soak.t0:5.0f} s: {soak.scenarios} scenarios, {soak.runs} runs, "
                            f"{soak.requests} requests, {dict(soak.statuses())}; {len(soak.groups)} finding(s); "
                            f"{footprint()}")
        soak.marks["3 end"] = footprint()
    except KeyboardInterrupt as e:  # Ctrl-C, or TERM / HUP (Stopped): keep what was found
        soak.stopped = f"interrupted ({e or 'Ctrl-C'})"
        soak.marks["3 end"] = footprint()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        engines.close()  # a play still running in the pool ends on its engine's error
    soak.marks["4 after"] = footprint()
    soak.marks.setdefault("2 warm", soak.marks["3 end"])
    m = soak.marks
    found_leaks = [] if soak.stopped.startswith("interrupted") else \
        leaks(m["1 start"], m["2 warm"], m["3 end"], m["4 after"], servers_kept=len(refs) * (1 + REFERENCES_KEPT))
    path = soak.publish(found_leaks)
    _summary(soak, refs, found_leaks, console.say)
    console.say(f"report: {path}")
    return 1 if soak.groups or found_leaks else 0


def _draw(args, out_dir: Path, index: int, scratch: Path) -> Scenario:
    sc = grammar.checked(grammar.random_scenario(args.seed, index), scratch)
    sc = replace(sc, path=out_dir / f"{sc.name}.yaml")  # where a finding is saved: replay commands name it
    return sc.with_settings(threads=args.threads) if args.threads else sc


def _found(soak: Soak, engines, sc: Scenario, ref, res, klass: tuple[str, str], scratch: Path, say) -> None:
    """A failing run: one more copy of a class seen, or a new class written, minimized and matched."""
    key = (klass, res.memory)
    group = soak.groups.get(key)
    if group is not None:
        group.count += 1
        if ref.name not in group.models:
            group.models.append(ref.name)
        say(f"  again: {klass[0]} {klass[1]} [{res.memory}] in {sc.name} on {ref.name} ({group.count} so far)")
        return
    from .results import write_atomic
    from .runner import replay_command

    size = minimize.size_of(sc, res)
    # one file per class and model: another model's finding in the same scenario is another file
    sc = replace(sc, path=sc.path.with_name(f"{sc.name}.{ref.name.removeprefix('fixture:')}.yaml"))
    replay = replay_command(sc, ref.name, None, engines.replay_args.get(ref.name, []))
    sc.path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(sc.path, dump(sc, f"{sc.purpose}; {res.status} on {ref.name}: {res.reason}"))
    group = soak.groups[key] = Group(klass[0], klass[1], res.memory, sc.path.name, res.reason, str(size), replay,
                                     models=[ref.name])
    say(f"{res.status} {sc.name} [{ref.name}]: {res.reason}  (replay: {replay})")
    again = engines.play(sc, ref, None)  # a finding that does not come back is measured, not shrunk
    if findings.failure_class(again) != klass:
        group.flaky = True
        say(f"  played again it gave {again.status}: replaying it up to {soak.args.replays} times")
        group.rate = flaky.measure(lambda: engines.play(sc, ref, None), klass, soak.args.replays,
                                   soak.args.minimize_minutes * 60, first=again)
        group.minimize_note = f"not minimized (flaky): {group.rate.text()}"
        say(f"  flaky: {group.rate.text()}")
        best = sc
    else:
        best = _minimize(soak, engines, sc, ref, res, klass, group, say)
    group.known = findings.explain(soak.known, klass, memory=res.memory, engine=res.engine, build=res.build, sc=best,
                                   events=findings.evidence(res))
    if group.known:
        say(f"  known: {group.known.name}")
    soak.publish([])  # on disk as found: a Ctrl-C later keeps it


def _minimize(soak: Soak, engines, sc: Scenario, ref, res, klass, group: Group, say) -> Scenario:
    """The smallest scenario that fails alike, within the per-finding budget; the original where none is."""
    from .results import write_atomic
    from .runner import replay_command

    args = soak.args
    min_path = sc.path.with_suffix(".min.yaml")  # soak-SEED-I.MODEL.min.yaml
    t0 = time.monotonic()
    kept: list = [sc, res]
    runs = [0]

    def run(candidate: Scenario) -> object:
        runs[0] += 1
        if args.threads:
            candidate = candidate.with_settings(threads=args.threads)
        return engines.play(candidate, ref, None)

    def accepted(what: str, candidate: Scenario, r) -> None:
        kept[:] = [candidate, r]

    best, why = minimize.minimize(sc, run, klass, max_runs=args.minimize_runs,
                                  timeout=args.minimize_minutes * 60, on_accept=accepted)
    best_res = kept[1]
    if best is sc:
        group.minimize_note = f"not minimized: no smaller scenario fails the same way ({why})"
        return sc
    best = replace(best, path=min_path)
    now = minimize.size_of(best, best_res)
    write_atomic(min_path, dump(best, f"Minimized from {sc.path.name} ({group.size}) to {now}: {klass[0]}, "
                                      f"{klass[1]}, on {ref.name}. It was: {sc.purpose}"))
    replay = replay_command(best, ref.name, None, engines.replay_args.get(ref.name, []))
    group.minimized = {"path": str(min_path), "size": str(now), "requests": now.requests, "stopped": why,
                       "runs": runs[0], "seconds": time.monotonic() - t0,
                       "yaml": dump(best), "replay": replay}
    say(f"  minimized to {now} in {time.monotonic() - t0:.0f} s ({why}): {min_path}")
    return best


def _summary(soak: Soak, refs, found_leaks: list[str], say) -> None:
    statuses = soak.statuses()
    seconds = time.monotonic() - soak.t0
    say(f"soak: seed {soak.args.seed}, {seconds:.0f} s, {soak.scenarios} scenarios x {len(refs)} models = "
        f"{soak.runs} runs, {soak.requests} requests ({soak.requests / max(seconds, 1e-9) * 60:.0f} per minute); "
        + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) + (f"; stopped: {soak.stopped}" if soak.stopped
                                                                         else ""))
    for name, fp in sorted(soak.marks.items()):
        say(f"  {name[2:]:5} {fp}")
    groups = sorted(soak.groups.values(), key=lambda g: g.known is not None)  # the new ones first
    for g in groups:
        tag = (f"known ({g.known.name})" if g.known else "NEW") + (" flaky" if g.flaky else "")
        smallest = g.minimized["path"] if g.minimized else f"{g.scenario} ({g.minimize_note})"
        say(f"  {tag}: {g.status} {g.klass} [{g.memory}] x{g.count} on {', '.join(g.models)}: {smallest}")
    for leak in found_leaks:
        say(f"leak: {leak}")
    if soak.groups or found_leaks:
        new = sum(g.known is None for g in soak.groups.values())
        say(f"soak: {new} new finding(s), {len(soak.groups) - new} known, {len(found_leaks)} leak(s)")
    else:
        say("soak: zero findings, footprint flat, nothing left behind")
