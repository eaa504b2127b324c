"""The options several commands share, declared once: each command module adds its own with these."""

from __future__ import annotations

import argparse

from .engines.capabilities import PROFILES


def positive(text: str) -> int:
    """argparse type: a whole number of at least 1 (threads, jobs, runs)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def server_options(p: argparse.ArgumentParser) -> None:
    """How the subject llama-server is started: every command that starts one takes these."""
    p.add_argument("--server-profile", choices=PROFILES, metavar="PROFILE",
                   help="how the subject llama-server is started: deployed (default) = the build's own defaults "
                        "(several slots, unified KV, host-memory prompt cache), as its users run it; isolated = one "
                        "slot, no flash attention, no repacking, every setting given")
    p.add_argument("--server-args", metavar="'FLAGS'",
                   help="your own flags for the subject llama-server, e.g. '-np 8 --cache-ram 2048 -fa on'; checked "
                        "against that binary's --help (model, port, context, log and template are cachecheck's)")
