"""The one interface between the runner and every engine.

"Complete this prompt with these settings; tell me the tokens, their top-k logprobs, how
many prompt tokens were reused vs processed, and what the cache did." The subject keeps its
cache between calls (a server slot); the reference processes every prompt from empty memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..server_defaults import CHECKPOINT_MIN_STEP, CTX_CHECKPOINTS

TopK = list[tuple[int, float]]  # (token id, logprob), best first


class EngineError(Exception):
    """The engine failed on a request: the message says which engine and what it said; `kind` is the class
    of the failure, what a soak groups copies by and a known finding matches: what died and of what (its abort
    line, or the signal), a server that answered 5xx and lived, a time-out."""

    def __init__(self, message: str, kind: str = ""):
        super().__init__(message)
        self.kind = kind


class Refused(EngineError):
    """The engine turned a request down as bad input (a 4xx answer, a slot file it cannot restore): it is
    still running, and a scenario may expect it (a damaged slot file)."""


def damage(path: Path) -> int:
    """A `slot: damage` step: the saved file cut to half its size (its header and tokens stay, the state is cut
    short, as a crash mid-save or a full disk leaves it); the bytes left."""
    if not path.is_file():
        raise EngineError(f"slot file {path.name}: not found in {path.parent}")
    size = path.stat().st_size // 2
    with path.open("r+b") as f:
        f.truncate(size)
    return size


class StartError(EngineError):
    """The engine could not start for this model at all: its other scenarios would fail the same way."""


class Unsupported(Exception):
    """A setting this build cannot honour; the scenario is skipped with this reason."""


class ModelUnsupported(Unsupported):
    """The build cannot run this model at all (e.g. it predates the architecture): all its scenarios skip."""


@dataclass(frozen=True)
class Prompt:
    """Either chat messages (rendered by the engine's chat template) or raw token ids.

    A message is (role, content), or (role, content, JSON of its agent-loop fields in OpenAI's words:
    reasoning_content, tool_calls, tool_call_id). Tools and template variables are JSON text too, so a
    prompt stays hashable (engines key their renderings by it)."""

    messages: tuple[tuple[str, ...], ...] | None = None
    tokens: tuple[int, ...] | None = None
    tools: str | None = None  # the tool definitions a client sends with every request (OpenAI's format)
    template_vars: str | None = None  # the chat template's own variables (llama-server: chat_template_kwargs)

    def message_dicts(self) -> list[dict]:
        return [{"role": m[0], "content": m[1], **(json.loads(m[2]) if len(m) > 2 else {})}
                for m in self.messages or ()]

    def chat_options(self) -> dict:
        """What a chat request sends besides its messages: the tools, the template's variables."""
        out: dict = {}
        if self.tools:
            out["tools"] = json.loads(self.tools)
        if self.template_vars:
            out["chat_template_kwargs"] = json.loads(self.template_vars)
        return out


def template_features(source: str | None) -> tuple[str, ...]:
    """What a jinja chat template renders beyond role and content: `tools` (definitions and calls),
    `reasoning` (reasoning_content), and `var:NAME` for each variable of its own a request may set
    (llama.cpp's built-in templates, and a template jinja cannot read: none)."""
    if not source:
        return ()
    import jinja2
    import jinja2.meta

    try:
        names = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(source))
    except jinja2.TemplateError:
        return ()
    out = ["tools"] if "tools" in names and "tool_calls" in source else []
    out += ["reasoning"] if "reasoning_content" in source else []
    return tuple(out + [f"var:{n}" for n in sorted(names - _GIVEN)])


# what every renderer gives a template itself: not a variable a scenario sets
_GIVEN = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "raise_exception"}


# the n-gram drafters llama-server names in --spec-type (they need no draft model)
NGRAM_DRAFTERS = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")


