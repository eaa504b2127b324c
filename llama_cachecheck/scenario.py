"""YAML scenarios -> validated Scenario objects, with errors that name file:line and field.

A scenario is a conversation as a user has it (ask, answer, regenerate, edit an earlier
question) or, for models without a chat template and for long prompts, raw token
sequences. Validation is strict: unknown keys, wrong types and impossible edits are refused
before any engine starts. Defaults live here, in one place; a scenario states what differs.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from .engines.base import NGRAM_DRAFTERS, SessionSettings, Speculative
from .shipped import shipped
from .status import MEMORY_KINDS

BUNDLED = shipped("scenarios")  # the library: scenarios/ of the source tree, inside the package in a wheel

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


# loading -------------------------------------------------------------------------------------

class _Reader:
    """Walks the YAML node tree so every error can point at the line it comes from."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, node: yaml.Node, msg: str) -> ScenarioError:
        return ScenarioError(f"{self.path}:{node.start_mark.line + 1}: {msg}")

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...] | None,
                required: tuple[str, ...] = ()) -> dict[str, yaml.Node]:
        """The mapping's keys and value nodes; `allowed` None takes any text key (a template's variables)."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what}: expected a mapping, got {_kind(node)}")
        out: dict[str, yaml.Node] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            if key is None and allowed is None:
                raise self.fail(k, f"{what}: a key must be a name")
            if allowed is not None and key not in allowed:
                raise self.fail(k, f"{what}: unknown key {key!r} (allowed: {', '.join(allowed)})")
            if key in out:
                raise self.fail(k, f"{what}: duplicate key {key!r}")
            out[key] = v
        for key in required:
            if key not in out:
                raise self.fail(node, f"{what}: missing required key {key!r}")
        return out

    def seq(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what}: expected a list, got {_kind(node)}")
        return list(node.value)

    def scalar(self, node: yaml.Node, what: str, typ: type, low: int = 0):  # typ decides
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{what}: expected {typ.__name__}, got {_kind(node)}")
        value = yaml.safe_load(yaml.serialize(node)) if node.tag != "tag:yaml.org,2002:str" else node.value
        if typ is str:
            if not isinstance(value, str):
                raise self.fail(node, f"{what}: expected text, got {value!r}")
            return value
        if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.fail(node, f"{what}: expected an integer, got {node.value!r}")
        if typ is bool and not isinstance(value, bool):
            raise self.fail(node, f"{what}: expected true or false, got {node.value!r}")
        if typ is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self.fail(node, f"{what}: expected a number, got {node.value!r}")
            value = float(value)
        if typ in (int, float) and value < min(low, 0):
            raise self.fail(node, f"{what}: must be at least {low}, got {value}" if low < 0 else
                            f"{what}: must not be negative, got {value}")
        return value

    def dataclass_from(self, node: yaml.Node, what: str, base):
        """Override fields of a frozen dataclass instance from a mapping, type-checked and range-checked."""
        types = {f.name: _field_type(type(base), f.name) for f in fields(base)}
        m = self.mapping(node, what, tuple(types))
        values = {}
        for k, v in m.items():
            if dataclasses.is_dataclass(types[k]):  # a group of settings of its own (speculative)
                values[k] = self.dataclass_from(v, f"{what}.{k}", types[k]())
                _check_group(self, v, f"{what}.{k}", values[k])
                continue
            values[k] = self.scalar(v, f"{what}.{k}", types[k], MINIMUM.get(k, 0))
            if k in MINIMUM and values[k] < MINIMUM[k]:
                raise self.fail(v, f"{what}.{k}: must be at least {MINIMUM[k]}, got {values[k]}")
        out = replace(base, **values)
        if getattr(out, "n_ubatch", 0) > getattr(out, "n_batch", 1 << 30):
            if "n_ubatch" in values:
                raise self.fail(node, f"{what}: n_ubatch ({out.n_ubatch}) must not exceed n_batch ({out.n_batch})")
            out = replace(out, n_ubatch=out.n_batch)  # what llama.cpp makes of it; the policy must know
        return out


def _tokens_step(r: _Reader, body: yaml.Node, what: str) -> Tokens:
    m = r.mapping(body, what, ("text", "random"))
    if len(m) != 1:
        raise r.fail(body, f"{what}: give either text or random")
    if "text" in m:
        return Tokens(text=r.scalar(m["text"], f"{what}.text", str))
    rm = r.mapping(m["random"], f"{what}.random", ("length", "seed"), required=("length",))
    seed = r.scalar(rm["seed"], f"{what}.random.seed", int) if "seed" in rm else 0
    return Tokens(random_length=r.scalar(rm["length"], f"{what}.random.length", int), seed=seed)


def _check_group(r, node: yaml.Node, what: str, value) -> None:
    if isinstance(value, Speculative):
        if (value.draft is None) == (value.ngram is None):
            raise r.fail(node, f"{what}: give one of draft (a fixture, self or PATH.gguf) or ngram "
                               f"({', '.join(NGRAM_DRAFTERS)})")
        if value.ngram is not None and value.ngram not in NGRAM_DRAFTERS:
            raise r.fail(node, f"{what}.ngram: unknown drafter {value.ngram!r} (known: {', '.join(NGRAM_DRAFTERS)})")
        if value.n_max < 1 or value.n_min > value.n_max:
            raise r.fail(node, f"{what}: need 1 <= n_max and n_min <= n_max, got n_max {value.n_max}, "
                               f"n_min {value.n_min}")


# below these a setting means nothing (threads 0), aborts llama.cpp (n_batch 0) or turns a check off (top_k 0);
# cache_ram -1 is llama-server's "no limit"
MINIMUM = {"threads": 1, "n_batch": 1, "n_ubatch": 1, "n_ctx": 16, "top_k": 1, "n_predict": 1, "n_parallel": 1,
           "cache_ram": -1}


def _field_type(cls: type, name: str) -> type:
    """A field's type from its annotation; `int | None` (left to the server's profile) reads as int."""
    hint = typing.get_type_hints(cls)[name]
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)


def _kind(node: yaml.Node) -> str:
    return {yaml.MappingNode: "a mapping", yaml.SequenceNode: "a list"}.get(type(node), "a single value")


_TOP_KEYS = ("name", "purpose", "tags", "requires", "settings", "sampling", "expect", "tools", "strip_reasoning",
             "steps")
_STEP_KEYS = ("system", "user", "assistant", "tool", "generate", "regenerate", "edit", "truncate", "tokens", "splice",
              "repeat", "conversation", "parallel", "slot", "template_vars")
_REQUEST_KEYS = ("conversation", "regenerate", "id_slot", "n_predict")


def load(path: Path | str) -> Scenario:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ScenarioError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None
    try:
        root = yaml.compose(text)
    except yaml.MarkedYAMLError as e:
        problem_line = e.problem_mark.line + 1 if e.problem_mark else 0
        if e.context_mark is not None:  # point at the construct left open, not at the file's end
            raise ScenarioError(f"{path}:{e.context_mark.line + 1}: YAML syntax error: {e.context}: "
                                f"{e.problem} (line {problem_line})") from None
        raise ScenarioError(f"{path}:{problem_line}: YAML syntax error: {e.problem}") from None
    if root is None:
        raise ScenarioError(f"{path}:1: empty scenario")
    r = _Reader(path)
    top = r.mapping(root, "scenario", _TOP_KEYS, required=("purpose", "steps"))
    steps = _steps(r, top["steps"], "steps")
    if not steps:
        raise r.fail(top["steps"], "steps: a scenario needs at least one step")
    requires = MEMORY_KINDS
    if "requires" in top:
        requires = tuple(r.scalar(n, "requires", str) for n in r.seq(top["requires"], "requires"))
        for kind, n in zip(requires, top["requires"].value, strict=True):
            if kind not in MEMORY_KINDS:
                raise r.fail(n, f"requires: unknown memory kind {kind!r} (known: {', '.join(MEMORY_KINDS)})")
    sc = Scenario(
        name=r.scalar(top["name"], "name", str) if "name" in top else path.stem,
        purpose=r.scalar(top["purpose"], "purpose", str),
        path=path,
        steps=tuple(steps),
        settings=r.dataclass_from(top["settings"], "settings", DEFAULT_SETTINGS)
        if "settings" in top else DEFAULT_SETTINGS,
        sampling=r.dataclass_from(top["sampling"], "sampling", Sampling()) if "sampling" in top else Sampling(),
        expect=r.dataclass_from(top["expect"], "expect", Expect()) if "expect" in top else Expect(),
        requires=requires,
        tags=tuple(r.scalar(n, "tags", str) for n in r.seq(top["tags"], "tags")) if "tags" in top else (),
        tools=_tools(r, top["tools"]) if "tools" in top else None,
        strip_reasoning=r.scalar(top["strip_reasoning"], "strip_reasoning", bool) if "strip_reasoning" in top
        else False,
    )
    _check_flow(r, sc, top["steps"])
    return sc


def _steps(r: _Reader, node: yaml.Node, what: str) -> list[Step]:
    out: list[Step] = []
    for i, item in enumerate(r.seq(node, what), 1):
        where = f"{what}[{i}]"
        if isinstance(item, yaml.ScalarNode) and item.value in ("generate", "regenerate"):
            out.append(Generate() if item.value == "generate" else Regenerate())
            continue
        m = r.mapping(item, where, _STEP_KEYS)
        if len(m) != 1:
            raise r.fail(item, f"{where}: one step per list item, got {', '.join(m)}")
        (kind, body), = m.items()
        out.extend(_step(r, kind, body, f"{where}.{kind}"))
    return out


def _message(r: _Reader, kind: str, body: yaml.Node, what: str) -> Message:
    line = body.start_mark.line + 1
    if isinstance(body, yaml.ScalarNode):
        return Message(kind, r.scalar(body, what, str), line=line)
    allowed = {"assistant": ("content", "label", "reasoning", "tool_calls"), "user": ("content", "label")}
    m = r.mapping(body, what, allowed.get(kind, ("content",)))
    if "content" not in m and not (kind == "assistant" and "tool_calls" in m):
        raise r.fail(body, f"{what}: missing required key 'content'" + (" (or tool_calls)" if kind == "assistant"
                                                                         else ""))
    return Message(kind, r.scalar(m["content"], f"{what}.content", str) if "content" in m else "",
                   r.scalar(m["label"], f"{what}.label", str) if "label" in m else None,
                   r.scalar(m["reasoning"], f"{what}.reasoning", str) if "reasoning" in m else None,
                   _tool_calls(r, m["tool_calls"], f"{what}.tool_calls") if "tool_calls" in m else (), line)


def _tool_calls(r: _Reader, node: yaml.Node, what: str) -> tuple[ToolCall, ...]:
    calls = []
    for j, item in enumerate(r.seq(node, what), 1):
        m = r.mapping(item, f"{what}[{j}]", ("name", "arguments"), required=("name",))
        arguments = _plain(m["arguments"]) if "arguments" in m else {}
        if not isinstance(arguments, dict):
            raise r.fail(m["arguments"], f"{what}[{j}].arguments: expected a mapping (the call's JSON object)")
        calls.append(ToolCall(r.scalar(m["name"], f"{what}[{j}].name", str), json.dumps(arguments)))
    if not calls:
        raise r.fail(node, f"{what}: give at least one call (or leave tool_calls out)")
    return tuple(calls)


_NO_PARAMETERS = {"type": "object", "properties": {}}  # a tool that takes none, in JSON schema


def _tools(r: _Reader, node: yaml.Node) -> str:
    """`tools:` as OpenAI's API sends them: [{type: function, function: {name, description, parameters}}]."""
    out = []
    for j, item in enumerate(r.seq(node, "tools"), 1):
        m = r.mapping(item, f"tools[{j}]", ("name", "description", "parameters"), required=("name",))
        fn: dict = {"name": r.scalar(m["name"], f"tools[{j}].name", str)}
        if "description" in m:
            fn["description"] = r.scalar(m["description"], f"tools[{j}].description", str)
        parameters = _plain(m["parameters"]) if "parameters" in m else _NO_PARAMETERS
        if not isinstance(parameters, dict):
            raise r.fail(m["parameters"], f"tools[{j}].parameters: expected a mapping (a JSON schema)")
        out.append({"type": "function", "function": {**fn, "parameters": parameters}})
    if not out:
        raise r.fail(node, "tools: give at least one tool (or leave tools out)")
    return json.dumps(out)


