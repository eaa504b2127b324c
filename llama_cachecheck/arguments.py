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


# The one table of engines (lm-evaluation-harness's registry practice): every command's --engine takes
# these names, library.make_engine makes them, and CONTRIBUTING.md says how to add one.
ENGINES = {
    "inproc": "llama.cpp in-process through llama-cpp-python (default): the pinned llama-server's checkpoint, "
              "slot and speculative decoding policy, the reference replaying its decode calls (exact comparison)",
    "server": "a real llama-server with its cache on (subject) against one with caching off (reference), "
              "compared with the calibrated tolerance",
    "llama-cpp-python": "llama-cpp-python's own prompt cache: its high-level Llama (prefix match, and --lcp-cache "
                        "ram|disk) against a second Llama that processes every prompt in full, compared with the "
                        "calibrated tolerance",
    "openai": "any OpenAI-compatible server at --url (subject) against a second instance with its cache off at "
              "--reference-url, chat scenarios only, compared by token text with the calibrated tolerance; a "
              "prompt that continues the last one must report cached tokens (the engagement guard)",
}


def engine_options(p: argparse.ArgumentParser) -> None:
    """Which engine plays the scenarios and how: run, soak and minimize take the same options, so a
    finding of one is played again by the others (and by the replay command) on the same engine."""
    p.add_argument("--engine", choices=list(ENGINES), default="inproc",
                   help="; ".join(f"{name}: {what}" for name, what in ENGINES.items()))
    p.add_argument("--server-bin", metavar="PATH",
                   help="with --engine server: the llama-server to test (a PR's build); default: built from the "
                        "pinned source")
    p.add_argument("--server-url", metavar="URL",
                   help="with --engine server: test a running llama-server (slot 0) instead of starting one; --model "
                        "must name the GGUF it serves (the reference runs it in a process of ours). No log: no "
                        "cache events")
    server_options(p)
    p.add_argument("--reference-bin", metavar="PATH",
                   help="with --engine server: run the reference (caching off) on this other llama-server, e.g. "
                        "master's, so the run answers 'does my build change what the cache gives?'")
    p.add_argument("--url", metavar="URL",
                   help="with --engine openai: the OpenAI-compatible server under test (its /v1/chat/completions)")
    p.add_argument("--reference-url", metavar="URL",
                   help="with --engine openai: a second instance of that server with its prefix cache off")
    p.add_argument("--model-name", metavar="NAME",
                   help="with --engine openai: the served model to ask for (default: the first /v1/models lists); "
                        "--model may name its GGUF, for its memory kind and calibration")
    p.add_argument("--lcp-version", metavar="V",
                   help="with --engine llama-cpp-python: the release to test (default: the pinned one, "
                        "the bindings cachecheck runs on); another is built once into a venv of its own "
                        "(`cachecheck lib venv --lcp-version V`, minutes on 2 cores) and cached")
    p.add_argument("--lcp-cache", choices=["ram", "disk", "none"],
                   help="with --engine llama-cpp-python: the cache set on its Llama (ram: LlamaRAMCache, the default; "
                        "LlamaDiskCache; none: the prefix match in generate alone)")
    p.add_argument("--libllama", metavar="DIR",
                   help="run the in-process engine on this libllama (its directory or libllama.so), e.g. a PR's from "
                        "`cachecheck lib build`; refused if the pinned bindings cannot drive it")
    p.add_argument("--tolerance", choices=["exact", "calibrated"], default="exact",
                   help="exact (default): in-process, the reference makes the subject's own decode calls, so any "
                        "difference fails, except the cases the README names; calibrated: it chunks prompts its own "
                        "way and differences within llama_cachecheck/thresholds.json are noise (always so for "
                        "llama-server)")
