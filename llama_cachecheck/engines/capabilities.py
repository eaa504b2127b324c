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
import shlex
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from .. import builds
from ..server_defaults import N_PARALLEL_AUTO
from .base import SessionSettings, Speculative, Unsupported

DEFAULTS = SessionSettings()


PROFILES = ("deployed", "isolated")  # how the subject is started; `deployed` is what a user gets
REFERENCE_ALIAS = "cachecheck-reference"  # the reference llama-server's model name (--alias): a name, no numbers


class BadServerArgs(ValueError):
    """`--server-args` this binary cannot take, or one the harness owns: one line, before anything starts."""


@dataclass(frozen=True)
class Entry:
    """One option of `--help`: its names (aliases), whether it takes a value, its stated default."""

    names: tuple[str, ...]
    takes_value: bool
    default: str | None
    text: str = ""  # its argument and description, as `--help` words them (the values it takes)


@dataclass(frozen=True)
class Capabilities:
    binary: str
    version: str  # as `--version` says it: `9093 (abc1234)`
    options: frozenset[str]  # every option name `--help` lists
    fa_takes_value: bool  # -fa on|off|auto (newer) rather than a switch (older, off by default)
    entries: tuple[Entry, ...] = ()

    def first(self, *names: str) -> str | None:
        return next((n for n in names if n in self.options), None)

    def entry(self, name: str) -> Entry | None:
        return next((e for e in self.entries if name in e.names), None)

    def default(self, name: str) -> str | None:
        """The build's own default for an option, as its `--help` states it."""
        e = self.entry(name)
        return e.default if e else None

    @classmethod
    def from_help(cls, binary: str, version: str, text: str) -> Capabilities:
        entries = parse_help(text)
        names = frozenset(n for e in entries for n in e.names)
        fa = any("--flash-attn" in e.names and e.takes_value for e in entries)
        return cls(binary, version, names, fa, tuple(entries))


_OPTION = re.compile(r"--?[A-Za-z][\w-]*")
# N, [on|off|auto], JINJA_TEMPLATE, <file>, none,draft-simple,ngram-mod: an option's argument
_VALUE = re.compile(r"[\[<{A-Z0-9]|[a-z][\w-]*(?:,[\w-]+)+$")
_DEFAULT = re.compile(r"\(default:\s*([^,)\s]+)")


def parse_help(text: str) -> list[Entry]:
    """The options of a `--help` text: an entry starts at a line that begins with option names
    (names, then their arguments, then the description; short names are padded, `-h,    --help`)
    and goes on over the indented lines below it; descriptions also mention flags: not those."""
    entries: list[Entry] = []
    names: list[str] = []
    value = False
    words: list[str] = []

    def close() -> None:
        if names:
            m = _DEFAULT.search(" ".join(words))
            entries.append(Entry(tuple(names), value, m.group(1) if m else None, " ".join(words)))

    for line in text.splitlines():
        here: list[str] = []
        takes = False
        toks = line.split()
        for tok in toks:
            tok = tok.rstrip(",")
            if _OPTION.fullmatch(tok) and not takes:
                here.append(tok)
            elif here and _VALUE.match(tok) and not takes:
                takes = True
            else:
                break
        if here and not line[:1].isspace():
            close()
            names, value, words = here, takes, toks[len(here):]  # the argument too: the values it takes
        elif names:
            words += toks
    close()
    return entries


def probe(binary: str) -> Capabilities:
    """Run `--help` and `--version` once per binary (by content hash) and remember the answer."""
    digest = hashlib.sha256(Path(binary).read_bytes()).hexdigest()[:16]
    cache = builds.cache_root() / "capabilities" / f"{digest}.help.json"
    if cache.exists():
        d = json.loads(cache.read_text())
        return Capabilities.from_help(binary, d["version"], d["help"])
    try:
        p = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unsupported(f"{binary}: could not run --help: {type(e).__name__}: {e}") from None
    text = p.stdout + p.stderr
    caps = Capabilities.from_help(binary, builds.binary_version(Path(binary)), text)
    if "--port" not in caps.options:
        raise Unsupported(f"{binary}: `--help` lists no --port; is this a llama-server binary?")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"version": caps.version, "help": text}))
    return caps


