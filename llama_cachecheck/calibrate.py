"""Calibrate the noise thresholds: run the bundled library clean, several times, at several thread
counts, and set each memory kind's threshold a safe factor above the largest distance seen (noise.py).

The reference chunks prompts its own way here (`--tolerance calibrated`), as llama-server's
batches do: these thresholds judge the server engine and the cases exact comparison cannot take.
`--engine server --server-profile P` measures a llama-server profile instead (its kernels differ:
the deployed profile runs the build's flash attention and batch sizes), written as `server-P/KIND`;
it plays the single-conversation library, which the pinned build serves correctly, so that no
finding of the several-slot scenarios is taken for noise. A real model there (`server-P/MODEL`) gets its
noise floor from uncached repeats instead (engines/noise_floor.py): what `run` would measure on the spot,
written down, through no cache whose bug could pass for noise.

Reproducible by `cachecheck calibrate --write`; the file records how it was made.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from rich.table import Table

from . import campaign, compare, models, noise, pins
from .arguments import ENGINES, positive, server_options
from .engines.base import SessionSettings
from .engines.inproc import InprocEngine
from .noise import RULE, UNCALIBRATED, Noise
from .report.console import out, progress_bar
from .results import write_atomic
from .scenario import BUNDLED, discover
from .status import MEMORY_KINDS, InputError


def add_parser(sub, name: str) -> None:  # argparse's subparsers
    """`cachecheck calibrate`: its options, declared beside the code that runs it."""
    cal = sub.add_parser(name, help="measure clean distances over runs and thread counts; write "
                         "llama_cachecheck/thresholds.json")
    cal.add_argument("--runs", type=positive, default=3, metavar="N", help="clean runs per thread count (default 3)")
    cal.add_argument("--threads", type=positive, nargs="+", default=[1, 2], metavar="N",
                     help="thread counts to measure across (default: 1 2)")
    cal.add_argument("--model", action="append", metavar="MODEL",
                     help="default: all fixtures (thresholds per memory kind); a real model such as gemma3-270m "
                          "gets thresholds of its own")
    cal.add_argument("--engine", choices=list(ENGINES), default="inproc",
                     help="inproc (default): the in-process engine with a reference that chunks its own way; server: "
                          "a llama-server profile (thresholds written as server-PROFILE/KIND)")
    cal.add_argument("--server-bin", metavar="PATH", help="with --engine server: default built from the pinned source")
    server_options(cal)
    cal.add_argument("--write", action="store_true", help="write the thresholds file (default: only print)")
    cal.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from .library import make_engine, server_binary, server_options

    if args.engine not in ("inproc", "server"):
        raise InputError(f"calibrate measures the in-process engine and llama-server, not --engine {args.engine} "
                         "(it is judged with the thresholds of the model's memory kind)")
    scenarios = discover([BUNDLED])
    refs = models.resolve(args.model or ["all"])
    prefix = ""
    if args.engine == "server":
        binary = server_binary(args.server_bin)
        server = server_options(args, binary)
        prefix = f"server-{server['profile']}/"
        scenarios = [sc for sc in scenarios if sc.single_conversation]

        def engine_for(r: models.ModelRef):  # an Engine
            return make_engine(r.path, r.name, server_bin=binary, **server)
    else:
        def engine_for(r: models.ModelRef):  # an Engine
            return InprocEngine(r.path, r.name, replay=False)
    seen: dict[str, Noise] = {}
    arranged: dict[str, dict[str, Noise]] = {}  # a real model on a server: per arrangement (engines/noise_floor.py)
    statuses: dict[str, int] = {}
    uncalibrated = {k: UNCALIBRATED for k in MEMORY_KINDS}
    fixtures = [m for m in refs if m.name.startswith("fixture:") or not prefix]
    for threads in args.threads:
        for run in range(args.runs):
            with progress_bar(len(fixtures) * len(scenarios), f"threads {threads}, run {run + 1}") as advance:
                results = []
                for m in fixtures:  # one model at a time: thread counts mean what they say
                    results += campaign.run_model(m, scenarios, engine_for, thresholds=uncalibrated,
                                                  threads=threads, progress=advance)
            for r in results:
                statuses[r.status] = statuses.get(r.status, 0) + 1
                key = prefix + (r.memory if r.model.startswith("fixture:") else r.model)
                for t in r.turns:
                    seen.setdefault(key, Noise()).add(t.verdict, t.subject.top, t.reference.top)
            for m in refs:
                if m not in fixtures:  # a real model on a server: its noise floor, as `run` measures it
                    out.print(f"{m.name}: noise floor, threads {threads}, run {run + 1}")
                    for a, n in _noise_floor(engine_for(m), threads).items():
                        arranged.setdefault(prefix + m.name, {}).setdefault(a, Noise()).merge(n)
    seen.update({kind: noise.merged(each) for kind, each in arranged.items()})
    thresholds = {kind: noise.limits(arranged[kind]) if kind in arranged else s.limits() for kind, s in seen.items()}
    t = Table("memory / model", "replies", "max clean Δlogprob", "max clean KL", "clean flips (max margin)",
              "preference moved",
              "threshold Δlogprob", "threshold KL", "tie margin", title="calibration", title_justify="left")
    rows = [(kind, s, thresholds[kind]) for kind, s in seen.items()]
    rows += [(f"{kind}, {a}", n, thresholds[kind]["arrangements"][a]) for kind in arranged
             for a, n in arranged[kind].items()]
    for kind, s, th in rows:
        t.add_row(kind, str(s.replies), f"{s.max_dlogprob:.3g}", f"{s.max_kl:.3g}",
                  f"{s.flips} ({s.max_flipped_margin:.3g})", f"{s.max_preference_shift:.3g}",
                  f"{th['max_dlogprob']:.3g}", f"{th['max_kl']:.3g}", f"{th['tie']:.3g}")
    out.print(t)
    if statuses:
        out.print("statuses (without thresholds, so only token divergences count): " +
                  ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    if args.write:
        old = json.loads(compare.THRESHOLDS_FILE.read_text()) if compare.THRESHOLDS_FILE.exists() else {}
        runs = old.get("runs", {})
        how = (f"cachecheck calibrate --runs {args.runs} --threads {' '.join(map(str, args.threads))} "
               f"--model {' --model '.join(r.name for r in refs)}"
               + (f" --engine server --server-profile {server['profile']}" if prefix else "") + " --write")
        for key in seen:
            runs[key] = {"how": how, "made": time.strftime("%Y-%m-%d"), "machine": platform.machine()}
        doc = {
            "rule": RULE,
            "llama_cpp": pins.LLAMA_CPP_COMMIT, "runs": runs,
            "measured": {**old.get("measured", {}), **{k: {**s.as_dict(), **({"arrangements": {
                a: n.as_dict() for a, n in arranged[k].items()}} if k in arranged else {})} for k, s in seen.items()}},
            "thresholds": {**old.get("thresholds", {}), **thresholds},
        }
        write_atomic(compare.THRESHOLDS_FILE, json.dumps(doc, indent=1) + "\n")
        out.print(f"wrote {compare.THRESHOLDS_FILE}")
    return 0


def _noise_floor(engine, threads: int) -> dict[str, Noise]:  # engine: ServerEngine
    try:
        return engine.noise_floor(SessionSettings(threads=threads))
    finally:
        engine.close()