def _plain(node: yaml.Node) -> object:
    """A YAML node as plain data (tool arguments and schemas are the user's own JSON-like structures)."""
    return yaml.safe_load(yaml.serialize(node))


def _step(r: _Reader, kind: str, body: yaml.Node, what: str) -> list[Step]:
    if kind in ("system", "user", "assistant", "tool"):
        return [_message(r, kind, body, what)]
    if kind == "template_vars":
        return [_template_vars(r, body, what)]
    if kind == "generate":
        if isinstance(body, yaml.ScalarNode) and body.value in ("", "null", "~"):
            return [Generate()]
        m = r.mapping(body, what, ("label", "id_slot", "n_predict", "tool_calls"))
        return [Generate(r.scalar(m["label"], f"{what}.label", str) if "label" in m else None,
                         *_request_options(r, m, what), line=body.start_mark.line + 1,
                         tool_calls=_tool_calls(r, m["tool_calls"], f"{what}.tool_calls") if "tool_calls" in m
                         else ())]
    if kind == "conversation":
        return [Switch(r.scalar(body, what, str))]
    if kind == "parallel":
        requests = []
        for j, item in enumerate(r.seq(body, what), 1):
            if isinstance(item, yaml.ScalarNode):
                requests.append(Request(r.scalar(item, f"{what}[{j}]", str)))
                continue
            m = r.mapping(item, f"{what}[{j}]", _REQUEST_KEYS, required=("conversation",))
            regen = r.scalar(m["regenerate"], f"{what}[{j}].regenerate", bool) if "regenerate" in m else False
            requests.append(Request(r.scalar(m["conversation"], f"{what}[{j}].conversation", str), regen,
                                    *_request_options(r, m, f"{what}[{j}]")))
        if len(requests) < 2:
            raise r.fail(body, f"{what}: a parallel block sends at least two requests at once")
        return [Parallel(tuple(requests), body.start_mark.line + 1)]
    if kind == "slot":
        return [_slot(r, body, what)]
    if kind == "regenerate":
        m = r.mapping(body, what, ("times",), required=("times",))
        times = r.scalar(m["times"], f"{what}.times", int)
        if times < 1:
            raise r.fail(m["times"], f"{what}.times: must be at least 1")
        return [Regenerate() for _ in range(times)]
    if kind == "edit":
        m = r.mapping(body, what, ("turn", "content"), required=("turn", "content"))
        t = m["turn"]
        turn = r.scalar(t, f"{what}.turn", int) if t.tag == "tag:yaml.org,2002:int" else \
            r.scalar(t, f"{what}.turn", str)
        return [Edit(turn, r.scalar(m["content"], f"{what}.content", str), body.start_mark.line + 1)]
    if kind == "truncate":
        m = r.mapping(body, what, ("turns", "tokens"))
        if len(m) != 1:
            raise r.fail(body, f"{what}: give either turns (chat) or tokens (raw)")
        (key, val), = m.items()
        return [Truncate(**{key: r.scalar(val, f"{what}.{key}", int)}, line=body.start_mark.line + 1)]
    if kind == "tokens":
        return [_tokens_step(r, body, what)]
    if kind == "splice":
        m = r.mapping(body, what, ("at", "delete", "insert"), required=("at",))
        delete = r.scalar(m["delete"], f"{what}.delete", int) if "delete" in m else 0
        insert = _tokens_step(r, m["insert"], f"{what}.insert") if "insert" in m else None
        if not delete and (insert is None or not (insert.text or insert.random_length)):
            raise r.fail(body, f"{what}: give delete (tokens to take out), insert (tokens to put in), or both")
        return [Splice(r.scalar(m["at"], f"{what}.at", int), delete, insert, line=body.start_mark.line + 1)]
    if kind == "repeat":
        m = r.mapping(body, what, ("times", "steps"), required=("times", "steps"))
        times = r.scalar(m["times"], f"{what}.times", int)
        return _steps(r, m["steps"], f"{what}.steps") * times
    raise r.fail(body, f"unknown step {kind!r}")  # unreachable: mapping() checked the key


