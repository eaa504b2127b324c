"""Random scenarios from the scenario grammar: what `soak` plays, the same ones for the same seed.

The library is conversations someone thought of; this draws the ones nobody did, from every step
the loader knows: messages, generate, regenerate, edits, truncations, raw token runs, several
conversations taking turns on the slots, `parallel:` blocks, pinned requests, slot save / erase /
restore / damage, agent loops (tool calls and results, reasoning kept or stripped, a date line that
changes), and the settings that change what the cache does (batch sizes, checkpoint limits, slots,
unified KV, the host-memory prompt cache, idle slots, the similarity rule).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from . import scenario as scn
from .engines.base import SessionSettings, Speculative
from .scenario import Scenario, Step
from .server_defaults import CHECKPOINT_MIN_STEP, CTX_CHECKPOINTS

WORDS = ("the cache restores a checkpoint when the prompt shares a prefix with what it holds but a window "
         "or a recurrent state cannot be trimmed back so the server keeps copies of the state at a few "
         "positions and a regeneration or an edit takes the nearest one before the change").split()
KINDS = ("chat", "raw", "slots", "agent")  # what a drawn scenario is mostly about, for the soak's counts


def _text(rng: random.Random) -> str:
    n = rng.choice((1, 2, 5, 12, 30, 60))
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + rng.choice(("?", ".", "!"))


def _settings(rng: random.Random) -> SessionSettings:
    s = SessionSettings()
    n_batch = rng.choice((64, 64, 32, 17, 128))
    return replace(s, n_batch=n_batch, n_ubatch=rng.choice([u for u in (n_batch, 16, 8) if u <= n_batch]),
                   ctx_checkpoints=rng.choice((CTX_CHECKPOINTS, CTX_CHECKPOINTS, 3, 1)),
                   checkpoint_min_step=rng.choice((CHECKPOINT_MIN_STEP, CHECKPOINT_MIN_STEP, 16, 64)))


def _slot_settings(rng: random.Random, s: SessionSettings) -> SessionSettings:
    """A server's slots and host memory: None keeps the profile's (the build's own defaults when deployed)."""
    return replace(s, n_parallel=rng.choice((None, None, 1, 2, 4)), kv_unified=rng.choice((None, None, True, False)),
                   cache_ram=rng.choice((None, None, 0, -1)), cache_idle_slots=rng.choice((None, True, False)),
                   slot_prompt_similarity=rng.choice((None, None, 0.0, 0.5)))


def _raw_steps(rng: random.Random) -> list[Step]:
    steps: list[Step] = [scn.Tokens(random_length=rng.randint(5, 300), seed=rng.randint(0, 999)), scn.Generate()]
    for _ in range(rng.randint(1, 5)):
        pick = rng.random()
        if pick < 0.4:
            steps += [scn.Tokens(random_length=rng.randint(1, 120), seed=rng.randint(0, 999)), scn.Generate()]
        elif pick < 0.7:
            steps.append(scn.Regenerate())
        else:
            steps += [scn.Truncate(tokens=rng.randint(1, 250)), scn.Generate()]
    return steps


class _Chat:
    """The turns of one conversation as drawn so far: what an edit or a truncation may name."""

    def __init__(self) -> None:
        self.turns = 0  # user turns
        self.replies = 0

    def step(self, rng: random.Random, slots: int | None) -> list[Step]:
        """One move of this conversation that ends in a request: a new turn, a regeneration, an edit, a cut."""
        pick = rng.random()
        pinned = rng.randrange(slots) if slots and rng.random() < 0.15 else None
        if self.turns == 0 or pick < 0.4:
            self.turns += 1
            return [scn.Message("user", _text(rng)), self._generate(pinned)]
        if pick < 0.65 and self.replies:
            return [scn.Regenerate()]
        if pick < 0.85 or self.turns == 1:
            k = rng.randint(1, self.turns)
            self.turns = k
            return [scn.Edit(k, _text(rng)), self._generate(pinned)]
        k = rng.randint(1, self.turns - 1)
        self.turns = k + 1
        return [scn.Truncate(turns=k), scn.Message("user", _text(rng)), self._generate(pinned)]

    def _generate(self, pinned: int | None) -> scn.Generate:
        self.replies += 1
        return scn.Generate(id_slot=pinned)


def _slot_steps(rng: random.Random, slots: int | None) -> list[Step]:
    """Conversations taking turns, some of their requests at once, slots saved to files and back."""
    names = ["a", "b", "c"][: rng.randint(2, 3)]
    chats = {n: _Chat() for n in names}
    steps: list[Step] = []
    saved: list[str] = []
    current: str | None = None
    for _ in range(rng.randint(3, 9)):
        pick = rng.random()
        ready = [n for n in names if chats[n].turns]
        if pick < 0.2 and len(ready) >= 2:  # a parallel block: a new turn of each, or a regeneration
            chosen = rng.sample(ready, rng.randint(2, len(ready)))
            requests = []
            for n in chosen:
                regenerate = chats[n].replies > 0 and rng.random() < 0.3
                if not regenerate:
                    steps += [scn.Switch(n), scn.Message("user", _text(rng))]
                    current = n
                    chats[n].turns += 1
                    chats[n].replies += 1
                requests.append(scn.Request(n, regenerate=regenerate))
            steps.append(scn.Parallel(tuple(requests)))
        elif pick < 0.32 and current is not None and chats[current].replies:  # the slot that served it, to a file
            action = rng.choice(("save", "save", "restore", "erase", "damage") if saved else ("save",))
            if action == "save":
                saved.append(f"s{len(saved)}.bin")
                steps.append(scn.SlotAction("save", saved[-1]))
            elif action == "erase":
                steps.append(scn.SlotAction("erase"))
            else:
                steps.append(scn.SlotAction(action, rng.choice(saved)))
        else:
            n = rng.choice(names)
            if n != current:
                steps.append(scn.Switch(n))
                current = n
            steps += chats[n].step(rng, slots)
    if not any(isinstance(s, scn.Generate | scn.Regenerate | scn.Parallel) for s in steps):
        steps += [scn.Switch(names[0]), *chats[names[0]].step(rng, slots)]
    return steps


TOOLS = json.dumps([{"type": "function", "function": {"name": name, "description": f"{name} a word",
                                                      "parameters": {"type": "object",
                                                                     "properties": {"word": {"type": "string"}}}}}
                     for name in ("look", "find", "tell")])


def _date_line(rng: random.Random) -> Step:
    return scn.TemplateVars(json.dumps({"date": f"Dec {rng.randint(1, 28):02d} 2026"}))


def _agent(seed: int, index: int) -> tuple[list[Step], bool] | None:
    """Now and then a chat is an agent loop instead: rounds of a question, tool calls and their results, an
    answer; reasoning (the template's `think`) kept or stripped; a date line that may change. From a stream
    of its own, so a seed's other scenarios are the same with and without agent loops. Returns the steps
    and whether the client strips reasoning."""
    rng = random.Random(f"{seed}:{index}:agent")
    if rng.random() >= 0.3:
        return None
    steps: list[Step] = []
    if rng.random() < 0.5:
        steps.append(scn.TemplateVars(json.dumps({"think": True})))
    if rng.random() < 0.3:
        steps.append(_date_line(rng))
    # sized to fit the default context (2048) at its longest: a larger one only for these would grow the
    # engines' memory whenever one is drawn, and the soak would read that as a leak
    for _ in range(rng.randint(1, 2)):
        steps.append(scn.Message("user", _text(rng)))
        for _ in range(rng.randint(0, 2)):
            calls = tuple(scn.ToolCall(rng.choice(("look", "find", "tell")), json.dumps({"word": rng.choice(WORDS)}))
                          for _ in range(rng.choice((1, 1, 2))))
            steps.append(scn.Generate(tool_calls=calls))
            steps += [scn.Message("tool", " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))))
                      for _ in calls]
        steps.append(scn.Generate())
        if rng.random() < 0.3:
            steps.append(scn.Regenerate())
        if rng.random() < 0.15:  # the next day
            steps.append(_date_line(rng))
    return steps, rng.random() < 0.6


def _speculative(seed: int, index: int) -> Speculative | None:
    """Now and then a speculating subject: a draft of another family (drafts mostly rejected and rolled
    back), the model itself (all accepted), or an n-gram drafter. Drawn from a stream of its own, so
    the rest of a seed's scenarios are the same with and without it."""
    rng = random.Random(f"{seed}:{index}:speculative")
    if rng.random() >= 0.2:
        return None
    draft = rng.choice(("fixture:llama", "fixture:llama", "self", None))
    n_max = rng.choice((2, 4, 8))
    return Speculative(draft=draft, ngram=None if draft else "ngram-simple", n_max=n_max,
                       n_min=rng.choice((0, 0, min(2, n_max))))


def _reuse(seed: int, index: int, steps: list[Step]) -> tuple[int, list[Step]] | None:
    """Now and then a raw scenario with --cache-reuse and chunks deleted, inserted or replaced in the middle
    after a reply (within the random tokens the prompt surely has, as the loader asks). A stream of its own,
    as _speculative's."""
    rng = random.Random(f"{seed}:{index}:reuse")
    if rng.random() >= 0.3:
        return None
    out: list[Step] = []
    n = 0  # random tokens the prompt surely has
    for s in steps:
        out.append(s)
        n = scn.surely_after(s, n)
        if isinstance(s, scn.Generate) and n > 20 and rng.random() < 0.6:
            at = rng.randint(1, n - 10)
            delete = rng.randint(0, min(n - at, 80))
            insert = scn.Tokens(random_length=rng.randint(1, 40), seed=rng.randint(0, 999)) \
                if not delete or rng.random() < 0.4 else None
            splice = scn.Splice(at, delete, insert)
            out += [splice, scn.Generate()]
            n = scn.surely_after(splice, n)
    return rng.choice((4, 8, 16)), out


def random_scenario(seed: int, index: int) -> Scenario:
    """One scenario drawn from the grammar; the same (seed, index) always gives the same one. Some raw ones
    reuse cached chunks (--cache-reuse) after splices in the middle; some subjects speculate."""
    rng = random.Random(f"{seed}:{index}")
    pick = rng.random()
    kind = "raw" if pick < 0.25 else "slots" if pick < 0.55 else "chat"
    settings = _settings(rng)
    if kind == "raw":
        steps = _raw_steps(rng)
    elif kind == "slots":
        settings = _slot_settings(rng, settings)
        steps = _slot_steps(rng, settings.n_parallel)
    else:
        chat = _Chat()
        steps = [s for _ in range(rng.randint(2, 7)) for s in chat.step(rng, None)]
    agent = _agent(seed, index) if kind == "chat" else None
    if agent is not None:
        kind, (steps, strip) = "agent", agent
    spec = _speculative(seed, index)
    if spec is not None:
        settings = replace(settings, speculative=spec)
    reuse = _reuse(seed, index, steps) if kind == "raw" else None
    if reuse is not None:
        settings, steps = replace(settings, cache_reuse=reuse[0]), reuse[1]
    return Scenario(name=f"soak-{seed}-{index}", purpose=f"cachecheck soak --seed {seed}: scenario {index}",
                    path=Path(f"soak-{seed}-{index}.yaml"), steps=tuple(steps), settings=settings,
                    sampling=scn.Sampling(n_predict=rng.choice((4, 16, 32))),
                    tags=("soak", kind, "speculative") if spec else ("soak", kind),
                    tools=TOOLS if agent is not None else None, strip_reasoning=agent is not None and strip)


def kind_of(sc: Scenario) -> str:
    return next((t for t in sc.tags if t in KINDS), "chat")


def checked(sc: Scenario, scratch: Path) -> Scenario:
    """Through the loader and back, as its saved file will replay it (the grammar must hold what it draws)."""
    path = scratch / f"{sc.name}.yaml"
    loaded = scn.reload(sc, path)
    path.unlink(missing_ok=True)  # an hour of soak draws thousands: none is kept once read
    if loaded is None:
        raise AssertionError(f"the soak drew a scenario the loader refuses: {sc}")
    return replace(loaded, path=sc.path)
