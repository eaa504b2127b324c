"""Measurement (not a test): how many server replies came out bit-identical to the reference's.

    cachecheck run --engine server --model ... --json r.json
    python benchmarks/server_exactness.py r.json [more.json ...]

Per model of each results file: the replies compared, how many are bit-identical (the same tokens and the
same top-k logprobs to the last digit the server reports), and the same for the turns where the subject
reused nothing (there a correct cache cannot differ: what differs is the set-up), with the non-PASS among
those. The share says how much of a server run could be judged exactly; benchmarks/RESULTS.md keeps the
dated figures.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict

from llama_cachecheck.results import read


def rows(path: str) -> dict[tuple[str, str], Counter]:
    out: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in read(path)["results"]:
        for t in r["turns"]:
            c = out[(r["model"], r["memory"])]
            same = t["subject"]["tokens"] == t["reference"]["tokens"] and t["subject"]["top"] == t["reference"]["top"]
            c["replies"] += 1
            c["exact"] += same
            if t["reused"] == 0:
                c["fresh"] += 1
                c["fresh exact"] += same
                c["fresh non-PASS"] += t["status"] != "PASS"
    return out


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for path in sys.argv[1:]:
        print(path)
        for (model, memory), c in sorted(rows(path).items()):
            share = 100 * c["exact"] / max(1, c["replies"])
            print(f"  {model:24} {memory:9} replies {c['replies']:4}  bit-identical {c['exact']:4} ({share:3.0f}%)  "
                  f"reused nothing {c['fresh']:3}: bit-identical {c['fresh exact']:3}, non-PASS {c['fresh non-PASS']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