def _template_vars(r: _Reader, body: yaml.Node, what: str) -> TemplateVars:
    m = r.mapping(body, what, None)
    values = {}
    for k, v in m.items():
        if not k.isidentifier():
            raise r.fail(body, f"{what}: {k!r} is not a template variable name")
        value = _plain(v)
        if not isinstance(value, str | int | float | bool) or value is None:
            raise r.fail(v, f"{what}.{k}: expected text, a number or true/false")
        values[k] = value
    return TemplateVars(json.dumps(values))


def _slot(r: _Reader, body: yaml.Node, what: str) -> SlotAction:
    m = r.mapping(body, what, ("save", "restore", "erase", "damage", "id"))
    actions = [a for a in ("save", "restore", "erase", "damage") if a in m]
    if len(actions) != 1:
        raise r.fail(body, f"{what}: give one of save: FILE, restore: FILE, damage: FILE or erase: true")
    action = actions[0]
    if action == "erase":
        if not r.scalar(m["erase"], f"{what}.erase", bool):
            raise r.fail(m["erase"], f"{what}.erase: write erase: true (or leave the step out)")
        file = None
    else:
        file = r.scalar(m[action], f"{what}.{action}", str)
        if not file or "/" in file or file.startswith("."):
            raise r.fail(m[action], f"{what}.{action}: a plain file name (it lives in the run's slot directory), "
                                    f"got {file!r}")
    id_slot = r.scalar(m["id"], f"{what}.id", int) if "id" in m else None
    return SlotAction(action, file, id_slot, body.start_mark.line + 1)


