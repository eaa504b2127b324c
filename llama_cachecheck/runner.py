"""Play scenarios through an engine twice — cached subject, full re-process reference — and judge.

The conversation continues with what the subject said (that is what a user of the cached
server sees); at every generate step the reference processes the very same prompt from
empty memory, and scores the subject's reply token by token (teacher forcing).
"""

from __future__ import annotations

import json
import shlex
import time

import numpy as np

from . import compare
from .applies import ascii_check, shift_gap, template_gap
from .conversation import Track
from .engines.base import (
    Completion,
    Engine,
    EngineError,
    ModelUnsupported,
    Prompt,
    Refused,
    StartError,
    Unsupported,
)
from .invariants import Handovers
from .models import with_draft_path
from .outcomes import ScenarioResult, TurnResult
from .promise import Promise
from .scenario import (
    MAIN,
    Edit,
    Generate,
    Message,
    Parallel,
    Regenerate,
    Scenario,
    SlotAction,
    Splice,
    Step,
    Switch,
    TemplateVars,
    Tokens,
    ToolCall,
    Truncate,
)
from .status import Status, worst


def replay_command(sc: Scenario, model: str, fault: str | None, engine_args: list[str] | tuple = ()) -> str:
    """The command that plays this one case again the same way, shell-quoted: the engine names its
    own options (`Engine.replay_args`: build, profile, flags, library, tolerance), so none is left out."""
    cmd = ["cachecheck", "run", str(sc.path), "--model", model, *engine_args, "--threads", str(sc.settings.threads)]
    if fault:
        cmd += ["--fault", fault]
    return shlex.join(cmd)


def play(sc: Scenario, engine: Engine, model: str, fault: str | None, *,
         thresholds: compare.Thresholds) -> ScenarioResult:
    info = engine.info
    res = ScenarioResult(sc, model, info.engine, info.memory, fault,
                         replay=replay_command(sc, model, fault, engine.replay_args()), build=info.llama_cpp,
                         thresholds=thresholds)
    t0 = time.perf_counter()
    try:
        _play(sc, engine, res, thresholds)
        res.command = engine.subject_command()
        res.status = worst(t.verdict.status for t in res.turns)
        bad = res.first_bad
        res.reason = f"turn {bad.index}: {bad.verdict.reason}" if bad and bad.verdict.reason else ""
    except Unsupported as e:
        res.status, res.reason, res.turns = Status.SKIP, str(e), []
        res.start_failed = isinstance(e, ModelUnsupported)
    except EngineError as e:
        res.status, res.reason, res.start_failed = Status.ERROR, str(e), isinstance(e, StartError)
        res.error_class = e.kind
    res.seconds = time.perf_counter() - t0
    return res


