"""`cachecheck repro`: a finding as a directory that a maintainer runs with only llama-server and python3.

A finding is worth what a maintainer can do with it, and a maintainer will run a short script against
their build, not install a harness. The case is played once through a llama-server of ours with its
requests recorded (engines/server.py); the directory then holds the model, case.json (the subject's
command line, every request in order, the reference's command line, the request that shows the bug
and how to judge it), repro.py (llama_cachecheck/reproducer.py, standard library only) and ISSUE.md in the
shape of llama.cpp's bug report form.
"""

from __future__ import annotations

import json
import platform
import shlex
import shutil
from pathlib import Path

from . import findings
from .arguments import engine_options, positive
from .engines.base import event_text
from .status import InputError, Status

COPIED_UP_TO = 64 << 20  # a model this small is copied into the directory (fixtures are about 1 MB)


def add_parser(sub, name: str) -> None:  # argparse's subparsers
    """`cachecheck repro`: its options, declared beside the code that runs it."""
    rp = sub.add_parser(name, help="write a directory that reproduces a case with nothing but llama-server and "
                        "python3's standard library", description="Play one scenario (a bundled name, a YAML file, a "
                        "soak's or minimize's output) once through a llama-server of ours, recording every request, "
                        "and write DIR: the model, case.json, repro.py (python3 repro.py PATH/TO/llama-server: exit 1 "
                        "and one line when the bug shows, 0 when not) and ISSUE.md for llama.cpp's tracker. A case "
                        "that passes has nothing to reproduce (exit 2).")
    rp.add_argument("scenario", metavar="SCENARIO", help="a bundled scenario's name, a scenario YAML file, or a "
                    "results.json (with --case)")
    rp.add_argument("--model", metavar="MODEL", help="fixture:NAME, gemma3-270m or PATH.gguf (a results.json case "
                    "names its own)")
    rp.add_argument("--case", metavar="'NAME [MODEL]'", help="the case of a results.json to reproduce, as the "
                    "report names it: 'slots-pinned [fixture:llama]' (or the scenario's name where one model ran it)")
    engine_options(rp)
    rp.add_argument("--threads", type=positive, metavar="N", help="llama.cpp threads (default: the scenario's)")
    rp.add_argument("--tries", type=positive, default=1, metavar="N",
                    help="a flaky case (it fails under one order of service): play it up to N times until it fails "
                         "(default 1)")
    rp.add_argument("--out", metavar="DIR", help="where to write it (default: reports/repro-SCENARIO-MODEL)")
    rp.set_defaults(func=main)


def main(args) -> int:  # argparse's namespace
    """Exit 0 with the directory written, 2 on bad input (a case that passes, one the engine cannot play)."""
    from . import models
    from .applies import skip_reason
    from .campaign import Engines
    from .library import engine_factory
    from .scenario import discover

    if args.engine not in ("server", "llama-cpp-python") or args.server_url:
        raise InputError("repro writes what a llama-server of ours (or llama-cpp-python's Llama) was sent: it needs "
                         "--engine server or llama-cpp-python (and no --server-url: a server someone else started "
                         "cannot be started again by the script)")
    scenario, model = _from_results(args) if args.scenario.endswith(".json") else (args.scenario, args.model)
    if model is None:
        raise InputError("repro needs --model (fixture:NAME, gemma3-270m or PATH.gguf)")
    found = discover([scenario])
    if len(found) != 1:
        raise InputError(f"{scenario}: repro takes one scenario, found {len(found)}")
    sc = found[0].with_settings(threads=args.threads) if args.threads else found[0]
    (ref,) = models.resolve([model])
    engines = Engines(engine_factory(args))
    try:
        engine = engines.engine(ref)
        why = skip_reason(sc, engine.info.memory, None)
        if why:
            raise InputError(f"{sc.name} on {ref.name}: the engine cannot play it ({why})")
        for _ in range(args.tries):
            engine = engines.engine(ref)  # a new one after an ERROR
            engine.recording = []
            res = engines.play(sc, ref, None)
            if res.status not in (Status.PASS, Status.NOISE):
                break
        case = _case(sc, ref, engine, res)
    finally:
        engines.close()
    out = Path(args.out or f"reports/repro-{sc.name}-{ref.name.replace(':', '-')}")
    copies = _beside(case)
    _write(out, ref, case, _issue(sc, ref, engine, res, case), copies)
    print(f"{res.status} {sc.name} [{ref.name}]: {res.error_class or res.reason[:300]}")
    print(f"reproducer: {out} (python3 {out / 'repro.py'}{_binary(engine)})")
    return 0