def _request_options(r: _Reader, m: dict, what: str) -> tuple[int | None, int | None]:
    id_slot = r.scalar(m["id_slot"], f"{what}.id_slot", int) if "id_slot" in m else None
    n_predict = r.scalar(m["n_predict"], f"{what}.n_predict", int) if "n_predict" in m else None
    return id_slot, n_predict


def _check_chat(r: _Reader, sc: Scenario, node: yaml.Node) -> None:
    """Chat and raw tokens apart; agent-loop steps only in chat, every tool message answering a call of
    its conversation, every call naming one of the scenario's tools."""
    if sc.raw and any(isinstance(s, Message) for s in sc.steps):
        raise r.fail(node, "steps: mix chat messages and raw tokens in separate scenarios")
    if sc.raw and (sc.template_needs or sc.strip_reasoning):
        raise r.fail(node, "steps: tools, tool calls, reasoning and template variables are for chat scenarios, "
                           "not raw tokens")
    tools = {t["function"]["name"] for t in json.loads(sc.tools)} if sc.tools else set()
    open_calls: dict[str, int] = {}  # per conversation: tool calls no tool message answered yet
    current = MAIN
    for s in sc.steps:
        step_at = f"{sc.path}:{getattr(s, 'line', 0) or node.start_mark.line + 1}"
        if isinstance(s, Switch):
            current = s.name
        elif isinstance(s, Message) and s.role == "tool":
            if not open_calls.get(current):
                raise ScenarioError(f"{step_at}: tool: no tool call to answer here (an assistant message or a "
                                    f"generate with tool_calls must call a tool first)")
            open_calls[current] -= 1
        if isinstance(s, Message | Generate) and s.tool_calls:
            unknown = next((c.name for c in s.tool_calls if c.name not in tools), None)
            if unknown is not None:
                raise ScenarioError(f"{step_at}: tool_calls: {unknown!r} is not one of the scenario's tools "
                                    f"({', '.join(sorted(tools)) or 'none: add tools: at the top'})")
            open_calls[current] = len(s.tool_calls)


