"""What a read scenario must make sense as, beyond its fields: chat steps only where a conversation can
take them, edits and truncations of turns that exist, raw steps within the tokens the prompt surely
has, something to compare. Each refusal names the step's line."""

from __future__ import annotations

import json

import yaml

from .steps import (
    MAIN,
    Edit,
    Generate,
    Message,
    Parallel,
    Regenerate,
    Scenario,
    ScenarioError,
    SlotAction,
    Splice,
    Switch,
    Tokens,
    Truncate,
    _raw_length,
)


def _check_chat(r, sc: Scenario, node: yaml.Node) -> None:
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


def check_flow(r, sc: Scenario, node: yaml.Node) -> None:  # r: reader._Reader, which says where
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

    def request(conv: str, regenerate: bool, id_slot: int | None, where: str, *, i: int) -> None:
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
            request(current, isinstance(s, Regenerate), getattr(s, "id_slot", None), f"{step_at}: steps", i=i)
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
                request(q.conversation, q.regenerate, q.id_slot, f"{step_at}: parallel", i=i)
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


def resolve_turn(turn: int | str, labels: list[str | None]) -> int | None:
    """0-based index of a user turn given as 1-based number or label."""
    if isinstance(turn, int):
        return turn - 1 if 1 <= turn <= len(labels) else None
    return labels.index(turn) if turn in labels else None