def _from_results(args) -> tuple[str, str]:
    """The scenario file and the model of one case of a results.json."""
    from .results import read

    rows = read(Path(args.scenario))["results"]
    if not args.case:
        raise InputError(f"{args.scenario}: name the case to reproduce with --case 'NAME [MODEL]' "
                         f"({len(rows)} cases in it)")
    hits = [r for r in rows if args.case in (f"{r['scenario']} [{r['model']}]", r["scenario"])]
    if len(hits) != 1:
        bad = [f"{r['scenario']} [{r['model']}]" for r in rows if r["status"] not in ("PASS", "NOISE", "SKIP")]
        said = "no case of that name" if not hits else f"{len(hits)} cases of that name: add the model"
        raise InputError(f"{args.scenario}: --case {args.case!r}: {said} ({len(rows)} cases; not passing: "
                         f"{', '.join(bad[:5]) or 'none'}{', ...' if len(bad) > 5 else ''})")
    return hits[0]["path"], hits[0]["model"]


def _binary(engine) -> str:
    return f" {engine.binary}" if hasattr(engine, "binary") else ""  # llama-cpp-python's case needs none


def _case(sc, ref, engine, res) -> dict:  # a ServerEngine or an LcpEngine, an outcomes.ScenarioResult
    """case.json: what the subject ran with and was sent, and the request that shows the bug."""
    if res.status == Status.SKIP:
        raise InputError(f"{sc.name} on {ref.name}: the engine cannot play it ({res.reason})")
    if res.status in (Status.PASS, Status.NOISE):
        raise InputError(f"{sc.name} on {ref.name}: {res.status} on {res.build}: nothing to reproduce")
    steps = [dict(s) for s in engine.recording]
    known = _known(sc, res)
    bad = res.first_bad
    lcp = not hasattr(engine, "binary")
    if bad is not None:
        if lcp:  # one request per turn, in order
            step = steps[bad.index - 1]
        else:  # the server's recording has slot actions and parallel blocks too: found by its prompt
            same = [t for t in res.turns[:bad.index - 1] if t.subject.prompt_tokens == bad.subject.prompt_tokens]
            hits = [s for s in steps if s.get("tokens") == bad.subject.prompt_tokens]
            step = hits[len(same)] if len(same) < len(hits) else hits[-1]
        step["judge"] = ({"kind": "reuse", "promised": bad.verdict.promised_reuse, "why": known.name if known else ""}
                         if res.status == Status.LOST_REUSE else {"kind": "answer"})
    th = res.thresholds
    return {"title": f"{sc.name} on {Path(ref.path).name}: {res.status}", "status": str(res.status),
            "reason": res.reason, "abort": res.error_class.partition(": ")[2] if " died: " in res.error_class else "",
            "scenario": sc.name, "purpose": sc.purpose, "build": res.build,
            "model": Path(ref.path).name if Path(ref.path).stat().st_size <= COPIED_UP_TO else str(ref.path),
            **({"engine": "llama-cpp-python", "lcp": _lcp(engine)} if lcp else
               {"subject_args": engine.subject_flags, "reference_args": engine.ref_flags}),
            "thresholds": {"max_dlogprob": th.max_dlogprob, "max_kl": th.max_kl, "tie": th.tie_margin},
            # requests sent at once may show it only when the server takes them up in one order
            "tries": 10 if any(s.get("block") is not None for s in steps) else 1, "steps": steps}


def _lcp(engine) -> dict:  # an engines.lcp.LcpEngine
    s = engine.settings
    return {"version": engine.info.llama_cpp.split()[1], "cache": engine.cache,
            "settings": {"n_ctx": s.n_ctx, "n_batch": s.n_batch, "n_ubatch": s.n_ubatch, "n_threads": s.threads,
                         "n_threads_batch": s.threads, "swa_full": s.swa_full}}


def _beside(case: dict) -> list[str]:
    """A draft model travels with the case too: its path becomes a name beside the script (which finds it there)."""
    copies = []
    for args in (case.get("subject_args", []), case.get("reference_args", [])):
        for i, a in enumerate(args):
            if a.endswith(".gguf") and Path(a).is_file() and Path(a).stat().st_size <= COPIED_UP_TO:
                copies.append(a)
                args[i] = Path(a).name
    return copies


