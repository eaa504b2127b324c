"""llama-server's log, read: each request's lines, and the cache events they tell (checkpoints made,
restored, erased; the host-memory prompt cache; a dying server's key lines), in the in-process timeline's form.

The server logs from a thread of its own at -lv 4; its words are the pinned build's (server-context.cpp,
server-task.cpp), matched loosely enough for the 2026 builds we test.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

EVENT_PATTERNS = [
    ("created", re.compile(r"created context checkpoint \d+ of \d+ \(pos_min = (-?\d+), pos_max = (-?\d+), "
                           r"n_tokens = (\d+)")),
    ("restored", re.compile(r"restored context checkpoint \(pos_min = (-?\d+), pos_max = (-?\d+), n_tokens = (\d+)")),
    ("erased", re.compile(r"erased invalidated context checkpoint \(pos_min = (-?\d+), pos_max = (-?\d+), "
                          r"n_tokens = (\d+)")),
    ("evicted", re.compile(r"erasing (?:old )?context checkpoint(?: too close to an earlier one)? "
                           r"\(pos_min = (-?\d+), pos_max = (-?\d+), n_tokens = (\d+)")),
    ("superseded", re.compile(r"superseding context checkpoint at n_tokens = (\d+)")),
    ("full-reprocess", re.compile(r"forcing full prompt re-processing")),
]


# a slot's log line: `slot update_slots: id  0 | task 7 | ...`
SLOT_LINE = re.compile(r"\bid\s+(\d+) \| task (-?\d+) \|")
PROMPT_LENGTH = re.compile(r"new prompt, .*task\.n_tokens = (\d+)")
# a prompt batch begins where the slot's cached tokens end (pinned server-context.cpp 3423), a task ends
BATCH_START = re.compile(r"cached n_tokens = (\d+), memory_seq_rm \[(\d+), end\)")
TASK_END = re.compile(r"stop processing: n_tokens = (\d+)")


@dataclass
class Task:
    """One request's share of the log: the slot that served it, its prompt's length, its lines."""

    slot: int
    n_tokens: int | None = None
    lines: list[str] = dataclasses.field(default_factory=list)


def split_by_task(lines: list[str]) -> dict[int, Task]:
    """Interleaved log lines of requests served at once (or one after another on one slot), per task;
    a server line (no slot of its own, e.g. the host cache's) goes with the next task line (the task
    it was logged for)."""
    out: dict[int, Task] = {}
    waiting: list[str] = []
    for line in lines:
        m = SLOT_LINE.search(line)
        if m is None or int(m.group(2)) < 0:
            waiting.append(line)
            continue
        task = out.setdefault(int(m.group(2)), Task(int(m.group(1))))
        n = PROMPT_LENGTH.search(line)
        if n and task.n_tokens is None:
            task.n_tokens = int(n.group(1))
        task.lines += [*waiting, line]
        waiting = []
    return out


# the host-memory prompt cache (server_prompt_cache in server-task.cpp, prompt_save/prompt_clear in
# server-context.cpp): server lines name no slot, so they go with the last slot line before them
_SAVING = re.compile(r" - saving prompt with length (\d+)")
_NOT_SAVED = re.compile(r"prompt is already in the cache, skipping|exceeds cache size limit|"
                        r"failed to allocate memory for prompt cache")
_CANDIDATE = re.compile(r" - prompt with length +(\d+), lcp = +(\d+), f_keep = ([\d.]+), f_sim = ([\d.]+)")
_FOUND = re.compile(r"found better prompt with f_keep = ([\d.]+), f_sim = ([\d.]+)")
_DROPPED = re.compile(r"removing obsolete cached prompt with length (\d+)")
_EVICTED = re.compile(r"removing oldest entry")
_CLEARED = re.compile(r"clearing prompt with (\d+) tokens")
_CHECKING = re.compile(r" - checking sim = [\d.]+ \((\d+)/(\d+)\)")
_BY_SIMILARITY = re.compile(r"selected slot by LCP similarity")


def _slot_event(kind: str, n_tokens: int, slot: int, **more: float) -> dict:
    return {"kind": kind, "n_tokens": n_tokens, "pos_min": -1, "pos_max": -1, "slot": slot, **more}


def parse_host_cache(lines: list[str]) -> list[dict]:
    """Server log lines -> the host-cache and slot events, as the in-process slots name them (no prompt
    digest: the log gives lengths; a load also gives its common prefix with the new prompt, `lcp`)."""
    events: list[dict] = []
    slot, candidates, saving = -1, [], None
    checked: dict[int, tuple[int, int]] = {}  # slot -> its common prefix with the prompt, the prompt's length
    for line in lines:
        m = SLOT_LINE.search(line)
        if m:
            slot = int(m.group(1))
        if (m := _CHECKING.search(line)) is not None:
            checked[slot] = (int(m.group(1)), int(m.group(2)))
        elif _BY_SIMILARITY.search(line):  # with what it shared, where the build traced it (b10001 does not)
            lcp, n = checked.pop(slot, (-1, 0))
            events.append(_slot_event("selected", lcp, slot, **({"similarity": lcp / n} if n else {})))
        if saving is not None and _NOT_SAVED.search(line):
            events.remove(saving)
            saving = None
        if (m := _SAVING.search(line)) is not None:
            saving = _slot_event("host-saved", int(m.group(1)), slot)
            events.append(saving)
            candidates = []
        elif (m := _CANDIDATE.search(line)) is not None:
            candidates.append(m.groups())
        elif (m := _FOUND.search(line)) is not None:
            # the first candidate with the winning figures (the rule takes a strictly better one only)
            won = next((c for c in candidates if c[2:] == m.groups()), None)
            if won is not None:
                events.append(_slot_event("host-loaded", int(won[0]), slot, lcp=int(won[1])))
        elif (m := _DROPPED.search(line)) is not None:
            events.append(_slot_event("host-dropped", int(m.group(1)), -1))
        elif _EVICTED.search(line):
            events.append(_slot_event("host-evicted", -1, -1))
        elif (m := _CLEARED.search(line)) is not None and int(m.group(1)) > 0:
            events.append(_slot_event("cleared", int(m.group(1)), slot))
    return events


def parse_events(lines: list[str]) -> list[dict]:
    """Server log lines -> the event timeline (kind, n_tokens, pos_min, pos_max), host-cache events first
    (they are logged before the task's prompt is processed)."""
    events = parse_host_cache(lines)
    for line in lines:
        for kind, rx in EVENT_PATTERNS:
            m = rx.search(line)
            if not m:
                continue
            g = [int(x) for x in m.groups()]
            if kind == "superseded":
                events.append({"kind": kind, "n_tokens": g[0], "pos_min": -1, "pos_max": -1})
            elif kind == "full-reprocess":
                events.append({"kind": kind, "n_tokens": -1, "pos_min": -1, "pos_max": -1})
            else:
                events.append({"kind": kind, "n_tokens": g[2], "pos_min": g[0], "pos_max": g[1]})
            break
    return events


# what a dying server says first, ahead of the progress lines around it
_KEY_LINE = re.compile(r"GGML_ASSERT|error:|error loading model|unknown model architecture|terminate called|"
                       r"invalid argument|unknown argument|\.(?:cpp|c|h):\d+: ", re.IGNORECASE)  # GGML_ABORT: file:line


def key_lines(log: str, n: int = 3) -> list[str]:
    return [ln.strip() for ln in log.splitlines() if _KEY_LINE.search(ln)][:n]
