"""Benchmark (not a test): the bundled library's wall time per engine, as `cachecheck run` plays it.

    python benchmarks/engines.py [--model fixture:NAME ...]   (default: fixture:llama and fixture:jamba)

inproc, server (the pinned llama-server, deployed profile), llama-cpp-python (the pinned release, RAM
cache) and openai (two pinned llama-servers we start per model: the build's defaults as the subject, one
with its cache off as the reference). Each prints its wall time and its statuses; a case an engine cannot
play is SKIP, so the counts say how much of the library each engine covers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llama_cachecheck import builds, models
from llama_cachecheck.engines.server_process import ServerProcess


def run(engine_args: list[str], model: str, out: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llama_cachecheck.cli", "run", "--model", model, *engine_args,
                    "--json", str(out),
                    "--report-dir", str(out.parent)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    return wall, json.loads(out.read_text())["counts"] if out.exists() else {"(no results)": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="default: fixture:llama and fixture:jamba")
    args = ap.parse_args()
    server_bin = str(builds.build().binary)
    print(f"{'model':18} {'engine':18} {'wall s':>7}  statuses")
    for ref in models.resolve(args.model or ["fixture:llama", "fixture:jamba"]):
        with tempfile.TemporaryDirectory() as tmp:
            servers = [ServerProcess(server_bin, ref.path, flags, name) for flags, name in (
                (["-c", "8192"], "bench openai subject"),
                (["-np", "1", "--no-cache-prompt", "--cache-ram", "0"], "bench openai reference"))]
            try:
                for s in servers:
                    s.start()
                for name, engine_args in (
                        ("inproc", []), ("server", ["--engine", "server"]),
                        ("llama-cpp-python", ["--engine", "llama-cpp-python"]),
                        ("openai", ["--engine", "openai", "--url", servers[0].url, "--reference-url",
                                    servers[1].url])):
                    wall, counts = run(engine_args, ref.name, Path(tmp) / f"{name}.json")
                    said = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                    print(f"{ref.name:18} {name:18} {wall:7.1f}  {said}", flush=True)
            finally:
                for s in servers:
                    s.close()


if __name__ == "__main__":
    main()