@dataclass(frozen=True)
class Speculative:
    """Speculative decoding of the subject (the reference never speculates): a draft model, or an n-gram
    drafter. With greedy sampling it must not change a single token; on recurrent and hybrid memory a
    rejected draft is rolled back by restoring a checkpoint of the whole memory."""

    draft: str | None = None  # a fixture (fixture:NAME), `self` (the model drafts for itself) or PATH.gguf
    ngram: str | None = None  # one of NGRAM_DRAFTERS
    n_max: int = 4
    n_min: int = 0


@dataclass(frozen=True)
class SessionSettings:
    """The defaults every scenario starts from (it states only what differs)."""

    n_ctx: int = 2048
    n_batch: int = 64  # small, so that prompts of a few hundred tokens cross batch boundaries
    n_ubatch: int = 64
    ctx_checkpoints: int = CTX_CHECKPOINTS  # llama-server's default
    checkpoint_min_step: int = CHECKPOINT_MIN_STEP  # llama-server's default
    threads: int = 1  # tiny models: one thread per engine, engines in parallel
    swa_full: bool = False
    # a server's slots and host memory; None is the profile's (isolated: one slot; deployed: the build's own)
    n_parallel: int | None = None
    kv_unified: bool | None = None
    cache_ram: int | None = None  # MiB of host memory for the prompt cache: 0 off, -1 no limit
    cache_idle_slots: bool | None = None  # idle slots saved to the host cache (and cleared, with unified KV)
    slot_prompt_similarity: float | None = None  # how much of a prompt a slot must share to be chosen for it
    speculative: Speculative | None = None
    # llama-server's --cache-reuse: the smallest chunk of the cached prompt it shifts into place when a prompt
    # diverges from it and meets it again further on (0: off; attention memory only, see library.check_fit)
    cache_reuse: int = 0

    @property
    def unified_kv(self) -> bool:
        """Whether the server's KV cache is unified: as set, else the server's own rule, unified only where it
        chooses the slots' number (server.cpp: "n_parallel is set to auto, using n_parallel = 4 and
        kv_unified = true"); given -np, the slots' caches stay apart."""
        return self.n_parallel is None if self.kv_unified is None else self.kv_unified


# what only a llama-server we start can be given: an engine that runs with its own settings skips a scenario
# that sets any of these (naming them)
SERVER_SETTINGS = ("n_parallel", "kv_unified", "cache_ram", "cache_idle_slots", "slot_prompt_similarity",
                   "speculative", "cache_reuse")


def settings_set(settings: SessionSettings, names: tuple[str, ...] = SERVER_SETTINGS) -> list[str]:
    """Which of `names` a scenario sets to other than the defaults."""
    defaults = SessionSettings()
    return [n for n in names if getattr(settings, n) != getattr(defaults, n)]


def event_text(e: dict) -> str:
    """One cache event as the timeline shows it: kind @n_tokens [pos_min, pos_max]."""
    if e["kind"] == "full-reprocess":
        return f"full-reprocess (lcp {e['n_tokens']})"
    if e["kind"] == "speculated":  # the reply's verify batches, from where it began
        return (f"speculated @{e['n_tokens']}: {e['batches']} drafts verified ({e['rolled_back']} rolled back), "
                f"{e['drafted']} tokens drafted, {e['accepted']} accepted")
    if "slot" in e:  # a slot or host-cache event: the prompt it moved, and where
        where = [f"slot {e['slot']}"] if e["slot"] >= 0 else []
        where += [f"lcp {e['lcp']}"] if "lcp" in e else []
        where += [f"similarity {e['similarity']:.3g}"] if "similarity" in e else []
        size = f"{e['n_tokens']} tokens" if e["n_tokens"] >= 0 else "an entry"
        return f"{e['kind']} {size}" + (f" ({', '.join(where)})" if where else "")
    return f"{e['kind']} @{e['n_tokens']} [{e['pos_min']}, {e['pos_max']}]"


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    top: list[TopK]  # at each generated position
    n_reused: int
    n_processed: int
    events: list[dict] = field(default_factory=list)  # kind, n_tokens, pos_min, pos_max
    ends_with_eog: bool = False  # the last token is the end-of-generation token (not part of the reply text)
    exact: bool = False  # a reference that made the subject's own decode calls: a correct cache gives the same bits
    inexact: str = ""  # why a reference could not (the comparison then falls back to the calibrated tolerance)
    # how an inexact reference's numbers may be arranged otherwise than the subject's (batches, cells, window:
    # engines/noise_floor.py), where the engine knows; () is any of them
    arrangement: tuple[str, ...] = ()
    slot: int | None = None  # the server slot that served it, where known
    reuse_reported: bool = True  # False: the engine does not say what it reused (n_reused 0), nothing is judged
    n_prompt: int | None = None  # the prompt's length where prompt_tokens are not its tokens (OpenAI: its messages)
    held: list[int] | None = None  # what the slot holds after it, where the engine knows (in-process: the policy's)
    order: int | None = None  # of requests sent at once: the rank in which the server took it up (from its log)

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_tokens) if self.n_prompt is None else self.n_prompt


