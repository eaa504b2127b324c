"""Benchmark (not a test): the bundled library against a llama-server in each profile, and how fast
a `parallel:` block is served next to the same requests one after another.

    python benchmarks/server_profiles.py [--server-bin PATH] [--model all|fixture:NAME ...]

Prints, per profile, the wall time of the whole library on the models; then, on the first model,
the requests per second of slots-parallel-conversations (three conversations sent at once, three
rounds) on the server and on the in-process engine (three slots of its own).
"""

from __future__ import annotations

import argparse
import time

from harness import compare, models
from harness.library import make_engine, server_binary
from harness.runner import run_model
from harness.scenario import BUNDLED, discover, load


def library_seconds(binary: str, profile: str, refs: list, scenarios: list) -> tuple[float, int]:
    th = compare.load_thresholds()
    t0 = time.perf_counter()
    n = 0
    for ref in refs:
        res = run_model(ref, scenarios, lambda m: make_engine(m.path, m.name, server_bin=binary, profile=profile),
                        None, lambda _: True, th, None, lambda _: None)
        n += sum(len(r.turns) for r in res)
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server-bin")
    ap.add_argument("--model", action="append", help="default: all fixtures")
    args = ap.parse_args()
    binary = server_binary(args.server_bin)
    refs = models.resolve(args.model or ["all"])
    scenarios = discover([BUNDLED])
    print(f"{'profile':10} {'models':>6} {'replies':>8} {'wall s':>8}")
    for profile in ("deployed", "isolated"):
        seconds, n = library_seconds(binary, profile, refs, scenarios)
        print(f"{profile:10} {len(refs):>6} {n:>8} {seconds:>8.1f}")
    par = load(BUNDLED / "slots-parallel-conversations.yaml")
    th = compare.load_thresholds()
    for label, engine in (("server, parallel: blocks", lambda m: make_engine(m.path, m.name, server_bin=binary)),
                          ("in-process, parallel: blocks", lambda m: make_engine(m.path, m.name))):
        t0 = time.perf_counter()
        [res] = run_model(refs[0], [par], engine, None, lambda _: True, th, None, lambda _: None)
        seconds = time.perf_counter() - t0
        print(f"{label:30} {refs[0].name}: {len(res.turns)} requests ({res.status}) in {seconds:.2f} s, "
              f"{len(res.turns) / seconds:.1f} requests/s (with engine start and references)")


if __name__ == "__main__":
    main()