def _check_flow(r: _Reader, sc: Scenario, node: yaml.Node) -> None:
    """Replay the steps on dry conversations: edits of turns that do not exist, a regeneration with
    nothing to regenerate, a slot file never saved, a slot the server does not have, fail here."""
    _check_chat(r, sc, node)
    labels: dict[str, list[str | None]] = {MAIN: []}  # per conversation, one per user turn
    replies: dict[str, int] = {MAIN: 0}
    at_least: dict[str, int] = {MAIN: 0}  # raw: prompt tokens there surely are (texts and replies add more)
    saved: set[str] = set()
    current = MAIN
    requests = 0
    n_slots = sc.settings.n_parallel

    def request(conv: str, regenerate: bool, id_slot: int | None, where: str, i: int) -> None:
        nonlocal requests
        requests += 1
        if regenerate and replies[conv] == 0:
            raise ScenarioError(f"{where}: regenerate before any generate" +
                                (f" in conversation {conv!r}" if conv != MAIN else ""))
        if id_slot is not None and n_slots is not None and id_slot >= n_slots:
            raise ScenarioError(f"{where}: id_slot {id_slot} is beyond settings.n_parallel {n_slots} "
                                f"(slots are 0 to {n_slots - 1})")
        if at_least[conv] + sc.sampling.n_predict > sc.settings.n_ctx:
            raise ScenarioError(f"{where}: request {requests} (step {i}) has a prompt of at least "
                                f"{at_least[conv]} tokens; with n_predict {sc.sampling.n_predict} it cannot fit "
                                f"n_ctx {sc.settings.n_ctx} (raise settings.n_ctx)")
        replies[conv] += not regenerate

    for i, s in enumerate(sc.steps, 1):
        conv_labels = labels[current]
        step_at = f"{sc.path}:{getattr(s, 'line', 0) or node.start_mark.line + 1}"
        if isinstance(s, Switch):
            current = s.name
            labels.setdefault(current, [])
            replies.setdefault(current, 0)
            at_least.setdefault(current, 0)
        elif isinstance(s, Tokens | Splice) or (isinstance(s, Truncate) and s.tokens is not None and sc.raw):
            at_least[current] = _raw_length(sc, s, at_least[current])
        elif isinstance(s, Message) and s.role == "user":
            conv_labels.append(s.label)
        elif isinstance(s, Generate | Regenerate):
            request(current, isinstance(s, Regenerate), getattr(s, "id_slot", None), f"{step_at}: steps", i)
        elif isinstance(s, Parallel):
            names = [q.conversation for q in s.requests]
            twice = next((n for n in names if names.count(n) > 1), None)
            if twice:
                raise ScenarioError(f"{step_at}: parallel: two requests for conversation {twice!r} (one per "
                                    "conversation: the second would have to wait for the first's reply)")
            for q in s.requests:
                if q.conversation not in labels:
                    raise ScenarioError(f"{step_at}: parallel: no conversation {q.conversation!r} so far "
                                        f"(known: {', '.join(labels)})")
                request(q.conversation, q.regenerate, q.id_slot, f"{step_at}: parallel", i)
        elif isinstance(s, SlotAction):
            if s.id_slot is not None and n_slots is not None and s.id_slot >= n_slots:
                raise ScenarioError(f"{step_at}: slot.id {s.id_slot} is beyond settings.n_parallel {n_slots}")
            if s.action == "save":
                saved.add(s.file)
            elif s.action in ("restore", "damage") and s.file not in saved:
                raise ScenarioError(f"{step_at}: slot.{s.action}: {s.file!r} was never saved before this step "
                                    f"(saved so far: {', '.join(sorted(saved)) or 'none'})")
        elif isinstance(s, Edit):
            idx = resolve_turn(s.turn, conv_labels)
            if idx is None:
                raise ScenarioError(f"{sc.path}:{s.line}: edit.turn: no user turn {s.turn!r} "
                                    f"at this point ({len(conv_labels)} user turns so far)")
            del conv_labels[idx + 1:]
        elif isinstance(s, Truncate) and (s.turns is None) != sc.raw:
            raise ScenarioError(f"{sc.path}:{s.line}: truncate: use turns in chat scenarios, "
                                f"tokens in raw-token scenarios")
        elif isinstance(s, Truncate) and s.turns is not None:
            if s.turns > len(conv_labels):
                raise ScenarioError(f"{sc.path}:{s.line}: truncate.turns: only {len(conv_labels)} user turns "
                                    f"so far, cannot keep {s.turns}")
            del conv_labels[s.turns:]
    if requests == 0:
        raise r.fail(node, "steps: nothing to compare: add a generate step")


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

