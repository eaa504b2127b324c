"""Benchmark (not a test): the speculative scenarios, with speculation and without, in-process or on llama-server.

    python benchmarks/speculative.py [--engine inproc|server] [--server-bin PATH] [--model all|fixture:NAME ...]
                                     [--repeat N]

Each bundled `spec-*` scenario is played as written (the subject drafts) and with its
`speculative` setting taken out, on every model, one model at a time so both clocks see the
same machine; printed: the wall time of each and the ratio. Engine start and the references
are in both figures alike. With random-weight fixtures a draft of another family is nearly
always rejected, so there it measures the cost of verification and rollback, not a speed-up.
"""

from __future__ import annotations

import argparse
import time

from llama_cachecheck import compare, models
from llama_cachecheck.library import make_engine, server_binary
from llama_cachecheck.runner import run_model
from llama_cachecheck.scenario import BUNDLED, discover


def seconds(binary: str | None, refs: list, scenarios: list, repeat: int) -> tuple[float, int]:
    th = compare.load_thresholds()
    t0 = time.perf_counter()
    n = 0
    for _ in range(repeat):
        for ref in refs:
            res = run_model(ref, scenarios, lambda m: make_engine(m.path, m.name, server_bin=binary),
                            thresholds=th)
            n += sum(len(r.turns) for r in res)
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("inproc", "server"), default="server")
    ap.add_argument("--server-bin")
    ap.add_argument("--model", action="append", help="default: all fixtures")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    binary = server_binary(args.server_bin) if args.engine == "server" else None
    refs = models.resolve(args.model or ["all"])
    print(f"{'scenario':30} {'speculating s':>13} {'plain s':>8} {'ratio':>6} {'replies':>8}")
    total = [0.0, 0.0]
    for sc in (s for s in discover([BUNDLED]) if s.settings.speculative is not None):
        spec, n = seconds(binary, refs, [sc], args.repeat)
        plain, _ = seconds(binary, refs, [sc.with_settings(speculative=None)], args.repeat)
        total[0] += spec
        total[1] += plain
        print(f"{sc.name:30} {spec:13.2f} {plain:8.2f} {spec / plain:6.2f} {n:8d}")
    print(f"{'total':30} {total[0]:13.2f} {total[1]:8.2f} {total[0] / total[1]:6.2f}")


if __name__ == "__main__":
    main()
