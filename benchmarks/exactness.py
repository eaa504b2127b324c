"""Measurement (not a test): how exact clean in-process runs are, repeated, at several thread counts.

    python benchmarks/exactness.py [--model all|fixture:NAME|gemma3-270m ...] [--runs 3] [--threads 1 2]

Per model: replies judged exactly and their largest |Δlogprob| (0 when the replayed reference
holds), replies that fell back to the calibrated tolerance (the README's named case) and their
largest distance, and the statuses. Exits 1 if an exact reply differed at all.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict

from llama_cachecheck import compare, models, runner
from llama_cachecheck.engines.inproc import InprocEngine
from llama_cachecheck.scenario import BUNDLED, discover


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="default: all fixtures")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    scenarios = discover([BUNDLED])
    thresholds = compare.load_thresholds()
    exact = defaultdict(lambda: [0, 0.0])  # model -> replies, max distance
    tolerated = defaultdict(lambda: [0, 0.0])
    statuses: dict[str, Counter] = defaultdict(Counter)
    for threads in args.threads:
        for run in range(args.runs):
            for m in models.resolve(args.model or ["all"]):
                res = runner.run_model(m, scenarios, lambda r: InprocEngine(r.path, r.name),
                                       thresholds=thresholds, threads=threads)
                for r in res:
                    statuses[m.name][r.status] += 1
                    for t in r.turns:
                        row = exact[m.name] if t.verdict.rule == "exact" else tolerated[m.name]
                        row[0] += 1
                        row[1] = max(row[1], t.verdict.max_distance)
            print(f"threads {threads}, run {run + 1} done", file=sys.stderr)
    print(f"{'model':22} {'exact replies':>13} {'max Δ':>6} {'tolerance replies':>17} {'max Δ':>9}  statuses")
    for name in statuses:
        e, t = exact[name], tolerated[name]
        print(f"{name:22} {e[0]:13d} {e[1]:6.3g} {t[0]:17d} {t[1]:9.3g}  "
              + ", ".join(f"{k} {v}" for k, v in sorted(statuses[name].items())))
    return 1 if any(e[1] > 0 for e in exact.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