# flags the harness sets itself: the model and where it listens, the context (a scenario setting),
# the log we read events from, where slots are saved, and the chat template both sides must share
OWNED = frozenset({"-m", "--model", "--host", "--port", "-c", "--ctx-size", "-lv", "--verbosity", "--log-verbosity",
                   "-v", "--verbose", "--log-verbose", "--log-file", "--log-disable", "-lc", "--log-colors",
                   "--slot-save-path", "--api-key", "--api-key-file", "--chat-template", "--chat-template-file",
                   "--jinja", "--no-jinja", "-hf", "--hf-repo", "-mu", "--model-url", "--ssl-key-file",
                   "--ssl-cert-file", "--path"})

# --server-args that change what the harness must know of the subject: the promise and the
# invariants are computed from these (a `--no-` name gives False)
MODELLED = {"--batch-size": "n_batch", "--ubatch-size": "n_ubatch", "--ctx-checkpoints": "ctx_checkpoints",
            "--swa-checkpoints": "ctx_checkpoints", "--checkpoint-min-step": "checkpoint_min_step",
            "--swa-full": "swa_full", "--threads": "threads", "--parallel": "n_parallel", "--kv-unified": "kv_unified",
            "--cache-ram": "cache_ram", "--cache-idle-slots": "cache_idle_slots",
            "--slot-prompt-similarity": "slot_prompt_similarity"}


def check_server_args(caps: Capabilities, text: str) -> tuple[list[str], dict]:
    """The user's own flags for the subject, split, checked against this binary's `--help`, and
    what they set of the settings the harness models. `BadServerArgs` names the first bad one."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise BadServerArgs(f"--server-args {text!r}: {e}") from None
    where = f"llama-server {caps.version} ({caps.binary})"
    settings: dict = {}
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, inline = word.partition("=")
        if not _OPTION.fullmatch(name):
            raise BadServerArgs(f"--server-args: {word!r} is not a flag (a value must follow its flag)")
        entry = caps.entry(name)
        if entry is None:
            raise BadServerArgs(f"--server-args: {name} is not an option of {where} (see its --help)")
        if OWNED & set(entry.names):
            raise BadServerArgs(f"--server-args: {name} is set by cachecheck itself (model, port, context size, "
                                "log, slot files and chat template are the harness's); leave it out")
        value: str | None = None
        if entry.takes_value:
            if eq:
                value = inline
            elif i + 1 < len(words):
                i += 1
                value = words[i]
            else:
                raise BadServerArgs(f"--server-args: {name} needs a value")
        field = next((MODELLED[n] for n in entry.names if n in MODELLED), None)
        if field:
            settings[field] = _setting_value(field, name, value)
        i += 1
    return words, settings


def without_overridden(caps: Capabilities, ours: list[str], user: list[str]) -> list[str]:
    """Our flags less those the user's own flags set again (the user's win; the command line stays readable)."""
    theirs = {n for w in user if _OPTION.fullmatch(w.partition("=")[0]) and caps.entry(w.partition("=")[0])
              for n in caps.entry(w.partition("=")[0]).names}
    out: list[str] = []
    skip = False
    for w in ours:
        if skip:
            skip = False
            continue
        e = caps.entry(w) if _OPTION.fullmatch(w) else None
        if e is not None and set(e.names) & theirs:
            skip = e.takes_value
            continue
        out.append(w)
    return out


# what only a cache, the slots or speculation use: the reference computes like the subject with every cache off,
# so of the user's --server-args it takes all but these (and every option of a draft: its names say "draft"; and
# its name, which says it is the reference: REFERENCE_ALIAS)
_NOT_FOR_THE_REFERENCE = frozenset({
    "--alias", "--parallel", "--kv-unified", "--no-kv-unified", "--kv-unified-per-slot", "--cache-ram",
    "--cache-idle-slots", "--no-cache-idle-slots", "--slot-prompt-similarity", "--ctx-checkpoints", "--swa-checkpoints",
    "--checkpoint-min-step", "--cache-reuse", "--context-shift", "--no-context-shift", "--cache-prompt",
    "--no-cache-prompt", "--lookup-cache-static", "--lookup-cache-dynamic", "--slots", "--no-slots"})


def _flag_groups(caps: Capabilities, words: list[str]) -> list[tuple[Entry | None, list[str]]]:
    """Checked --server-args (check_server_args) as their options, each with its words (a value that follows)."""
    out: list[tuple[Entry | None, list[str]]] = []
    for w in words:
        e = caps.entry(w.partition("=")[0]) if _OPTION.fullmatch(w.partition("=")[0]) else None
        if e is None and out and out[-1][0] is not None and out[-1][0].takes_value and len(out[-1][1]) == 1 \
                and "=" not in out[-1][1][0]:
            out[-1][1].append(w)
        else:
            out.append((e, [w]))
    return out


def kernel_flags(caps: Capabilities, user: list[str], reference: Capabilities | None = None) -> list[str]:
    """The user's flags that change the numbers (all but a cache's, a slot's or speculation's), for the
    reference; `BadServerArgs` where the reference's build (another --reference-bin) does not take one."""
    out: list[str] = []
    for e, words in _flag_groups(caps, user):
        drafts = any("draft" in n or n.startswith("--spec") for n in e.names) if e is not None else False
        if e is None or set(e.names) & _NOT_FOR_THE_REFERENCE or drafts:
            continue
        if reference is not None and not set(e.names) & reference.options:
            raise BadServerArgs(f"--server-args: {words[0]} changes how the subject computes, and the reference "
                                f"llama-server {reference.version} ({reference.binary}) has no such option")
        out += words
    return out


