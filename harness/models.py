"""What `--model` can name: fixtures, a GGUF path, or a real model shipped on PyPI."""

from __future__ import annotations

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


def resolve(names: list[str]) -> list[ModelRef]:
    """`all`, `fixture:NAME` (or a bare fixture name), `PATH.gguf`; in the order given."""
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
        path = Path(name).expanduser()
        check_gguf(path)
        refs.append(ModelRef(name, str(path.resolve())))
    return refs
