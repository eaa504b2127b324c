"""YAML -> validated Scenario objects, with errors that name file:line and field.

Validation is strict: unknown keys, wrong types and impossible edits are refused before any engine
starts.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import fields, replace
from pathlib import Path

import yaml

from ..engines.base import NGRAM_DRAFTERS, Speculative
from ..shipped import shipped
from ..status import MEMORY_KINDS
from .checks import check_flow
from .steps import (
    DEFAULT_SETTINGS,
    NO_PARAMETERS,
    Edit,
    Expect,
    Generate,
    Message,
    Parallel,
    Regenerate,
    Request,
    Sampling,
    Scenario,
    ScenarioError,
    SlotAction,
    Splice,
    Step,
    Switch,
    TemplateVars,
    Tokens,
    ToolCall,
    Truncate,
)

BUNDLED = shipped("scenarios")  # the library: scenarios/ of the source tree, inside the package in a wheel


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
    check_flow(r, sc, top["steps"])
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




def _tools(r: _Reader, node: yaml.Node) -> str:
    """`tools:` as OpenAI's API sends them: [{type: function, function: {name, description, parameters}}]."""
    out = []
    for j, item in enumerate(r.seq(node, "tools"), 1):
        m = r.mapping(item, f"tools[{j}]", ("name", "description", "parameters"), required=("name",))
        fn: dict = {"name": r.scalar(m["name"], f"tools[{j}].name", str)}
        if "description" in m:
            fn["description"] = r.scalar(m["description"], f"tools[{j}].description", str)
        parameters = _plain(m["parameters"]) if "parameters" in m else NO_PARAMETERS
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
