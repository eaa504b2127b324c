"""Benchmark (not a test): the bundled suite's wall time vs the time spent inside llama_decode.

    python benchmarks/suite.py [--model all|fixture:NAME|PATH|gemma3-270m ...] [--threads N]

One model at a time, so the two clocks measure the same work. The ratio says how much of a
run is llama.cpp itself and how much is the harness (policy, comparison, IPC, Python).
"""

from __future__ import annotations

import argparse
import time

from llama_cachecheck import compare, models
from llama_cachecheck.engines.inproc import InprocEngine
from llama_cachecheck.runner import play
from llama_cachecheck.scenario import BUNDLED, discover


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="default: all fixtures")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    scenarios = [sc.with_settings(threads=args.threads) for sc in discover([BUNDLED])]
    thresholds = compare.load_thresholds()
    total_wall = total_decode = 0.0
    print(f"{'model':24} {'scenarios':>9} {'wall s':>8} {'decode s':>9} {'decode/wall':>11}")
    for ref in models.resolve(args.model or ["all"]):
        t0 = time.perf_counter()
        eng = InprocEngine(ref.path, ref.name)
        n = 0
        for sc in scenarios:
            if sc.applies_to(eng.info.memory):
                play(sc, eng, ref.name, None, thresholds=compare.thresholds_for(thresholds, ref.name, eng.info.memory))
                n += 1
        decode = eng.decode_seconds()
        eng.close()
        wall = time.perf_counter() - t0
        total_wall += wall
        total_decode += decode
        print(f"{ref.name:24} {n:9d} {wall:8.2f} {decode:9.2f} {decode / wall:11.1%}")
    print(f"{'total':24} {'':9} {total_wall:8.2f} {total_decode:9.2f} {total_decode / total_wall:11.1%}")


if __name__ == "__main__":
    main()
