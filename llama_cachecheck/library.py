"""What every command shares: `-k` selection, the server binary, one engine factory.

Kept apart from `cli.py` so that selftest, calibrate, conformance, bisect, the pytest plugin and
the benchmark use the same pieces without importing the command line (and it them).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from . import builds, pins
from .engines.base import Engine
from .scenario import Scenario
from .status import InputError


def select(scenarios: list[Scenario], expr: str | None) -> list[Scenario]:
    """pytest-style -k: words match a scenario's name or tags; and / or / not / parentheses."""
    if not expr:
        return scenarios
    stray = re.sub(r"[\w.\-()\s]", "", expr)
    if stray:  # `regen*` must not quietly run as `regen`: words match as substrings already
        raise InputError(f"-k {expr!r}: {stray[0]!r} is not understood (use words, and / or / not, parentheses)")
    words = re.findall(r"[\w.-]+|[()]", expr)
    py = " ".join(w if w in ("and", "or", "not", "(", ")") else f"m({w!r})" for w in words)
    try:
        compile(py, "-k", "eval")
    except SyntaxError:
        raise InputError(f"-k: cannot parse {expr!r}") from None
    chosen = []
    for sc in scenarios:
        def m(word: str, sc: Scenario = sc) -> bool:
            return word in sc.name or word in sc.tags
        if eval(py, {"__builtins__": {}}, {"m": m}):  # only m() and and/or/not
            chosen.append(sc)
    if not chosen:
        raise InputError(f"-k {expr!r} selects no scenario")
    return chosen


def server_binary(server_bin: str | None) -> str:
    """The llama-server to test: the one named, else the pinned build (built on first use)."""
    if server_bin:
        path = Path(server_bin)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise InputError(f"{path}: not an executable llama-server binary")
        return str(path)
    try:
        return str(builds.build(log=lambda msg: print(f"cachecheck: {msg}", file=sys.stderr)).binary)
    except builds.BuildError as e:
        raise InputError(f"llama-server: {e}") from None


def check_libllama(path: str) -> str:
    """The directory of a libllama the pinned bindings can drive, or one line saying why not."""
    from .engines.base import EngineError
    from .engines.worker import Worker

    p = Path(path).expanduser()
    lib_dir = p.parent if p.name.startswith("libllama.so") else p
    if not (lib_dir / "libllama.so").is_file():
        raise InputError(f"--libllama {path}: no libllama.so there (build one with `cachecheck lib build`)")
    try:  # a child process: llama-cpp-python binds the library it first loads, once
        Worker("llama_cachecheck.engines.lowlevel:check_abi", (), name="libllama", timeout=120,
               env={"LLAMA_CPP_LIB_PATH": str(lib_dir.resolve())}).close()
    except EngineError as e:
        raise InputError(f"--libllama {path}: cannot be driven by these bindings: {e}") from None
    return str(lib_dir.resolve())


def check_flags(server_bin: str, flags: str, reference_bin: str | None = None) -> None:
    """`--server-args` against that binary's `--help`, and the reference's build (which takes the flags that
    change the numbers), before anything starts: one line, exit 2."""
    from .engines.base import Unsupported
    from .engines.capabilities import BadServerArgs, check_server_args, kernel_flags, probe

    try:
        caps = probe(server_bin)
        words, _ = check_server_args(caps, flags)
        if reference_bin:
            kernel_flags(caps, words, probe(reference_bin))
    except (BadServerArgs, Unsupported) as e:
        raise InputError(str(e)) from None


def server_options(args, server_bin: str | None, reference_bin: str | None = None) -> dict:  # argparse's namespace
    """`--server-profile` and `--server-args` as make_engine's keywords, checked before anything starts."""
    profile, flags = args.server_profile, args.server_args
    if (profile or flags) and server_bin is None:
        raise InputError("--server-profile and --server-args start a llama-server: they need --engine server")
    if flags and getattr(args, "server_url", None):
        raise InputError("--server-args are flags for a server we start; the one at --server-url has its own")
    if flags:
        check_flags(server_bin, flags, reference_bin)
    return {"profile": profile or "deployed", "server_args": flags or ""} if server_bin else {}


