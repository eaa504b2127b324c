"""A llama-server reference that repeats the subject's batches, so a correct cache gives the same bits.

The subject's log (-lv 4) says where each prompt batch began (`cached n_tokens = X, memory_seq_rm [X, end)`,
one line per batch: pinned server-context.cpp 3423), which checkpoint it restored and what it kept; every
generated token is a batch of one. `SubjectMemory` follows that per slot, as the in-process `RecordedMemory`
follows its decode calls (replay.Call, one home for a call's shape): the calls whose cells are in memory
now, and a copy of them with each checkpoint made.

`MatchedReference` then rebuilds that memory on a second server of the subject's build and kernels that
never restores anything (no checkpoints, no host cache, one slot, `--swa-full` so a window model keeps
its prefix instead of re-processing it), one request per call: llama-server starts a request's batch where
its cached prefix ends, and without checkpoints it cuts a batch only at n_batch. A call the subject cut
short (a trim inside it) is sent whole with its first cut-off token changed, so the next request's prefix
ends where the subject's memory did; the rows kept do not depend on later rows (causal attention, one
matmul row per token). The prompt's own last batch and the reply are then one request, judged exactly.

Where the log does not let us follow (a slot-file load, shifted chunks, a parallel block, drafts, a build
without the batch lines), the history is unknown until the slot starts again from nothing, and the engine's
plain reference judges with the calibrated tolerance, saying why. Where the calls are known but the cells may
lie elsewhere than the reference's (a host-cache load; other slots holding cells in the shared cache; a window
model's slot that held more than its window, whose ring the reference's --swa-full does not wrap), the matched
reply is still the one compared, by the tolerance: bit-identical on Gemma 3 270M mostly, 1e-6 to 3e-3 nats off
on the random-weight fixtures.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .base import Completion
from .replay import Call
from .server_log import BATCH_START, EVENT_PATTERNS, PROMPT_LENGTH, SLOT_LINE, TASK_END, parse_host_cache

_RESTORED, _CREATED = dict(EVENT_PATTERNS)["restored"], dict(EVENT_PATTERNS)["created"]  # n_tokens: group 3
# what moves a slot's cells by means we cannot repeat on the reference: chunks shifted (slot files and drafts
# the engine knows of: ServerEngine forgets the slot's history itself)
_UNFOLLOWED = re.compile(r"after context reuse")


@dataclass(frozen=True)
class Plan:
    """The subject's memory when it decoded this prompt's last batch, and where that batch began."""

    calls: tuple[Call, ...]
    start: int
    risk: str = ""  # why its cells may lie elsewhere than the reference's: then judged by the tolerance
    arrangement: tuple[str, ...] = ()  # how (engines/noise_floor.py): "cells", "window"


def _kept(calls: list[Call] | tuple[Call, ...]) -> list[int]:
    return [t for c in calls for t in c.tokens[:c.n]]


class SubjectMemory:
    """The decode calls in each subject slot's memory, from the log; a slot's calls are None where they cannot
    be known (until it starts again from nothing)."""

    def __init__(self, n_swa: int = 0) -> None:
        self.n_swa = n_swa
        self.slots: dict[int, list[Call] | None] = {}
        self.checkpoints: dict[int, dict[int, list[Call]]] = {}  # slot -> n_tokens -> the calls it saved
        # a host-cache entry's length -> the calls of the state it holds, and of its checkpoints
        self.host: dict[int, tuple[list[Call], dict[int, list[Call]]] | None] = {}
        self.risks: dict[int, str] = {}  # slot -> why its cells may not lie where the reference's do
        self.fresh = True  # a slot not seen yet holds nothing
        self.outgrown: set[int] = set()  # slots that held more than the window since the subject started

    def forget(self, slot: int | None = None) -> None:
        """One slot's memory (None: every slot's, also those not seen yet) is no longer known."""
        if slot is None:
            self.fresh = False
        for s in list(self.slots) if slot is None else [slot]:
            self.slots[s], self.checkpoints[s] = None, {}

    def _host_events(self, lines: list[str]) -> None:
        for e in parse_host_cache(lines):  # logged before the task's prompt is processed
            slot, n = e["slot"], e["n_tokens"]
            if e["kind"] == "host-saved":  # the slot's prompt with its checkpoints
                calls = self.slots.get(slot, [] if self.fresh else None)
                self.host[n] = None if calls is None or sum(c.n for c in calls) != n else \
                    (list(calls), dict(self.checkpoints.get(slot, {})))
            elif e["kind"] == "host-loaded":
                saved = self.host.get(n)
                self.slots[slot], self.checkpoints[slot] = (None, {}) if saved is None else \
                    (list(saved[0]), dict(saved[1]))
                # its cells may land elsewhere than where they were computed, and a softmax then sums them in
                # other lanes: bit-identical on Gemma 3 270M, not on the random-weight fixtures (2026-12-07)
                self.risks[slot] = "the subject loaded its memory from the host cache"
            elif e["kind"] in ("host-dropped", "host-evicted"):
                self.host.pop(n, None)
            elif e["kind"] == "cleared":
                self.slots[slot] = []

    def follow(self, lines: list[str], slot: int, prompt: list[int], reply: list[int]) -> tuple[Plan | None, str]:
        """One request's log lines, the slot that served it, the prompt it processed and the reply it gave -> the
        plan for its reference (None, and why, where it cannot be followed)."""
        self._host_events(lines)
        # cells of other slots in the shared cache push this one's elsewhere than the reference's one slot puts
        # them: 4e-6 nats apart on a fixture (b11434, a regeneration on another slot, 2026-12-07)
        crowded = not self.fresh or any(c is None or c for s, c in self.slots.items() if s != slot)
        calls = self.slots.setdefault(slot, [] if self.fresh else None)
        checkpoints = self.checkpoints.setdefault(slot, {})
        plan, why, start = None, "", None
        for line in lines:
            m = SLOT_LINE.search(line)
            if m is None or int(m.group(1)) != slot:
                continue
            if _UNFOLLOWED.search(line):
                calls, why = None, "its slot's cells were moved in a way the reference cannot repeat"
            elif (m := PROMPT_LENGTH.search(line)) is not None and int(m.group(1)) != len(prompt):
                self.forget(slot)
                return None, f"the server processed {m.group(1)} tokens, not the {len(prompt)} we sent"
            elif (m := _RESTORED.search(line)) is not None:
                saved = checkpoints.get(int(m.group(3)))
                calls = None if saved is None else list(saved)
            elif (m := BATCH_START.search(line)) is not None:
                x = int(m.group(1))
                if start is None:  # what the lookup kept
                    if x == 0:
                        calls = []
                        self.risks.pop(slot, None)
                    if calls is None:
                        self.forget(slot)
                        return None, why or "what its slot held was not followed from the start"
                    calls = [c.cut(x) for c in calls if c.pos0 < x]
                    if _kept(calls) != prompt[:x]:
                        self.forget(slot)
                        return None, "its memory did not hold the prompt's tokens as followed"
                elif calls is not None:
                    calls.append(Call(start, x - start, tuple(prompt[start:x])))
                start = x
            elif (m := _CREATED.search(line)) is not None and calls is not None:
                n = int(m.group(3))
                if sum(c.n for c in calls) == n:
                    checkpoints[n] = list(calls)
            elif (m := TASK_END.search(line)) is not None and calls is not None and start is not None:
                held = int(m.group(1))
                if crowded:
                    self.risks[slot] = "other slots held cells in the shared cache when its own were computed"
                if self.n_swa and held >= self.n_swa:  # its window's ring wrapped, the reference's (--swa-full) does
                    self.outgrown.add(slot)  # not; for good (whether a new start puts cells back is not measured)
                risk = self.risks.get(slot, "") or (f"the slot held more than the model's window ({self.n_swa} "
                                                    "tokens)" if slot in self.outgrown else "")
                arrangement = (("cells",) if slot in self.risks else ()) + (("window",) if slot in self.outgrown
                                                                            else ())
                plan = Plan(tuple(calls), start, risk, arrangement)
                generated = reply[:held - len(prompt)]
                if len(generated) != held - len(prompt):
                    self.forget(slot)
                    return None, "its memory holds more than the prompt and the reply"
                calls.append(Call(start, len(prompt) - start, tuple(prompt[start:])))
                calls += [Call(len(prompt) + i, 1, (t,)) for i, t in enumerate(generated)]
        self.slots[slot] = calls
        if plan is None:
            self.forget(slot)
            return None, why or "the log did not say how the prompt was batched"
        return plan, ""


class MatchedReference:
    """A reference server of the subject's kernels whose one slot is rebuilt in the subject's calls."""

    def __init__(self, request: Callable[[list[int], int, int], Completion], erase: Callable[[], None], trims: bool,
                 n_vocab: int):
        # request(prompt, n_predict, top_k): one /completion with cache_prompt on, to the reference's slot 0
        self.request, self.erase, self.trims, self.n_vocab = request, erase, trims, n_vocab
        self.held: list[Call] = []  # the calls of its slot's memory
        # the tokens its slot holds (a cut call's tail too, until the next request trims it); None: not known
        self.tokens: list[int] | None = []

    def answer(self, plan: Plan, prompt: list[int], n_predict: int, top_k: int) -> tuple[Completion | None, str]:
        """The prompt on the rebuilt memory: judged exactly, or by the tolerance where the plan names a risk;
        (None, why) where the reference could not batch it as the subject did."""
        why = self._rebuild(plan, prompt)
        if why:
            return None, why
        done = self.request(prompt, n_predict, top_k)
        if (done.n_reused, done.n_processed) != (plan.start, len(prompt) - plan.start):
            self.held, self.tokens = [], None
            return None, (f"the reference batched the prompt's end as [{done.n_reused}, "
                          f"{done.n_reused + done.n_processed}), the subject as [{plan.start}, {len(prompt)})")
        self.held = list(plan.calls) + [Call(plan.start, len(prompt) - plan.start, tuple(prompt[plan.start:]))]
        self.held += [Call(len(prompt) + i, 1, (t,)) for i, t in enumerate(done.tokens[:-1])]
        self.tokens = prompt + done.tokens[:-1]
        done.exact = not plan.risk
        done.inexact = f"the reference repeated the subject's batches, but {plan.risk}" if plan.risk else ""
        done.arrangement = plan.arrangement
        return done, ""

    def _rebuild(self, plan: Plan, prompt: list[int]) -> str:
        """Bring the slot to the plan's memory; '' when it holds it, else why not."""
        why = ""
        for attempt in range(2):
            j = 0 if attempt else self._reusable(plan, prompt)
            if j == 0 and self.tokens != []:
                self.erase()
                self.tokens = []
            self.held = self.held[:j]
            why = self._make(plan.calls[j:], prompt) or (
                "" if _common(self.tokens or [], prompt) == plan.start else
                "the reference's cached prefix would not end where the subject's memory did")
            if not why:
                return ""
        return why

    def _reusable(self, plan: Plan, prompt: list[int]) -> int:
        """How many of the plan's first calls the slot holds such that the next request's cached prefix ends right
        after them (0: start afresh)."""
        if self.tokens is None:
            return 0
        j = 0
        while j < min(len(self.held), len(plan.calls)) and self.held[j] == plan.calls[j]:
            j += 1
        if j < len(self.held) and not self.trims:  # a recurrent state cannot go back
            return 0
        first = self._body(plan.calls[j], prompt) if j < len(plan.calls) else prompt
        return j if _common(self.tokens, first) == sum(c.n for c in plan.calls[:j]) else 0

    def _body(self, c: Call, prompt: list[int]) -> list[int]:
        """What to send for a call: the prompt up to it and its own tokens, the first cut-off one changed."""
        body = prompt[:c.pos0 + c.n] + list(c.tokens[c.n:])
        at = c.pos0 + c.n
        if c.n < len(c.tokens) and at < len(prompt) and body[at] == prompt[at]:
            body[at] = (body[at] + 1) % self.n_vocab
        return body

    def _make(self, calls: tuple[Call, ...], prompt: list[int]) -> str:
        for c in calls:
            if c.n < len(c.tokens) and not self.trims:
                return "the subject's recurrent state was cut inside a batch"
            body = self._body(c, prompt)
            done = self.request(body, 1, 0)
            self.held.append(c)
            self.tokens = body
            if (done.n_reused, done.n_processed) != (c.pos0, len(c.tokens)):
                self.held, self.tokens = [], None
                return (f"the reference batched [{done.n_reused}, {done.n_reused + done.n_processed}) where the "
                        f"subject's call was [{c.pos0}, {c.pos0 + len(c.tokens)})")
        return ""


def _common(a: list[int], b: list[int]) -> int:
    """The prefix llama-server keeps of `a` for a prompt `b`: at least one token of `b` is processed."""
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return min(n, len(b) - 1)
