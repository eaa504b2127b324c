"""Build llama-server (CPU, Release, that target only) from the pinned source, cached by commit.

The default source is the llama.cpp tree vendored in the pinned llama-cpp-python sdist, so the
server and the in-process engine run the same commit. `--source DIR` builds any tree (a PR's).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from . import pins

CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"]


class BuildError(Exception):
    """The server could not be built; the message says which step and its last output line."""


def cache_root() -> Path:
    return Path(os.environ.get("CACHECHECK_SERVER_CACHE", Path.home() / ".cache" / "cachecheck" / "server"))


def pinned_source() -> Path:
    """The sdist's vendored llama.cpp, downloaded once with pip (the only registry we reach)."""
    root = cache_root() / f"src-{pins.LLAMA_CPP_PYTHON_VERSION}"
    tree = root / f"llama_cpp_python-{pins.LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
    if tree.is_dir():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", str(root),
          f"llama-cpp-python=={pins.LLAMA_CPP_PYTHON_VERSION}"], "pip download of the llama-cpp-python sdist")
    sdist = next(root.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(root, filter="data")
    return tree


def build(source: Path | None = None, log=print) -> Path:  # noqa: ANN001 - log is print-like
    if source is None:
        key, src = pins.LLAMA_CPP_COMMIT, pinned_source()
    else:
        src = source.resolve()
        if not (src / "tools" / "server").is_dir():
            raise BuildError(f"{source}: not a llama.cpp source tree (no tools/server)")
        key = "src-" + hashlib.sha256(str(src).encode()).hexdigest()[:12]
    out = cache_root() / key / "llama-server"
    if out.exists() and source is None:
        return out
    build_dir = cache_root() / key / "build"
    log(f"building llama-server from {src} (a few minutes on 2 cores)")
    _run(["cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_FLAGS], "cmake configure")
    _run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
         "cmake build")
    built = build_dir / "bin" / "llama-server"
    if not built.exists():
        raise BuildError(f"cmake build finished but {built} is missing")
    tmp = out.with_suffix(".tmp")
    shutil.copy2(built, tmp)
    os.replace(tmp, out)
    return out


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise BuildError(f"{what} failed: {lines[-1] if lines else proc.returncode}")
