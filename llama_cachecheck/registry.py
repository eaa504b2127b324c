"""The findings registry: one Markdown file per finding, `findings/NNN-slug.md`.

A finding is read by two kinds of reader: a maintainer (the mechanism with its source lines, the
builds it was measured on, the upstream reports, how to replay it) and the soak (which failure
class, memory kinds, engine, builds and scenario features make it this finding). Both read the
same file: its YAML front matter holds the fields the code matches on, the Markdown below it the
account, so the two cannot drift apart. `findings/README.md` is the index, rendered from them
(`python -m llama_cachecheck.registry` writes it; a test says when it is stale).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from .shipped import shipped

REGISTRY = shipped("findings", "known")  # a wheel carries the files inside the package as `known/`
KINDS = ("wrong answer", "lost reuse", "crash", "error reply", "cache invariant broken")
_OWN = {"id", "title", "kind", "upstream", "builds"}  # the registry's fields; the rest are the matcher's


class RegistryError(Exception):
    """A finding file that cannot be read: one line naming the file and the field."""


def files(directory: Path = REGISTRY) -> list[Path]:
    return sorted(p for p in directory.glob("[0-9][0-9][0-9]-*.md"))


def entries(directory: Path = REGISTRY) -> list[tuple[Path, dict]]:
    """Each finding's file and its front matter, the registry's own fields checked."""
    out = []
    for path in files(directory):
        front = front_of(path)
        number = int(path.name[:3])
        if front.get("id") != number:
            raise RegistryError(f"{path}: id must be {number}, the number the file name starts with")
        for f in ("title", "upstream"):
            if not isinstance(front.get(f), str):
                raise RegistryError(f"{path}: {f} must be given as text")
        if front.get("kind") not in KINDS:
            raise RegistryError(f"{path}: kind must be one of {', '.join(KINDS)}")
        builds = front.get("builds")
        if not isinstance(builds, dict) or not all(isinstance(v, str) for v in builds.values()):
            raise RegistryError(f"{path}: builds must map each build measured to what it showed")
        out.append((path, front))
    return out


def matcher(front: dict) -> dict:
    """What findings.py matches a failure on: the front matter without the registry's own fields, and the name."""
    return {"name": f"finding {front['id']}: {front['title']}", **{k: v for k, v in front.items() if k not in _OWN}}


def front_of(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    m = re.match(r"---\n(.*?\n)---\n", text, re.S)
    if m is None:
        raise RegistryError(f"{path}: no front matter (a YAML block between two --- lines at the top)")
    try:
        front = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise RegistryError(f"{path}:{mark.line + 2 if mark else '?'}: not valid YAML") from None
    if not isinstance(front, dict):
        raise RegistryError(f"{path}: the front matter must be a mapping")
    return front


def index(directory: Path = REGISTRY) -> str:
    """findings/README.md: a row per finding, linking its file."""
    rows = []
    for path, f in entries(directory):
        live = ", ".join(b for b, said in f["builds"].items() if said.startswith("live")) or "none measured"
        memory = ", ".join(f.get("memory", ())) or "any"
        rows.append(f"| [{f['id']}]({path.name}) | {f['title']} | {f['kind']} | {f.get('engine', 'any')} | "
                    f"{memory} | {live} | {f['upstream']} |")
    return ("# Findings\n\n"
            "Cache bugs cachecheck found, one file each: the mechanism with its source lines, the builds\n"
            "measured, the upstream reports, and the case that replays it. The front matter of each file is\n"
            "what `cachecheck soak` matches a failure against and what `cachecheck findings` replays\n"
            "(`cachecheck findings --server-bin B` says which of them a build has). This page is rendered\n"
            "from the files: `python -m llama_cachecheck.registry`.\n\n"
            "| finding | what | kind | engine | memory | live in | upstream |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    target = REGISTRY / "README.md"
    target.write_text(index(), encoding="utf-8")
    print(f"wrote {target}", file=sys.stderr)