@dataclass(frozen=True)
class EngineInfo:
    engine: str  # a name of arguments.ENGINES
    model: str  # display name
    path: str
    arch: str
    memory: str  # attention / swa / recurrent / hybrid
    n_swa: int
    n_vocab: int
    llama_cpp: str  # commit or build the engine runs
    builtin_template: str | None = None  # llama.cpp's named template, for a GGUF that ships none
    ascii_only: bool = False  # a cachecheck fixture: its vocabulary has no bytes for other characters
    template_features: tuple[str, ...] = ()  # what its chat template renders beyond role and content
    # whose design its reuse is judged by (runner._Play._promise): "policy", the pinned llama-server's checkpoint
    # and slot policy; "prefix-match", llama-cpp-python's generate; "engagement", a server of unknown design
    reuse_design: str = "policy"
    profile: str = ""  # whose calibration judges it beyond the model's own: server-deployed, server-isolated


class Engine(Protocol):
    info: EngineInfo

    def start_session(self, settings: SessionSettings) -> SessionSettings:
        """Forget every cache: a new conversation on a fresh slot. Returns what the subject runs with
        (a server profile or the user's own flags may leave batch sizes and checkpoints to the build)."""

    def replay_args(self) -> list[str]:
        """The `cachecheck run` options that make this same engine again (engine, build, profile, flags)."""

    def subject_command(self) -> str:
        """How the subject was started, for the report (a server's full command line), or ''."""

    def complete(self, prompt: Prompt, n_predict: int, top_k: int, id_slot: int | None = None) -> Completion:
        """The subject: served through the cache (on slot `id_slot`, or the one the engine chooses)."""

    def complete_parallel(self, requests: list[tuple[Prompt, int, int, int | None]]) -> list[Completion]:
        """Several subject requests sent at once (prompt, n_predict, top_k, id_slot), in their order."""

    def slot_action(self, action: str, file: str | None, id_slot: int) -> int:
        """`save` a slot to a file, `restore` one from it, `erase` it; the number of tokens it concerned."""

    def reference(self, prompt: Prompt, n_predict: int, top_k: int, held: list[int] | None = None) -> Completion:
        """Ground truth: the same prompt processed in full from empty memory. Where the design shifts
        cached chunks into place (cache_reuse on attention memory), there is no such truth: the answer
        is what those chunks give, so the reference shifts them too, from `held` (the tokens the
        subject's slot held before this request) processed afresh."""

    def score(self, prompt: Prompt, tokens: list[int], top_k: int) -> list[TopK] | None:
        """Teacher forcing: the reference's top-k at each position of `tokens`, or None."""

    def tokenize(self, text: str, add_special: bool) -> list[int]: ...

    def detokenize(self, tokens: list[int]) -> list[str]:
        """One display piece per token."""

    def close(self) -> None: ...
