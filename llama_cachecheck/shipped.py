"""Where the data the project ships is found: the bundled scenarios and the fixture specs.

They live at the top of the source tree (`scenarios/`, `fixtures/`), where a contributor edits
them; a wheel carries them inside the package (pyproject maps them there), so an installed
cachecheck finds them beside its code, and a checkout or an editable install at the top.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped(top: str, inside: str | None = None) -> Path:
    """The directory `top` of the source tree, or `llama_cachecheck/<inside>` (default: the same name) of a wheel."""
    packaged = _PACKAGE / (inside or top)
    return packaged if packaged.is_dir() else _PACKAGE.parent / top
