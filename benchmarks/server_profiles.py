"""Benchmark (not a test): the bundled library against a llama-server in each profile, where its time
goes, and how fast a `parallel:` block is served.

    python benchmarks/server_profiles.py [--server-bin PATH] [--model all|fixture:NAME ...] [--jobs N]

Prints, per profile, the wall time of the whole library on the models, run as `cachecheck run
--engine server` runs it (models in parallel, --jobs, default the cores), and the seconds spent
per part summed over the models (server start, each endpoint, reading the log): with --jobs > 1
they add up to more than the wall time. Then, on the first model, the requests per second of
slots-parallel-conversations (three conversations at once, three rounds), server and in-process.
"""

from __future__ import annotations

import argparse
import collections
import os
import time

from llama_cachecheck import compare, models
from llama_cachecheck.library import make_engine, server_binary
from llama_cachecheck.runner import run_all, run_model
from llama_cachecheck.scenario import BUNDLED, discover, load


def library_seconds(binary: str, profile: str, refs: list, scenarios: list, jobs: int
                    ) -> tuple[float, int, collections.Counter]:
    engines = []

    def engine(m):
        engines.append(make_engine(m.path, m.name, server_bin=binary, profile=profile))
        return engines[-1]

    t0 = time.perf_counter()
    res = run_all(refs, scenarios, engine, jobs=jobs)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(r.turns) for r in res), sum((e.clock for e in engines), collections.Counter())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server-bin")
    ap.add_argument("--model", action="append", help="default: all fixtures")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--profile", action="append", choices=("deployed", "isolated"), help="default: both")
    args = ap.parse_args()
    binary = server_binary(args.server_bin)
    refs = models.resolve(args.model or ["all"])
    scenarios = discover([BUNDLED])
    for profile in args.profile or ("deployed", "isolated"):
        seconds, n, clock = library_seconds(binary, profile, refs, scenarios, args.jobs)
        print(f"{profile}: {len(refs)} models, {n} replies, {seconds:.1f} s wall (--jobs {args.jobs})")
        for part, spent in clock.most_common():
            print(f"  {part:44} {spent:7.1f} s")
    par = load(BUNDLED / "slots-parallel-conversations.yaml")
    th = compare.load_thresholds()
    for label, engine in (("server, parallel: blocks", lambda m: make_engine(m.path, m.name, server_bin=binary)),
                          ("in-process, parallel: blocks", lambda m: make_engine(m.path, m.name))):
        t0 = time.perf_counter()
        [res] = run_model(refs[0], [par], engine, thresholds=th)
        seconds = time.perf_counter() - t0
        print(f"{label:30} {refs[0].name}: {len(res.turns)} requests ({res.status}) in {seconds:.2f} s, "
              f"{len(res.turns) / seconds:.1f} requests/s (with engine start and references)")


if __name__ == "__main__":
    main()
