"""The one way the tests run `cachecheck` as a user does: a separate process, output captured, bounded."""

import subprocess
import sys


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
