"""What one conversation of a scenario holds while it is played: its messages or raw tokens, as the
client would send them next (Conversation), and what the cache design knows of its memory (Track).
"""

from __future__ import annotations

import json

from .engines.base import Completion, Prompt
from .invariants import Invariants
from .promise import Memory, uncertain
from .scenario import Edit, Message, Splice, ToolCall, Truncate, resolve_turn


class Conversation:
    """The state a scenario's steps edit: chat messages (Prompt's form: role, content and, for the agent
    loop's, a JSON of reasoning and tool calls), or a raw token sequence."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, ...]] = []
        self.labels: list[str | None] = []  # one per user message, in order
        self.tokens: list[int] = []
        self.reply_starts: list[int] = []  # raw mode: where each generated reply began
        self.variables: dict = {}  # the chat template's own variables (template_vars steps)
        self.n_calls = 0  # tool calls made so far (their ids: call_1, call_2, ...)
        self.unanswered: list[str] = []  # ids of tool calls no tool message answered yet, oldest first

    def prompt(self, raw: bool, tools: str | None = None, strip_reasoning: bool = False) -> Prompt:
        if raw:
            return Prompt(tokens=tuple(self.tokens))
        messages = tuple(_without_reasoning(m) if strip_reasoning else m for m in self.messages)
        return Prompt(messages=messages, tools=tools,
                      template_vars=json.dumps(self.variables, sort_keys=True) if self.variables else None)

    def add_message(self, step: Message) -> None:
        extras: dict = {}
        if step.reasoning:
            extras["reasoning_content"] = step.reasoning
        if step.tool_calls:
            extras["tool_calls"] = self._calls(step.tool_calls)
        if step.role == "tool" and self.unanswered:
            extras["tool_call_id"] = self.unanswered.pop(0)
        self._append(step.role, step.content, extras)
        if step.role == "user":
            self.labels.append(step.label)

    def add_reply(self, raw: bool, reply: Completion, calls: tuple[ToolCall, ...] = ()) -> None:
        if raw:  # like llama-server, the end-of-generation token does not become part of the prompt
            self.reply_starts.append(len(self.tokens))
            self.tokens.extend(reply.tokens[:-1] if reply.ends_with_eog else reply.tokens)
            return
        # a reply the template opened with <think> (template variable `think`) is the model's reasoning, as a
        # client that reads reasoning_content gets it; the tool calls are the scenario's (see Generate)
        thinking = bool(self.variables.get("think"))
        extras = {"reasoning_content": reply.text} if thinking and reply.text else {}
        if calls:
            extras["tool_calls"] = self._calls(calls)
        self._append("assistant", "" if thinking else reply.text, extras)

    def _append(self, role: str, content: str, extras: dict) -> None:
        self.messages.append((role, content, json.dumps(extras)) if extras else (role, content))

    def _calls(self, calls: tuple[ToolCall, ...]) -> list[dict]:
        out = []
        for c in calls:
            self.n_calls += 1
            out.append({"id": f"call_{self.n_calls}", "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments}})
        self.unanswered = [o["id"] for o in out]
        return out

    def drop_reply(self, raw: bool) -> None:
        if raw:
            del self.tokens[self.reply_starts.pop():]
        elif self.messages and self.messages[-1][0] == "assistant":
            self.messages.pop()

    def user_positions(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m[0] == "user"]

    def edit(self, step: Edit) -> None:
        idx = resolve_turn(step.turn, self.labels)
        if idx is None:  # scenario.load checks this; kept for scenarios built in code
            raise ValueError(f"no user turn {step.turn!r}")
        pos = self.user_positions()[idx]
        self.messages[pos:] = [("user", step.content)]
        del self.labels[idx + 1:]

    def splice(self, step: Splice, new: list[int]) -> None:
        end = step.at + step.delete
        if end > len(self.tokens):  # scenario.load checks this; kept for scenarios built in code
            raise ValueError(f"splice [{step.at}, {end}) beyond the prompt's {len(self.tokens)} tokens")
        self.tokens[step.at:end] = new
        self.reply_starts = [r if r < step.at else r + len(new) - step.delete
                             for r in self.reply_starts if r < step.at or r >= end]

    def truncate(self, step: Truncate) -> None:
        if step.tokens is not None:
            del self.tokens[step.tokens:]
            self.reply_starts = [r for r in self.reply_starts if r < step.tokens]
            return
        users = self.user_positions()
        if step.turns < len(users):
            del self.messages[users[step.turns]:]
        del self.labels[step.turns:]


def _without_reasoning(message: tuple[str, ...]) -> tuple[str, ...]:
    """A message as a client that strips reasoning sends it back."""
    if len(message) < 3:
        return message
    extras = {k: v for k, v in json.loads(message[2]).items() if k != "reasoning_content"}
    return (*message[:2], json.dumps(extras)) if extras else message[:2]


class Track:
    """One conversation of a scenario and its cache history as the design sees it: its last prompt,
    what that reused, which slot served it, and whether its memory is still kept (in its slot, or
    in the host-memory prompt cache when another conversation took the slot)."""

    def __init__(self, name: str, memory: str, limit: int, n_swa: int):
        self.name = name
        self.conv = Conversation()
        self._rules = (memory, limit, n_swa)
        self.invariants = Invariants(*self._rules)
        self.prev_prompt: list[int] | None = None
        self.prev_held: list[int] = []  # what its slot held after the last request: the prompt and the reply
        self.n_regen = 0
        self.slot: int | None = None
        self.kept = True
        self.calls: tuple[ToolCall, ...] = ()  # the tool calls its last reply made (a regeneration makes them too)
        self.shifted_from: int | None = None  # where chunks --cache-reuse shifted begin in its memory, if any
        self.in_host = False  # its slot was taken or cleared: its memory is in the host-memory cache only
        self.memory = Memory()  # the checkpoints and host-cache branches the design surely holds of it

    def unknown_memory(self) -> None:
        """What its memory holds is no longer known (moved, taken, restored): its invariants start afresh, and
        only its last request's checkpoints are promised."""
        self.invariants = Invariants(*self._rules)
        uncertain(self.memory)

    def held_now(self) -> dict:
        """What its slot holds, as a slot file saves it: the last prompt, the tokens, the checkpoints."""
        return {"prompt": self.prev_prompt, "held": list(self.prev_held), "points": list(self.memory.last)}

    def held_again(self, then: dict, slot: int) -> None:
        """A slot file brought back what `held_now` said, with the checkpoints the file keeps."""
        self.prev_prompt, self.prev_held, self.slot, self.kept = then["prompt"], then["held"], slot, True
        self.unknown_memory()
        self.memory.points = self.memory.last = list(then["points"])

    def forget(self) -> None:
        """Its memory is gone by design (slot erased or overwritten, no host cache): nothing is promised."""
        self.kept = False
        self.unknown_memory()