def make_engine(path: str, name: str, fault: str | None = None, server_bin: str | None = None, *,
                server_url: str | None = None, reference_bin: str | None = None, replay: bool = True,
                libllama: str | None = None, profile: str = "deployed", server_args: str = "") -> Engine:
    """In-process unless a server binary is given; the server engine learns the model's memory kind
    from llama.cpp in-process first (the server's own word on it is not in its API)."""
    from .engines.inproc import InprocEngine

    if server_bin is None:
        return InprocEngine(path, name, fault, replay=replay, libllama=libllama)
    from .engines.server import ServerEngine
    from .models import info_of

    return ServerEngine(server_bin, path, name, info_of(path), server_url=server_url, reference_bin=reference_bin,
                        profile=profile, server_args=server_args)


def check_server_url(url: str) -> None:
    """A `--server-url` where a llama-server answers (/health, and /props in its words), before anything starts:
    one line, exit 2 otherwise."""
    from .engines.base import EngineError
    from .engines.server_process import AttachedServer

    server = AttachedServer(url, "--server-url")
    try:
        server.check_health()
    except EngineError as e:
        raise InputError(f"--server-url {url}: no server answers there "
                         f"({str(e).removeprefix(server.name + ': ')})") from None
    try:
        server.props()
    except EngineError as e:
        raise InputError(f"--server-url {url}: {str(e).removeprefix(server.name + ': ')}") from None
    finally:
        server.close()  # nothing of it is ours but its (empty) log file


def engine_factory(args, fault: str | None = None):  # argparse's namespace -> (ModelRef -> Engine)
    """Every engine option of a command checked together, before anything starts, and the factory
    that makes one engine per model from them (run, minimize and soak take the same options)."""
    _check_options(args, fault)
    if args.engine == "openai":
        return _openai_factory(args)
    if args.engine == "llama-cpp-python":
        return _lcp_factory(args)
    server = args.engine == "server"
    url, ref_bin, libllama = args.server_url, args.reference_bin, args.libllama
    reference_bin = server_binary(ref_bin) if ref_bin else None
    server_bin = server_binary(args.server_bin) if server else None
    options = server_options(args, server_bin, reference_bin)
    if url:
        check_server_url(url)
    lib = check_libllama(libllama) if libllama else None
    exact = getattr(args, "tolerance", "exact") == "exact"

    def make(m) -> Engine:  # a models.ModelRef
        return make_engine(m.path, m.name, fault, server_bin, server_url=url, reference_bin=reference_bin,
                           replay=exact, libllama=lib, **options)
    return make


# which engines an option goes with (the first is named when it is given to another); --server-bin is taken
# in-process too, where it is not used
_OPTION_ENGINES = {"server_url": ("server",), "reference_bin": ("server",), "server_bin": ("server", "inproc"),
                   "libllama": ("inproc",), "url": ("openai",), "reference_url": ("openai",), "model_name": ("openai",),
                   "lcp_version": ("llama-cpp-python",), "lcp_cache": ("llama-cpp-python",)}


def _check_options(args, fault: str | None) -> None:
    """An option given to an engine that does not take it is one line, before anything starts."""
    for option, engines in _OPTION_ENGINES.items():
        if getattr(args, option, None) is not None and args.engine not in engines:
            raise InputError(f"--{option.replace('_', '-')} needs --engine {engines[0]}")
    if fault and args.engine != "inproc":
        raise InputError(f"--fault injects bugs into the in-process policy; it cannot change --engine {args.engine}")


def _openai_factory(args):
    """--engine openai: both servers answer /v1/models as OpenAI servers and serve the model asked for
    (the first the subject lists, unless --model-name says); one line, exit 2, otherwise."""
    from .engines.base import EngineError
    from .engines.openai import OpenAIEngine, OpenAIServer, served_models

    if not args.url or not args.reference_url:
        raise InputError("--engine openai needs --url (the server under test) and --reference-url (a second instance "
                         "with its cache off: a cache-off request to the subject would overwrite the slot under test)")
    name = args.model_name  # the model asked for, or the first the subject serves (never written back into args)
    for url in (args.url, args.reference_url):
        server = OpenAIServer(url, url)
        try:
            served = served_models(server)
        except EngineError as e:
            raise InputError(f"{url}: not an OpenAI-compatible server ({e})") from None
        finally:
            server.close()
        if not served:
            raise InputError(f"{url}: /v1/models lists no model")
        name = name or served[0]
        if name not in served:
            raise InputError(f"{url}: does not serve --model-name {name!r} (it serves "
                             f"{', '.join(map(repr, served))})")
    if args.model and len(args.model) > 1:
        raise InputError("--engine openai plays the one model the server serves: give one --model (its GGUF) or none")

    def make(m) -> Engine:  # a models.ModelRef
        return OpenAIEngine(args.url, args.reference_url, name, openai_info(m, args, name))
    make.served = name  # what no --model means for this engine (default_models)
    return make