def _flash_attention_default(caps: Capabilities) -> str | None:
    """`-fa`'s default where it takes a value: its help words it "('on', 'off', or 'auto', default: 'auto')"."""
    e = caps.entry("--flash-attn")
    m = re.search(r"default:\s*'?(\w+)", e.text) if e is not None and caps.fa_takes_value else None
    return m.group(1) if m else None


def reference_flags(caps: Capabilities, s: SessionSettings, chat_template: str | None, profile: str, *,
                    subject: Capabilities, user: list[str]) -> list[str]:
    """The reference's command line: one slot, every cache off, and the numbers computed as the subject's are,
    in batches cut where the subject's are.
    `s` is what the subject runs with (effective_settings: its batch and micro-batch, threads, --swa-full); the
    kernels are the profile's (isolated: no flash attention, no repacking; deployed: the subject build's own
    defaults, named where the reference's build is another), then every number-changing flag of the user's.
    DESIGN 4: a reference that computes differently is a second noise source, removed instead of tolerated."""
    alone = replace(s, n_parallel=None, kv_unified=None, cache_ram=None, cache_idle_slots=None,
                    slot_prompt_similarity=None, speculative=None, cache_reuse=0)
    flags = server_flags(caps, alone, False, chat_template)
    if profile == "deployed":
        flags = [f for f in flags if f != "--no-repack"]
        fa = _flash_attention_default(subject)
        flags = without_overridden(caps, flags, ["-fa"]) + (["-fa", fa] if fa and caps.fa_takes_value else [])
    # the subject's checkpoint settings too: it ends a prompt's batches where it makes checkpoints (at a user
    # message, 4 + n_ubatch and 4 tokens before the end: server-context.cpp 3531-3559), and a reference that does
    # not batches the same prompt otherwise; every request it gets is cache_prompt: false, so it restores none
    checkpoints = caps.first("--ctx-checkpoints", "--swa-checkpoints")
    if checkpoints:
        same = [checkpoints, str(s.ctx_checkpoints)]
        same += ["--checkpoint-min-step", str(s.checkpoint_min_step)] if "--checkpoint-min-step" in caps.options else []
        flags = without_overridden(caps, flags, same) + same
    if "--alias" in caps.options:  # what it is, for whoever looks at the processes (footprint.py)
        flags += ["--alias", REFERENCE_ALIAS]
    mine = kernel_flags(subject, user, caps)
    return without_overridden(caps, flags, mine) + mine


