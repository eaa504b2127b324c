"""What a scenario is once read: its steps, settings and sampling, and the Scenario itself (frozen).

Defaults live here, in one place; a scenario states what differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..engines.base import SessionSettings
from ..status import MEMORY_KINDS

DEFAULT_SETTINGS = SessionSettings()


@dataclass(frozen=True)
class Sampling:
    n_predict: int = 16  # greedy tokens per reply: enough for a divergence to show
    top_k: int = 10  # logprobs kept per position for the comparison


@dataclass(frozen=True)
class Expect:
    reuse: bool = True  # check that each request reuses what the policy promises


class ScenarioError(Exception):
    """Bad scenario input; the message is one line: file:line: what is wrong."""


# steps ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolCall:
    """A call of one of the scenario's tools, as an assistant message (or a reply) makes it."""

    name: str
    arguments: str  # JSON text of the arguments object, as OpenAI's API carries it


@dataclass(frozen=True)
class Message:
    role: str  # system / user / assistant / tool
    content: str
    label: str | None = None
    reasoning: str | None = None  # assistant: the reasoning it wrote before its answer (reasoning_content)
    tool_calls: tuple[ToolCall, ...] = ()  # assistant: the tools it called
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Generate:
    label: str | None = None
    id_slot: int | None = None  # pin the request to this server slot (None: the server chooses)
    n_predict: int | None = None  # None: the scenario's sampling; 0 processes the prompt only (a primer)
    line: int = field(default=0, compare=False)
    # the reply, as the client got it, also called these tools (a random-weight model never writes a valid
    # call: the scenario says which, and the conversation goes on as an agent loop's does)
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class TemplateVars:
    """`template_vars: {date: ..., think: true}`: the chat template's own variables for the requests that follow
    in this conversation (llama-server: chat_template_kwargs). A date line that changes, a reply opened for
    reasoning."""

    values: str  # JSON object; a later step's values replace the same names


@dataclass(frozen=True)
class Regenerate:
    times: int = 1


@dataclass(frozen=True)
class Edit:
    turn: int | str  # 1-based user turn, or a label
    content: str
    line: int = field(default=0, compare=False)  # where it was written, for messages; not what it does


@dataclass(frozen=True)
class Truncate:
    turns: int | None = None  # chat: keep this many user turns (with their replies)
    tokens: int | None = None  # raw: keep this many tokens
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Tokens:
    text: str | None = None
    random_length: int = 0
    seed: int = 0


@dataclass(frozen=True)
class Splice:
    """Raw: the prompt's tokens [at, at + delete) replaced by `insert`'s (a chunk deleted, inserted or
    replaced in the middle: what --cache-reuse shifts the rest of the cache over)."""

    at: int
    delete: int = 0
    insert: Tokens | None = None
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Switch:
    """`conversation: NAME`: the steps after it edit that conversation (a new one on first use)."""

    name: str


@dataclass(frozen=True)
class Request:
    """One request of a `parallel:` block: the next reply of a conversation, or its regeneration."""

    conversation: str
    regenerate: bool = False
    id_slot: int | None = None
    n_predict: int | None = None


@dataclass(frozen=True)
class Parallel:
    """Requests sent at once, one per conversation; each is then compared with its own reference."""

    requests: tuple[Request, ...]
    line: int = field(default=0, compare=False)


@dataclass(frozen=True)
class SlotAction:
    """`slot: {save|restore|erase|damage: ...}` through the server's /slots API (files in a directory of ours).
    `damage` is ours: the saved file is cut in half, as a crash mid-save or a full disk leaves it; a restore
    of it must be refused and leave the slot empty."""

    action: str  # save / restore / erase / damage
    file: str | None = None  # save, restore and damage
    id_slot: int | None = None  # None: the slot that served the current conversation's last request
    line: int = field(default=0, compare=False)


Step = (Message | Generate | Regenerate | Edit | Truncate | Tokens | Splice | Switch | Parallel | SlotAction
        | TemplateVars)
NO_PARAMETERS = {"type": "object", "properties": {}}  # a tool that takes none, in JSON schema
MAIN = "main"  # the conversation steps edit before any `conversation:` step


@dataclass(frozen=True)
class Scenario:
    name: str
    purpose: str
    path: Path
    steps: tuple[Step, ...]
    settings: SessionSettings = DEFAULT_SETTINGS
    sampling: Sampling = Sampling()
    expect: Expect = Expect()
    requires: tuple[str, ...] = MEMORY_KINDS
    tags: tuple[str, ...] = ()
    tools: str | None = None  # JSON: the tool definitions sent with every request (OpenAI's format)
    strip_reasoning: bool = False  # replies are sent back without their reasoning, as most agent clients do

    @property
    def template_needs(self) -> tuple[str, ...]:
        """What the model's chat template must render beyond role and content: tools, reasoning, and each
        template variable the scenario sets (`var:NAME`)."""
        needs: dict[str, None] = {"tools": None} if self.tools else {}
        for step in self.steps:
            if getattr(step, "tool_calls", ()) or getattr(step, "role", "") == "tool":
                needs["tools"] = None
            if getattr(step, "reasoning", None):
                needs["reasoning"] = None
            if isinstance(step, TemplateVars):
                needs.update((f"var:{k}", None) for k in json.loads(step.values))
        return tuple(needs)

    @property
    def raw(self) -> bool:
        return any(isinstance(s, Tokens) for s in self.steps)

    @property
    def single_conversation(self) -> bool:
        return not any(isinstance(s, Switch | Parallel | SlotAction) for s in self.steps)

    def applies_to(self, memory: str) -> bool:
        """`unknown`: a served model whose memory no file of ours says; every scenario is played on it."""
        return memory in self.requires or memory == "unknown"

    def with_settings(self, **changes) -> Scenario:
        return replace(self, settings=replace(self.settings, **changes))


def surely_after(s: Step, n: int) -> int:
    """How many tokens a raw prompt surely has after a step, from `n` before it: random tokens count, texts
    and replies do not (the grammar draws splices within them too)."""
    if isinstance(s, Tokens):
        return n + s.random_length
    if isinstance(s, Truncate) and s.tokens is not None:
        return min(n, s.tokens)
    if isinstance(s, Splice):
        return n + (s.insert.random_length if s.insert else 0) - s.delete
    return n


def _raw_length(sc: Scenario, s: Tokens | Truncate | Splice, n: int) -> int:
    """`surely_after`, and a splice beyond the tokens the prompt surely has, or in a chat, refused."""
    if isinstance(s, Splice) and not sc.raw:
        raise ScenarioError(f"{sc.path}:{s.line}: splice: only in raw-token scenarios (a chat edits its turns "
                            f"with edit)")
    if isinstance(s, Splice) and s.at + s.delete > n:
        raise ScenarioError(f"{sc.path}:{s.line}: splice: tokens [{s.at}, {s.at + s.delete}) are beyond the {n} "
                            f"tokens the prompt surely has here (random tokens so far; texts and replies are not "
                            f"counted)")
    return surely_after(s, n)


# writing a scenario back as YAML --------------------------------------------------------------