def _lcp_factory(args):
    """--engine llama-cpp-python: the pinned release's high-level Llama (the in-process engine's bindings), or
    another's from a venv of its own."""
    site = lcp_site(args.lcp_version)

    def make(m) -> Engine:  # a models.ModelRef
        from .engines.lcp import LcpEngine
        from .models import info_of

        return LcpEngine(m.path, m.name, info_of(m.path), args.lcp_version or pins.LLAMA_CPP_PYTHON_VERSION,
                         cache=args.lcp_cache or "ram", site=site)
    return make


def lcp_site(version: str | None) -> str | None:
    """Where another llama-cpp-python release is installed (built first where it is not); None: the pinned one."""
    if version in (None, pins.LLAMA_CPP_PYTHON_VERSION):
        return None
    try:
        return str(builds.lcp_venv(version, log=lambda msg: print(f"cachecheck: {msg}", file=sys.stderr)))
    except builds.BuildError as e:
        raise InputError(str(e)) from None


def openai_info(m, args, name: str):  # a models.ModelRef, argparse's namespace -> engines.base.EngineInfo
    """What is known of a served model: its GGUF's word where --model names it, else nothing but its name
    (memory kind unknown: only the engagement guard judges reuse; no vocabulary: chat scenarios only)."""
    import dataclasses

    from .engines.base import EngineInfo
    from .models import info_of

    where = f"OpenAI-compatible server at {args.url} (model {name}); reference {args.reference_url}"
    if m.path:
        return dataclasses.replace(info_of(m.path), engine="openai", model=m.name, llama_cpp=where,
                                   profile="server-deployed", reuse_design="engagement")
    return EngineInfo("openai", m.name, "", "?", "unknown", 0, 0, where,
                      template_features=("tools", "reasoning", "var:date", "var:think"), reuse_design="engagement")


def default_models(make) -> list[str]:  # what engine_factory made
    """What no --model means: every fixture; with --engine openai, the model the server serves."""
    served = getattr(make, "served", None)
    return [f"openai:{served}"] if served else ["all"]


def check_fit(scenarios: list, refs: list) -> None:
    """A scenario file of the user's that a model it runs on cannot play: its speculative draft cannot draft
    for the model, its agent-loop steps need what the model's chat template does not render, or its
    cache_reuse needs memory that shifts where the model's cannot. One line,
    exit 2, before anything starts. (A bundled scenario is written for the fixtures: on a model it does not
    fit, it is skipped with the reason, as any scenario a model cannot play.)"""
    from .applies import shift_gap, template_gap
    from .models import ModelError, draft_for, info_of
    from .scenario import BUNDLED

    for sc in scenarios:
        if BUNDLED in Path(sc.path).resolve().parents:
            continue
        spec = sc.settings.speculative
        for ref in (r for r in refs if r.path):  # a served model of no file of ours: the server says
            if spec is not None and spec.draft not in (None, "self"):
                try:
                    draft_for(spec.draft, ref.path, ref.name)
                except ModelError as e:
                    raise InputError(f"{sc.path}: settings.speculative.draft {e}") from None
            gap = sc.template_needs and template_gap(sc, info_of(ref.path))
            if gap:
                raise InputError(f"{sc.path}: cannot play on {ref.name}: {gap}")
            gap = sc.settings.cache_reuse and shift_gap(sc, info_of(ref.path))
            if gap:
                raise InputError(f"{sc.path}: settings.cache_reuse: cannot play on {ref.name}: {gap}")
