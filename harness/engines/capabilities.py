"""What a llama-server binary understands, read from the binary itself, and our settings in its words.

Flags are renamed and added between builds (`--swa-checkpoints` became `--ctx-checkpoints`,
`--checkpoint-every-n-tokens` gave way to `--checkpoint-min-step`, `-fa` took a value), so a
harness that assumes the flags of one commit cannot start any other. The binary's `--help` is
read once, cached by the binary's hash, and every session setting is mapped to the flag that
build knows, or left out where it is that build's default anyway. A setting the build cannot
honour is `Unsupported`: the scenario that needs it is skipped with the reason, never run with
another meaning.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import builds
from .base import SessionSettings, Unsupported

DEFAULTS = SessionSettings()


@dataclass(frozen=True)
class Capabilities:
    binary: str
    version: str  # as `--version` says it: `9093 (abc1234)`
    options: frozenset[str]  # every option name `--help` lists
    fa_takes_value: bool  # -fa on|off|auto (newer) rather than a switch (older, off by default)

    def first(self, *names: str) -> str | None:
        return next((n for n in names if n in self.options), None)


_OPTION = re.compile(r"--?[A-Za-z][\w-]*")
_VALUE = re.compile(r"[\[<{A-Z0-9]")  # N, [on|off|auto], JINJA_TEMPLATE, <file>: an option's argument


def parse_help(text: str) -> tuple[frozenset[str], bool]:
    """Option names from the start of each `--help` line (names, then their arguments, then the
    description; short names are padded, `-h,    --help`); descriptions also mention flags: not those."""
    options: set[str] = set()
    fa_value = False
    for line in text.splitlines():
        names: list[str] = []
        for tok in line.split():
            tok = tok.rstrip(",")
            if _OPTION.fullmatch(tok):
                names.append(tok)
            elif not names or not _VALUE.match(tok):
                break
        options.update(names)
        if "--flash-attn" in names and "on|off" in line:
            fa_value = True
    return frozenset(options), fa_value


def probe(binary: str) -> Capabilities:
    """Run `--help` and `--version` once per binary (by content hash) and remember the answer."""
    digest = hashlib.sha256(Path(binary).read_bytes()).hexdigest()[:16]
    cache = builds.cache_root() / "capabilities" / f"{digest}.json"
    if cache.exists():
        d = json.loads(cache.read_text())
        return Capabilities(binary, d["version"], frozenset(d["options"]), d["fa_takes_value"])
    try:
        p = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unsupported(f"{binary}: could not run --help: {type(e).__name__}: {e}") from None
    options, fa_value = parse_help(p.stdout + p.stderr)
    if "--port" not in options:
        raise Unsupported(f"{binary}: `--help` lists no --port; is this a llama-server binary?")
    caps = Capabilities(binary, builds.binary_version(Path(binary)), options, fa_value)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"version": caps.version, "options": sorted(options),
                                 "fa_takes_value": fa_value}))
    return caps


def server_flags(caps: Capabilities, s: SessionSettings, cache: bool, chat_template: str | None = None) -> list[str]:
    """The command line that gives this build these settings; `Unsupported` where it cannot."""
    flags = ["-c", str(s.n_ctx), "-b", str(s.n_batch), "-ub", str(s.n_ubatch), "-t", str(s.threads), "-np", "1"]
    # the kernels the thresholds were calibrated on (lowlevel.py says why): no flash attention, no repacking
    if caps.fa_takes_value:
        flags += ["-fa", "off"]
    for switch in ("--no-webui", "--no-warmup", "--no-repack"):
        if switch in caps.options:
            flags.append(switch)
    verbosity = caps.first("-lv", "--verbosity", "--log-verbosity")
    flags += [verbosity, "4"] if verbosity else (["-v"] if "-v" in caps.options else [])
    checkpoints = caps.first("--ctx-checkpoints", "--swa-checkpoints")
    if cache:
        if checkpoints is None:
            raise Unsupported(f"llama-server {caps.version} has no context checkpoints (--ctx-checkpoints)")
        flags += [checkpoints, str(s.ctx_checkpoints)]
        if "--checkpoint-min-step" in caps.options:
            flags += ["--checkpoint-min-step", str(s.checkpoint_min_step)]
        elif s.checkpoint_min_step != DEFAULTS.checkpoint_min_step:
            raise Unsupported(f"llama-server {caps.version} has no --checkpoint-min-step "
                              f"(the scenario sets checkpoint_min_step {s.checkpoint_min_step})")
    else:
        if checkpoints:
            flags += [checkpoints, "0"]
        if "--cache-ram" in caps.options:
            flags += ["--cache-ram", "0"]
    if s.swa_full:
        if "--swa-full" not in caps.options:
            raise Unsupported(f"llama-server {caps.version} has no --swa-full")
        flags.append("--swa-full")
    if chat_template:
        # jinja became the default at some point; the built-in templates are the non-jinja ones
        if "--no-jinja" in caps.options:
            flags.append("--no-jinja")
        flags += ["--chat-template", chat_template]
    return flags