def to_document(sc: Scenario, purpose: str | None = None) -> dict:
    """The scenario as the loader reads it: defaults left out, repeated regenerations merged."""
    doc: dict = {"purpose": purpose if purpose is not None else sc.purpose}
    if sc.tags:
        doc["tags"] = list(sc.tags)
    if sc.requires != MEMORY_KINDS:
        doc["requires"] = list(sc.requires)
    if sc.tools:
        doc["tools"] = [{k: v for k, v in t["function"].items() if k != "parameters" or v != _NO_PARAMETERS}
                        for t in json.loads(sc.tools)]
    if sc.strip_reasoning:
        doc["strip_reasoning"] = True
    parts = (("settings", sc.settings, DEFAULT_SETTINGS), ("sampling", sc.sampling, Sampling()),
             ("expect", sc.expect, Expect()))
    for key, value, default in parts:
        changed = {f.name: getattr(value, f.name) for f in fields(value)
                   if getattr(value, f.name) != getattr(default, f.name)}
        for name, v in changed.items():
            if dataclasses.is_dataclass(v):  # a group (speculative): its own fields that differ
                changed[name] = {f.name: getattr(v, f.name) for f in fields(v)
                                 if getattr(v, f.name) != getattr(type(v)(), f.name)}
        if changed:
            doc[key] = changed
    steps: list = []
    for step in sc.steps:
        if isinstance(step, Regenerate) and steps and isinstance(steps[-1], dict) and "regenerate" in steps[-1]:
            steps[-1]["regenerate"]["times"] += 1
        else:
            steps.append(_step_document(step))
    doc["steps"] = steps
    return doc