class _Play:
    """One scenario played through one engine: the steps edit conversations, requests are judged."""

    def __init__(self, sc: Scenario, engine: Engine, res: ScenarioResult, th: compare.Thresholds):
        self.sc, self.engine, self.res, self.th = sc, engine, res, th
        # a draft model named as a model (fixture:llama) is resolved here, once, to a GGUF that drafts for this one
        wanted = with_draft_path(sc.settings, engine.info.path, engine.info.model) if engine.info.path else sc.settings
        self.s = res.settings = engine.start_session(wanted)
        self.promise = Promise(engine.info.reuse_design, res.memory, self.s, sc.expect.reuse)
        self.alone = True  # one conversation so far, on the slot the server chose: its branches are all the host
        #                    cache holds (slot steps, pins and requests at once end that)
        self.tracks: dict[str, Track] = {}
        self.current = self.track(MAIN)
        self.saved: dict[str, tuple[Track, dict, int]] = {}  # file -> whose, what it held then, tokens saved
        self.pending: list[str] = []  # broken rules of slot steps, told with the next request
        self.damaged: set[str] = set()  # slot files a `damage` step cut (since their last save)
        self.emptied: set[int] = set()  # slots a failed restore must have left empty
        self.handovers = Handovers(self.promise.similarity)

    def track(self, name: str) -> Track:
        if name not in self.tracks:
            self.alone = not self.tracks
            self.tracks[name] = Track(name, self.res.memory, self.s.ctx_checkpoints, self.engine.info.n_swa)
        return self.tracks[name]

    def step(self, step: Step) -> None:
        conv = self.current.conv
        if isinstance(step, Switch):
            self.current = self.track(step.name)
        elif isinstance(step, Message):
            conv.add_message(step)
        elif isinstance(step, TemplateVars):
            conv.variables.update(json.loads(step.values))
        elif isinstance(step, Tokens):
            conv.tokens.extend(_tokens(self.engine, step, first=not conv.tokens))
        elif isinstance(step, Splice):
            conv.splice(step, _tokens(self.engine, step.insert, first=False) if step.insert else [])
        elif isinstance(step, Edit):
            conv.edit(step)
        elif isinstance(step, Truncate):
            conv.truncate(step)
        elif isinstance(step, Generate | Regenerate):
            # a regeneration: the defaults, and the tool calls the reply it replaces made (the scenario's)
            gen = step if isinstance(step, Generate) else Generate(tool_calls=self.current.calls)
            self.current.calls = gen.tool_calls
            name = self._begin(self.current, isinstance(step, Regenerate), gen.label)
            n = self._n_predict(gen.n_predict)
            prompt = self._prompt(self.current)
            self.res.sent += 1
            self.alone = self.alone and gen.id_slot is None
            sub = self.engine.complete(prompt, n, self.sc.sampling.top_k, gen.id_slot)
            if gen.id_slot is not None and self.current.slot not in (None, gen.id_slot) and \
                    not self.promise.host_brings(self.current, sub.prompt_tokens):
                self.current.forget()  # sent to another slot than its memory's, which the host cache does not bring
            self._judge(self.current, name, prompt, n, sub, gen.tool_calls)
            self._served([self.current], [sub])
        elif isinstance(step, Parallel):
            self.alone = False
            self._parallel(step)
        elif isinstance(step, SlotAction):
            self.alone = False
            self._slot(step)

    def _begin(self, t: Track, regenerate: bool, label: str | None) -> str:
        prefix = "" if t.name == MAIN else f"{t.name}: "
        if regenerate:
            t.conv.drop_reply(self.sc.raw)
            t.n_regen += 1
            return f"{prefix}regenerate {t.n_regen}"
        t.n_regen = 0
        return prefix + (label or "generate")

    def _prompt(self, t: Track) -> Prompt:
        return t.conv.prompt(self.sc.raw, self.sc.tools, self.sc.strip_reasoning)

    def _n_predict(self, n: int | None) -> int:
        return self.sc.sampling.n_predict if n is None else n

    def _parallel(self, step: Parallel) -> None:
        k = self.sc.sampling.top_k
        work = []
        for q in step.requests:
            t = self.track(q.conversation)
            name = self._begin(t, q.regenerate, None)
            work.append((t, name, self._prompt(t), self._n_predict(q.n_predict), q.id_slot))
        self.res.sent += len(work)
        subs = self.engine.complete_parallel([(p, n, k, slot) for _, _, p, n, slot in work])
        slots = [sub.slot for sub in subs]
        for (t, name, prompt, n, _), sub in zip(work, subs, strict=True):
            # run elsewhere, maybe while another request of the block held its slot; or on its slot, where
            # another of the block may have run first (deferred requests wait in an order we cannot see)
            moved = None not in (t.slot, sub.slot) and sub.slot != t.slot
            if not self.promise.host_cache and (moved or (sub.slot is not None and slots.count(sub.slot) > 1)):
                t.forget()
            t.unknown_memory()  # the block's other requests ran beside it: its memory may have moved
            self._judge(t, name, prompt, n, sub)
            self.res.turns[-1].at_once = True
        self._served([w[0] for w in work], subs)

    def _served(self, tracks: list[Track], subs: list[Completion]) -> None:
        """After requests ran. Another conversation's request may have taken a conversation's slot, or
        (idle slots saved and cleared) moved its memory to the host cache: what its memory holds is no
        longer known, so its invariants start afresh; without a host cache, a conversation whose slot
        was taken has nothing left to promise (and of two requests of a block on one slot we cannot
        tell which ran last)."""
        slots = [c.slot for c in subs]
        for t, slot in zip(tracks, slots, strict=True):
            t.slot, t.kept, t.in_host = slot, True, False
            for other in self.tracks.values():
                if other in tracks:
                    continue
                other.unknown_memory()
                taken = slot is None or other.slot in (slot, None)
                if not self.promise.host_cache and taken:
                    other.forget()
                elif self.promise.host_cache and (taken or self.promise.idle_cleared):
                    other.in_host = True
            if len(tracks) > 1 and (slot is None or slots.count(slot) > 1):  # another of the block ran there too
                if self.promise.host_cache:
                    t.unknown_memory()
                else:
                    t.forget()

    def _judge(self, t: Track, name: str, prompt: Prompt, n: int, sub: Completion,
               calls: tuple[ToolCall, ...] = ()) -> None:
        sc, engine, res = self.sc, self.engine, self.res
        k = sc.sampling.top_k
        if None not in (t.slot, sub.slot) and sub.slot != t.slot:  # ran on a slot that held another's memory
            t.unknown_memory()
        ref = engine.reference(prompt, n, k, held=t.prev_held if self._shifted(t, sub) else None)
        scored = engine.score(prompt, sub.tokens, k)
        th = compare.EXACT if ref.exact else self.th.within(ref.arrangement)
        verdict = compare.compare(sub.tokens, sub.top, ref.tokens, ref.top, scored=scored, thresholds=th)
        judge = compare.judge_engagement if engine.info.reuse_design == "engagement" else compare.judge_reuse
        pledge = self.promise.of(t, sub, self.alone)
        judge(verdict, sub.n_reused, pledge.n, pledge.why)
        # the reference's reasons, then what only the subject's reply has (speculation's blind tokens)
        said = ref.inexact.split("; ")
        said += [x for x in sub.inexact.split("; ") if x not in said]
        if th is not self.th and not ref.exact:  # the noise of just the ways this reference differs
            said.append(f"thresholds for {' and '.join(ref.arrangement)}: Δlogprob {th.max_dlogprob:.3g}, KL "
                        f"{th.max_kl:.3g}, tie {th.tie_margin:.3g}")
        verdict.rule = "exact" if ref.exact else f"calibrated tolerance: {'; '.join(x for x in said if x)}"
        # what the slot holds now: as the engine says, else the prompt and the reply (a speculating subject may
        # hold accepted drafts past its end too)
        held = sub.prompt_tokens + sub.tokens[:-1] if sub.held is None else sub.held
        broken = self.pending + self._emptied(sub) + self.handovers.check(sub.events, sub.prompt_tokens) + \
            t.invariants.check(sub.prompt_tokens, sub.events, sub.n_reused,
                               held if sub.held is not None or self.s.speculative is None else None)
        self.pending = []
        self.handovers.held(held)
        compare.judge_invariants(verdict, broken)
        pieces = engine.detokenize(sub.tokens + ref.tokens)  # one round trip for both replies
        turn = TurnResult(len(res.turns) + 1, name, None if sc.raw else list(prompt.messages), sub, ref,
                          pieces[:len(sub.tokens)], pieces[len(sub.tokens):], verdict, scored, conversation=t.name)
        turn.violations = broken
        if verdict.status != Status.PASS:
            _explain(turn, engine)
        res.turns.append(turn)
        self.promise.served(t, sub, pledge, turn.index)
        t.prev_prompt, t.prev_held = sub.prompt_tokens, held
        if n > 0:  # a primer (n_predict 0) only processed the prompt: no reply joins the conversation
            t.conv.add_reply(sc.raw, sub, calls)

    def _shifted(self, t: Track, sub: Completion) -> bool:
        """Whether this reply stands on chunks --cache-reuse shifted: the truth is then what they give (the
        reference shifts them too), not a full re-process. So where the subject reuses past the common prefix
        of what its slot held (it shifted now), or past where earlier shifted chunks begin (they stayed); a
        prompt that went to another slot, or kept less, was processed plainly, and its memory holds none."""
        lcp = compare.common_prefix(t.prev_held, sub.prompt_tokens)
        if t.kept and sub.n_reused > lcp:
            t.shifted_from = lcp if t.shifted_from is None else min(t.shifted_from, lcp)
        elif t.shifted_from is not None and not (t.kept and sub.n_reused > t.shifted_from):
            t.shifted_from = None
        return t.shifted_from is not None

    def _slot(self, step: SlotAction) -> None:
        t = self.current
        slot = step.id_slot if step.id_slot is not None else (t.slot or 0)
        if step.action in ("save", "damage"):
            n = self.engine.slot_action(step.action, step.file, slot)
            if step.action == "save":
                self.saved[step.file] = (t, t.held_now(), n)
                self.damaged.discard(step.file)
            else:
                self.damaged.add(step.file)
            return
        for other in self.tracks.values():  # the slot's old content is gone: erased, overwritten or refused
            if other.slot == slot:
                other.forget()
        if step.action == "restore" and step.file in self.damaged:
            # a cut file must be refused, and the slot left empty: its next request may reuse only what
            # the host cache brings back
            try:
                n = self.engine.slot_action("restore", step.file, slot)
            except Refused:
                self.emptied.add(slot)
                return
            self.pending.append(f"slot {slot} restored {n} tokens from {step.file}, a file cut in half: "
                                "it must be refused")
            return
        n = self.engine.slot_action(step.action, step.file, slot)
        if step.action == "restore":
            whose, then, n_saved = self.saved[step.file]
            if n != n_saved:
                self.pending.append(f"slot {slot} restored {n} tokens from {step.file}, which saved {n_saved}")
            whose.held_again(then, slot)  # the slot's memory and checkpoints are what the file brings

    def _emptied(self, sub: Completion) -> list[str]:
        """A request on a slot a failed restore emptied: what it reused must have come from the host cache."""
        if sub.slot not in self.emptied:
            return []
        self.emptied.discard(sub.slot)
        if sub.n_reused == 0 or any(e["kind"] == "host-loaded" for e in sub.events):
            return []
        return [f"slot {sub.slot} reused {sub.n_reused} tokens after a failed restore, which must leave it empty"]