def _write(out: Path, ref, case: dict, issue: str, copies: list[str]) -> None:
    from .results import publish

    out.mkdir(parents=True, exist_ok=True)
    if not Path(case["model"]).is_absolute():
        shutil.copyfile(ref.path, out / case["model"])
    for a in copies:
        shutil.copyfile(a, out / Path(a).name)
    script = Path(__file__).with_name("reproducer.py").read_text()
    run = ("#!/bin/sh\n# the case with only llama-cpp-python and python3: ./run.sh\n" if "lcp" in case else
           "#!/bin/sh\n# the case with only llama-server and python3: ./run.sh PATH/TO/llama-server\n") + \
        'exec python3 -I "$(dirname "$0")/repro.py" "$@"\n'
    publish({out / "case.json": json.dumps(case, indent=1), out / "repro.py": script, out / "run.sh": run,
             out / "ISSUE.md": issue})
    (out / "run.sh").chmod(0o755)


def _known(sc, res):  # -> findings.Known | None
    return findings.explain(findings.load_known(), findings.failure_class(res) or ("", ""), memory=res.memory,
                            engine=res.engine, build=res.build, sc=sc, events=findings.evidence(res))


def _issue(sc, ref, engine, res, case: dict) -> str:
    """ISSUE.md in the fields of llama.cpp's bug report form (Name and Version, Operating systems, modules,
    Command line, Problem description & steps to reproduce, First Bad Commit, Relevant log output)."""
    known = _known(sc, res)
    if "lcp" in case:
        return _lcp_issue(sc, res, case, known)
    subject = shlex.join([str(engine.binary), "-m", case["model"], *case["subject_args"]])
    said = case["abort"] or res.reason
    mechanism = f"\n\n### What we know of the mechanism\n\n{known.name}.\n\n{known.explanation}\n" if known else ""
    bad = res.first_bad
    errors = [ln.strip() for ln in res.reason.partition("; log: ")[2].split(" | ") if " E " in f" {ln} "]
    log = case["abort"] or "\n".join(errors or [res.reason] + ([f"cache events of request {bad.index}: " + "; ".join(
        event_text(e) for e in bad.subject.events)] if bad is not None and bad.subject.events else []))
    return f"""### Name and Version

{res.build}

### Operating systems

{platform.system()} {platform.release()} ({platform.machine()})

### Which llama.cpp modules do you know to be affected?

llama-server

### Command line

```shell
{subject}
```

### Problem description & steps to reproduce

{case['title']}. {said}

The scenario: {sc.purpose}

Found by cachecheck, which plays each prompt again as a full re-process from empty memory (a second
llama-server of the same build with every cache off: `{shlex.join(case['reference_args'])}`) and compares.
To reproduce with nothing but this build and python3 (the model is in the directory, or named in case.json):

```shell
python3 repro.py /path/to/llama-server   # prints BUG and exits 1 where the bug shows
```
{mechanism}
### First Bad Commit

Not bisected here (`cachecheck bisect {sc.name} --model {ref.name} --good A --bad B` finds it).

### Relevant log output

```
{log}
```
"""


def _lcp_issue(sc, res, case: dict, known) -> str:
    """ISSUE.md in the sections of llama-cpp-python's issue template."""
    lcp = case["lcp"]
    made = ", ".join(f"{k}={v!r}" for k, v in lcp["settings"].items())
    mechanism = f"\n\n# What we know of the mechanism\n\n{known.name}.\n\n{known.explanation}\n" if known else ""
    return f"""# Prerequisites

Found by cachecheck, which plays each prompt again as a full re-process (a second `Llama` that forgets its
context first, `reset()`) and compares the replies token by token and by top-k logprobs.

# Expected Behavior

A prompt served from the prompt cache (`{lcp["cache"]}` cache, and `generate`'s prefix match) is answered
as the same prompt processed in full.

# Current Behavior

{case["title"]}. {res.reason}

The scenario: {sc.purpose}

# Environment and Context

llama-cpp-python {lcp["version"]}; {platform.system()} {platform.release()} ({platform.machine()}); Python
{platform.python_version()}. `Llama(model_path={case["model"]!r}, {made})`.

# Steps to Reproduce

In the directory (the model is in it, or named in case.json), with that llama-cpp-python installed:

```shell
python3 repro.py   # prints BUG and exits 1 where the bug shows
```

It sends every request of case.json in order (`create_completion` for token ids, `create_chat_completion`
for messages, greedy) to one `Llama` with the cache set, and the judged one also to a fresh `Llama`.
{mechanism}"""