def _calls_document(calls: tuple[ToolCall, ...]) -> list[dict]:
    return [{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls]


def _step_document(step: Step) -> object:
    if isinstance(step, Message):
        body = {k: v for k, v in (("content", step.content), ("label", step.label), ("reasoning", step.reasoning),
                                  ("tool_calls", _calls_document(step.tool_calls) or None)) if v is not None}
        return {step.role: body if set(body) != {"content"} else step.content}
    if isinstance(step, TemplateVars):
        return {"template_vars": json.loads(step.values)}
    if isinstance(step, Generate):
        options = {k: v for k, v in (("label", step.label), ("id_slot", step.id_slot), ("n_predict", step.n_predict),
                                     ("tool_calls", _calls_document(step.tool_calls) or None)) if v is not None}
        return {"generate": options} if options else "generate"
    if isinstance(step, Switch):
        return {"conversation": step.name}
    if isinstance(step, Parallel):
        return {"parallel": [_request_document(q) for q in step.requests]}
    if isinstance(step, SlotAction):
        doc = {step.action: True if step.action == "erase" else step.file}
        return {"slot": doc if step.id_slot is None else {**doc, "id": step.id_slot}}
    if isinstance(step, Regenerate):
        return {"regenerate": {"times": 1}}
    if isinstance(step, Edit):
        return {"edit": {"turn": step.turn, "content": step.content}}
    if isinstance(step, Truncate):
        return {"truncate": {"turns": step.turns} if step.turns is not None else {"tokens": step.tokens}}
    if isinstance(step, Tokens):
        if step.text is not None:
            return {"tokens": {"text": step.text}}
        return {"tokens": {"random": {"length": step.random_length, "seed": step.seed}}}
    if isinstance(step, Splice):
        doc = {"at": step.at, **({"delete": step.delete} if step.delete else {})}
        return {"splice": {**doc, "insert": _step_document(step.insert)["tokens"]} if step.insert else doc}
    raise TypeError(f"unknown step {step!r}")


def _request_document(q: Request) -> object:
    options = {k: v for k, v in (("regenerate", q.regenerate or None), ("id_slot", q.id_slot),
                                 ("n_predict", q.n_predict)) if v is not None}
    return {"conversation": q.conversation, **options} if options else q.conversation


def dump(sc: Scenario, purpose: str | None = None) -> str:
    return yaml.safe_dump(to_document(sc, purpose), sort_keys=False, allow_unicode=True, width=1 << 16)


def reload(sc: Scenario, path: Path) -> Scenario | None:
    """Write and load back: a candidate the loader refuses (an edit of a turn that is gone) is None."""
    path.write_text(dump(sc), encoding="utf-8")
    try:
        return replace(load(path), name=sc.name)
    except ScenarioError:
        return None


def resolve_turn(turn: int | str, labels: list[str | None]) -> int | None:
    """0-based index of a user turn given as 1-based number or label."""
    if isinstance(turn, int):
        return turn - 1 if 1 <= turn <= len(labels) else None
    return labels.index(turn) if turn in labels else None


def discover(paths: list[str | Path]) -> list[Scenario]:
    """Files, directories (their *.yaml, sorted) and bundled scenario names -> scenarios."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists() and (BUNDLED / f"{p}.yaml").is_file():  # `cachecheck run seed-regenerate`, from anywhere
            p = BUNDLED / f"{p}.yaml"
        if p.is_dir():
            files.extend(sorted(p.glob("*.yaml")))
        elif p.is_file():
            files.append(p)
        else:
            raise ScenarioError(f"{p}: no such scenario file or directory")
    if not files:  # every command that plays scenarios: a run that would compare nothing is bad input
        raise ScenarioError(f"nothing selected: no scenario (*.yaml) in {' '.join(map(str, paths))}")
    return [load(f) for f in files]