def _play(sc: Scenario, engine: Engine, res: ScenarioResult, th: compare.Thresholds) -> None:
    if engine.info.ascii_only:
        ascii_check(sc)
    gap = template_gap(sc, engine.info)
    if gap:
        raise Unsupported(gap)
    p = _Play(sc, engine, res, th)  # an engine that cannot play a setting at all says so first, before the
    gap = shift_gap(sc, engine.info)  # model is asked whether it shifts (a context of its own to make)
    if gap:
        raise Unsupported(gap)
    for step in sc.steps:
        p.step(step)


def _explain(turn: TurnResult, engine: Engine) -> None:
    """Name the tokens of both top-k lists where it went wrong, for the report."""
    v = turn.verdict
    turn.focus = v.divergence.position if v.divergence else (
        max(range(len(v.distances)), key=v.distances.__getitem__) if v.distances else None)
    if turn.focus is None:
        return
    ids: set[int] = set()
    for tops in (turn.subject.top, turn.reference.top, turn.scored or []):
        if turn.focus < len(tops):
            ids.update(t for t, _ in tops[turn.focus])
    ordered = sorted(ids)
    turn.top_pieces = dict(zip(ordered, engine.detokenize(ordered), strict=True))


def _tokens(engine: Engine, step: Tokens, first: bool) -> list[int]:
    if step.text is not None:
        return engine.tokenize(step.text, first)
    if engine.info.n_vocab < 2:
        raise Unsupported(f"random tokens need the model's vocabulary, which {engine.info.engine} does not say")
    rng = np.random.default_rng(step.seed)
    return [int(t) for t in rng.integers(1, engine.info.n_vocab, step.random_length)]
