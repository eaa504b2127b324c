"""A Scenario written back as YAML (what minimize and the soak save), and loaded again to check it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import fields, replace
from pathlib import Path

import yaml

from ..status import MEMORY_KINDS
from .reader import load
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


def to_document(sc: Scenario, purpose: str | None = None) -> dict:
    """The scenario as the loader reads it: defaults left out, repeated regenerations merged."""
    doc: dict = {"purpose": purpose if purpose is not None else sc.purpose}
    if sc.tags:
        doc["tags"] = list(sc.tags)
    if sc.requires != MEMORY_KINDS:
        doc["requires"] = list(sc.requires)
    if sc.tools:
        doc["tools"] = [{k: v for k, v in t["function"].items() if k != "parameters" or v != NO_PARAMETERS}
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