def matched_flags(caps: Capabilities, ref_flags: list[str], n_swa: int, slot_dir: str) -> list[str] | None:
    """The matched reference's command line (matched.py): the reference's without checkpoints (a batch is then cut
    at n_batch only, so each request is one call of the subject's), with the whole window kept (a window model
    with no checkpoint re-processes any prefix it kept), and a slot directory to erase its slot in; None where
    the build lacks one of these."""
    checkpoints = caps.first("--ctx-checkpoints", "--swa-checkpoints")
    if checkpoints is None or "--slot-save-path" not in caps.options or (n_swa and "--swa-full" not in caps.options):
        return None
    flags = without_overridden(caps, ref_flags, [checkpoints, "0"]) + [checkpoints, "0"]
    if n_swa and "--swa-full" not in flags:
        flags.append("--swa-full")
    return flags + ["--slot-save-path", slot_dir]


def _setting_value(field: str, name: str, value: str | None):  # the field's type
    if value is None:
        return not (name.startswith("--no-") or name.startswith("-no-"))
    try:
        return float(value) if field == "slot_prompt_similarity" else int(value)
    except ValueError:
        raise BadServerArgs(f"--server-args: {name} {value!r}: expected a number") from None


def _as_int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


# the settings the deployed profile leaves to the build unless a scenario sets them; a group is
# passed whole when a scenario sets any of it (the batch and its micro-batch go together)
_LEFT_TO_THE_BUILD = ((("n_batch", ("--batch-size", "-b")), ("n_ubatch", ("--ubatch-size", "-ub"))),
                      (("ctx_checkpoints", ("--ctx-checkpoints", "--swa-checkpoints")),),
                      (("checkpoint_min_step", ("--checkpoint-min-step",)),))


def effective_settings(caps: Capabilities, s: SessionSettings, profile: str, user: dict) -> SessionSettings:
    """What the subject really runs with: the user's flags first, then what the scenario sets, then (in
    the deployed profile, for what cachecheck would only default) the build's own default."""
    out = replace(s, **user)
    if profile == "deployed":
        for group in _LEFT_TO_THE_BUILD:
            if any(getattr(s, f) != getattr(DEFAULTS, f) for f, _ in group):
                continue  # the scenario set it: server_flags passes it
            for field, names in group:
                build_default = next((_as_int(caps.default(n)) for n in names if caps.default(n)), None)
                if field not in user and build_default is not None:
                    out = replace(out, **{field: build_default})
    if out.cache_ram is None:  # the host-memory prompt cache is on where the build has one, by its default
        out = replace(out, cache_ram=(_as_int(caps.default("--cache-ram")) or 0) if "--cache-ram" in caps.options
                      else 0)
    # llama.cpp caps a batch at the context and a micro-batch at the batch
    n_batch = min(out.n_batch, out.n_ctx)
    return replace(out, n_batch=n_batch, n_ubatch=min(out.n_ubatch, n_batch))


def _slot_flags(caps: Capabilities, s: SessionSettings) -> list[str]:
    """A scenario's slot and host-cache settings in this build's words; `Unsupported` where it has none."""
    flags: list[str] = []
    for value, on, off in ((s.n_parallel, "--parallel", None), (s.cache_ram, "--cache-ram", None),
                           (s.slot_prompt_similarity, "--slot-prompt-similarity", None),
                           (s.kv_unified, "--kv-unified", "--no-kv-unified"),
                           (s.cache_idle_slots, "--cache-idle-slots", "--no-cache-idle-slots")):
        if value is None:
            continue
        name = on if off is None or value else off
        if name not in caps.options:
            raise Unsupported(f"llama-server {caps.version} has no {name}")
        flags += [name] if off is not None else [name, str(value)]
    return flags


def speculative_flags(caps: Capabilities, spec: Speculative) -> list[str]:
    """The subject's speculative decoding in this build's words (its `draft` a GGUF path by now);
    `Unsupported` where the build has no such drafter. Newer builds name the draft drafter too
    (--spec-type draft-simple) and renamed --draft-max to --spec-draft-n-max; older ones draft
    whenever -md is given."""
    kinds = caps.entry("--spec-type")
    named = re.split(r"[\s,{}\[\]|]+", kinds.text) if kinds is not None else []
    if spec.ngram is not None:
        if spec.ngram not in named:
            raise Unsupported(f"llama-server {caps.version} has no n-gram drafter {spec.ngram} (--spec-type)")
        flags = ["--spec-type", spec.ngram]
    else:  # builds that name no draft-simple (b9093: --spec-type is for "when no draft model is provided") draft on -md
        flags = ["--spec-type", "draft-simple"] if "draft-simple" in named else []
    if spec.draft is None:
        return flags  # the n-gram drafters size their drafts by their own options
    model = caps.first("--spec-draft-model", "--model-draft", "-md")
    if model is None:
        raise Unsupported(f"llama-server {caps.version} has no draft model option (-md)")
    flags += [model, spec.draft]
    for value, names in ((spec.n_max, ("--spec-draft-n-max", "--draft-max", "--draft")),
                         (spec.n_min, ("--spec-draft-n-min", "--draft-min"))):
        name = caps.first(*names)
        if name is None:
            raise Unsupported(f"llama-server {caps.version} has no {names[0]}")
        flags += [name, str(value)]
    return flags


def server_flags(caps: Capabilities, s: SessionSettings, cache: bool, chat_template: str | None = None, *,
                 profile: str = "isolated") -> list[str]:
    """The command line that gives this build these settings; `Unsupported` where it cannot.

    `isolated` (and every reference): one slot, the kernels the thresholds were calibrated on (no
    flash attention, no repacking: lowlevel.py says why) and every setting in the build's words.
    `deployed` (subjects only): the build's own defaults, as its users start it; added are only
    the context size, the threads (speed alone), our log verbosity, and what a scenario sets to
    other than cachecheck's defaults (it asked for that).
    """
    deployed = cache and profile == "deployed"
    # each slot gets the scenario's context, as in-process (and the reference) have it: without a unified KV
    # cache the server splits -c among its slots (n_ctx_slot = n_ctx / n_parallel; auto is 4 slots)
    split = cache and not s.unified_kv
    flags = ["-c", str(s.n_ctx * ((s.n_parallel or N_PARALLEL_AUTO) if split else 1)), "-t", str(s.threads)]
    if not deployed or (s.n_batch, s.n_ubatch) != (DEFAULTS.n_batch, DEFAULTS.n_ubatch):
        flags += ["-b", str(s.n_batch), "-ub", str(s.n_ubatch)]
    if not deployed and s.n_parallel is None:
        flags += ["-np", "1"]
    if not deployed and caps.fa_takes_value:
        flags += ["-fa", "off"]
    if cache:
        flags += _slot_flags(caps, s)
        if s.speculative is not None:
            flags += speculative_flags(caps, s.speculative)
        if s.cache_reuse:
            if "--cache-reuse" not in caps.options:
                raise Unsupported(f"llama-server {caps.version} has no --cache-reuse")
            flags += ["--cache-reuse", str(s.cache_reuse)]
    for switch in ("--no-webui",) if deployed else ("--no-webui", "--no-warmup", "--no-repack"):
        if switch in caps.options:  # no web UI is built: not what we test
            flags.append(switch)
    verbosity = caps.first("-lv", "--verbosity", "--log-verbosity")
    flags += [verbosity, "4"] if verbosity else (["-v"] if "-v" in caps.options else [])
    checkpoints = caps.first("--ctx-checkpoints", "--swa-checkpoints")
    if cache:
        if checkpoints is None:
            raise Unsupported(f"llama-server {caps.version} has no context checkpoints (--ctx-checkpoints)")
        if not deployed or s.ctx_checkpoints != DEFAULTS.ctx_checkpoints:
            flags += [checkpoints, str(s.ctx_checkpoints)]
        if "--checkpoint-min-step" in caps.options:
            if not deployed or s.checkpoint_min_step != DEFAULTS.checkpoint_min_step:
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
