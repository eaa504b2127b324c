"""The in-process engine's checkpoint policy: llama-server's, one named step at a time.

Mirrors `update_slots` / `create_checkpoint` in the pinned `tools/server/server-context.cpp`.
`CheckpointPolicy.serve` reads like the server's flow; each step is a small method. A fault
(the known bug classes, chosen by name) replaces exactly one step. Every fault is a policy
mistake llama.cpp *accepts* (a wrong, stale or misplaced state; a wrong position
accounting), never a call it refuses, so a fault shows up as a wrong answer or lost reuse,
not as an error.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .compare import common_prefix, near_end_points, reused_chunks
from .server_defaults import CHECKPOINT_MIN_STEP, CTX_CHECKPOINTS
from .status import Status

CHECKPOINT_KINDS = ("swa", "recurrent", "hybrid")  # memory that cannot be rolled back freely


class Memory(Protocol):
    """What the policy needs from a llama.cpp context (lowlevel.Context provides it)."""

    def pos_min(self) -> int: ...
    def pos_max(self) -> int: ...
    def seq_rm(self, p0: int, p1: int = -1) -> bool: ...
    def seq_add(self, p0: int, p1: int, shift: int) -> None: ...
    def save_partial(self) -> bytes: ...
    def load_partial(self, data: bytes) -> None: ...
    def decode(self, tokens: list[int], pos0: int, all_logits: bool = False) -> None: ...


class PolicyError(Exception):
    """The policy reached a state llama.cpp refuses: a bug in the policy, not in the model."""


@dataclass(frozen=True)
class PolicySettings:
    ctx_checkpoints: int = CTX_CHECKPOINTS
    checkpoint_min_step: int = CHECKPOINT_MIN_STEP
    n_batch: int = 512
    n_ubatch: int = 512
    cache_reuse: int = 0  # llama-server --cache-reuse: the smallest chunk shifted into place (0: off)


@dataclass
class Checkpoint:
    n_tokens: int  # tokens in memory when it was taken
    pos_min: int
    pos_max: int
    data: bytes
    request: int


@dataclass(frozen=True)
class Event:
    """One thing the cache did; the same timeline the server's log gives."""

    kind: str  # created / restored / erased / evicted / superseded / full-reprocess / kept (window memory used)
    n_tokens: int
    pos_min: int = -1
    pos_max: int = -1



@dataclass
class Served:
    n_reused: int
    n_processed: int
    events: list[Event] = field(default_factory=list)


class CheckpointPolicy:
    def __init__(self, memory: Memory, kind: str, n_swa: int, settings: PolicySettings):
        self.memory = memory
        self.kind = kind
        self.n_swa = n_swa
        self.settings = settings
        self.tokens: list[int] = []  # what the memory holds, like slot.prompt.tokens
        self.checkpoints: list[Checkpoint] = []
        self.request = 0
        self.events: list[Event] = []
        self.user_starts: set[int] = set()
        self.last_user = -1

    # the flow ---------------------------------------------------------------------------
    def serve(self, prompt: list[int], user_starts: tuple[int, ...] = ()) -> Served:
        """Bring the memory to `prompt`, reusing what it can; logits of the last token ready.

        `user_starts`: where user messages begin (the server's message spans), for chat prompts.
        """
        self.request += 1
        self.events = []
        self.user_starts = set(user_starts)
        self.last_user = max(user_starts, default=-1)
        n_past = self.match_prefix(prompt)
        if self.settings.cache_reuse and self.kind == "attention":  # the server asks llama_memory_can_shift
            n_past = self.reuse_chunks(prompt, n_past)
        pos_next = n_past
        has_new_tokens = n_past < len(prompt)
        thold = self.pos_min_threshold(pos_next, has_new_tokens)
        if n_past > 0 and self.cannot_trim_to(thold):
            cp = self.find_checkpoint(pos_next, thold)
            if cp is not None:
                n_past, pos_next = self.restore(cp, n_past, pos_next)
            else:
                n_past = pos_next = self.force_full_reprocess(n_past)
        elif n_past > 0 and self.kind == "swa":  # the window memory is used as it is: say what it held
            self.events.append(Event("kept", pos_next, self.memory.pos_min(), self.memory.pos_max()))
        self.erase_invalidated(pos_next)
        n_past = self.keep_one_token(n_past, prompt)
        self.trim_tail(n_past)
        self.process_prompt(prompt, n_past)
        return Served(n_past, len(prompt) - n_past, self.events)

    def append(self, token: int) -> None:
        """Decode one generated token, as the server does for each sampled token but the last."""
        self.memory.decode([token], len(self.tokens))
        self.tokens.append(token)

    # the steps --------------------------------------------------------------------------
    def match_prefix(self, prompt: list[int]) -> int:
        return common_prefix(self.tokens, prompt)

    def reuse_chunks(self, prompt: list[int], n_past: int) -> int:
        """--cache-reuse: runs of held tokens that the prompt continues with, moved to where it has them."""
        for head_c, head_p, n in reused_chunks(self.tokens, prompt, self.settings.cache_reuse):
            self.shift_chunk(head_c, head_p, n)
            self.tokens[head_p:head_p + n] = self.tokens[head_c:head_c + n]  # the server's set_token
            n_past += n
        return n_past

    def shift_chunk(self, head_c: int, head_p: int, n: int) -> None:
        self.memory.seq_rm(head_p, head_c)
        self.memory.seq_add(head_c, head_c + n, head_p - head_c)

    def pos_min_threshold(self, pos_next: int, has_new_tokens: bool) -> int:
        """The largest oldest-cell position at which the memory still covers the window."""
        return max(0, pos_next - self.n_swa - (0 if has_new_tokens else 1))

    def cannot_trim_to(self, thold: int) -> bool:
        return self.memory.pos_min() >= thold

    def find_checkpoint(self, pos_next: int, thold: int) -> Checkpoint | None:
        for cp in reversed(self.checkpoints):
            if cp.pos_max > pos_next:
                continue
            if cp.pos_min < thold or cp.pos_min == 0:
                return cp
        return None

    def restore(self, cp: Checkpoint, n_past: int, pos_next: int) -> tuple[int, int]:
        self.memory.load_partial(cp.data)
        pos_next = min(pos_next, max(cp.pos_min + 1, cp.pos_max))
        n_past = min(pos_next, cp.n_tokens)
        self.events.append(Event("restored", cp.n_tokens, cp.pos_min, cp.pos_max))
        return n_past, pos_next

    def force_full_reprocess(self, n_past: int) -> int:
        self.events.append(Event("full-reprocess", n_past))
        return 0

    def erase_invalidated(self, pos_next: int) -> None:
        """Checkpoints past the new divergence belong to another branch."""
        keep = []
        for cp in self.checkpoints:
            if cp.pos_max > pos_next:
                self.events.append(Event("erased", cp.n_tokens, cp.pos_min, cp.pos_max))
            else:
                keep.append(cp)
        self.checkpoints = keep

    def keep_one_token(self, n_past: int, prompt: list[int]) -> int:
        """At least one prompt token must be decoded, for its logits."""
        return n_past - 1 if n_past == len(prompt) and n_past > 0 else n_past

    def trim_tail(self, n_past: int) -> None:
        if not self.memory.seq_rm(n_past, -1):
            raise PolicyError(f"llama_memory_seq_rm refused to trim to {n_past} "
                              f"(memory holds {len(self.tokens)} tokens)")
        del self.tokens[n_past:]

    def process_prompt(self, prompt: list[int], n_past: int) -> None:
        n = n_past
        while n < len(prompt):
            end = self.batch_end(n, len(prompt))
            self.process_batch(prompt[n:end], n, self.wants_checkpoint(n, end, len(prompt)))
            n = end

    def batch_end(self, start: int, total: int) -> int:
        """Fill up to n_batch, but stop where a checkpoint should be taken.

        The server breaks the batch at the last user message, at user messages at least
        min-step past the last checkpoint, and when (4 + n_ubatch) or 4 prompt tokens remain
        (llama.cpp PR 20288), so that a checkpoint can be saved at those points.
        """
        s = self.settings
        stops = set(near_end_points(total, s.n_batch, s.n_ubatch))
        end = start
        while end < total and end - start < s.n_batch:
            end += 1
            if not self.checkpointing:
                continue
            if end in self.user_starts and (end == self.last_user or not self.checkpoints
                                            or end > self.checkpoints[-1].n_tokens + s.checkpoint_min_step):
                break
            if end in stops:
                break
        return end

    @property
    def checkpointing(self) -> bool:
        return self.settings.ctx_checkpoints > 0 and self.kind in CHECKPOINT_KINDS

    def wants_checkpoint(self, start: int, end: int, total: int) -> bool:
        """At a user message or near the end of the prompt, with something in memory, not too close to the last."""
        near_end = total < end + self.settings.n_ubatch
        is_user_start = start in self.user_starts
        if not self.checkpointing or self.memory.pos_min() < 0:
            return False
        if end < total and not is_user_start and not near_end:
            return False
        last = self.checkpoints[-1].n_tokens if self.checkpoints else None
        return (last is None or start == self.last_user or near_end
                or start > last + self.settings.checkpoint_min_step)

    def process_batch(self, batch: list[int], start: int, checkpoint: bool) -> None:
        # the server saves the checkpoint before llama_decode: the batch is not part of it
        if checkpoint:
            self.create_checkpoint(start)
        self.memory.decode(batch, start)
        self.tokens.extend(batch)

    def create_checkpoint(self, n_tokens: int) -> None:
        self.make_room()
        for cp in [cp for cp in self.checkpoints if cp.n_tokens == n_tokens]:
            self.events.append(Event("superseded", cp.n_tokens, cp.pos_min, cp.pos_max))
            self.checkpoints.remove(cp)
        cp = Checkpoint(n_tokens, self.memory.pos_min(), self.memory.pos_max(),
                        self.memory.save_partial(), self.request)
        self.checkpoints.append(cp)
        self.events.append(Event("created", cp.n_tokens, cp.pos_min, cp.pos_max))

    def make_room(self) -> None:
        """When full: drop older checkpoints within min-step of their predecessor, then the oldest."""
        s = self.settings
        if len(self.checkpoints) + 1 >= s.ctx_checkpoints:
            keep, last = [], None
            for cp in self.checkpoints:
                if cp.request != self.request and last is not None and \
                        cp.n_tokens <= last + s.checkpoint_min_step:
                    self.events.append(Event("evicted", cp.n_tokens, cp.pos_min, cp.pos_max))
                    continue
                keep.append(cp)
                last = cp.n_tokens
            self.checkpoints = keep
        while len(self.checkpoints) >= s.ctx_checkpoints:
            cp = self.checkpoints.pop(0)
            self.events.append(Event("evicted", cp.n_tokens, cp.pos_min, cp.pos_max))


# faults --------------------------------------------------------------------------------------

def relabel(data: bytes, old_pos: int, new_pos: int) -> bytes:
    """Move a recurrent state's recorded position, leaving its contents as they are.

    A recurrent (or hybrid, PARTIAL_ONLY) state blob is: magic, seq id, cell count, then the
    one cell's position. Faults use this so that llama.cpp's batch check (positions must
    continue the sequence) accepts a state whose contents do not match its position.
    """
    magic, seq, n_cells, pos = struct.unpack_from("<Iiii", data, 0)
    if n_cells != 1 or pos != old_pos:
        raise PolicyError(f"unexpected state layout (cells {n_cells}, pos {pos}, expected {old_pos})")
    return data[:12] + struct.pack("<i", new_pos) + data[16:]


def _no_restore(self: CheckpointPolicy, cp: Checkpoint, n_past: int, pos_next: int) -> tuple[int, int]:
    """Keep the live state (it has seen the old branch) and account as if cp were restored."""
    live, live_pos = self.memory.save_partial(), len(self.tokens) - 1
    n_past, pos_next = CheckpointPolicy.restore(self, cp, n_past, pos_next)
    if self.kind == "swa":
        self.memory.load_partial(live)  # cells evicted from the window stay evicted
    else:
        self.memory.load_partial(relabel(live, live_pos, n_past - 1))
    return n_past, pos_next


def _restore_off_by_one(self: CheckpointPolicy, cp: Checkpoint, n_past: int,
                        pos_next: int) -> tuple[int, int]:
    """Restore cp but account it one token off: a token is skipped (or, at the end, repeated)."""
    lcp = pos_next
    n_past, pos_next = CheckpointPolicy.restore(self, cp, n_past, pos_next)
    if n_past + 1 < lcp:  # the state says n tokens, the policy resumes after n + 1
        self.memory.load_partial(relabel(cp.data, cp.pos_max, n_past))
        return n_past + 1, pos_next + 1
    if n_past < 2:
        return n_past, pos_next
    # no room to skip: resume one early, so the state sees its last token twice
    self.memory.load_partial(relabel(cp.data, cp.pos_max, n_past - 2))
    return n_past - 1, pos_next - 1


def _no_erase(self: CheckpointPolicy, pos_next: int) -> None:
    """Checkpoints of the abandoned branch stay and can be restored later."""


def _swa_threshold(self: CheckpointPolicy, pos_next: int, has_new_tokens: bool) -> int:
    """Forget the window: a cache is taken as usable while its oldest cell precedes pos_next."""
    return max(0, pos_next - (0 if has_new_tokens else 1))


def _no_attention_trim(self: CheckpointPolicy, n_past: int) -> None:
    """Trim only when starting over: attention cells past a restore point stay visible."""
    if n_past == 0 and not self.memory.seq_rm(0, -1):
        raise PolicyError("llama_memory_seq_rm refused to clear the memory")
    del self.tokens[n_past:]


def _checkpoint_after_batch(self: CheckpointPolicy, batch: list[int], start: int,
                            checkpoint: bool) -> None:
    """Save the state after the batch, but record the position from before it."""
    pos_min, pos_max = self.memory.pos_min(), self.memory.pos_max()
    self.memory.decode(batch, start)
    self.tokens.extend(batch)
    if checkpoint:
        self.make_room()
        data = relabel(self.memory.save_partial(), start + len(batch) - 1, pos_max)
        self.checkpoints.append(Checkpoint(start, pos_min, pos_max, data, self.request))
        self.events.append(Event("created", start, pos_min, pos_max))


def _never_restore(self: CheckpointPolicy, pos_next: int, thold: int) -> Checkpoint | None:
    """The seed's lost reuse: no checkpoint is ever found, every turn is re-processed."""
    return None


def _restore_oldest(self: CheckpointPolicy, pos_next: int, thold: int) -> Checkpoint | None:
    """Correct output, but the oldest usable checkpoint: more re-processing than promised."""
    for cp in self.checkpoints:
        if cp.pos_max <= pos_next and (cp.pos_min < thold or cp.pos_min == 0):
            return cp
    return None


def _needless_restore(self: CheckpointPolicy, thold: int) -> bool:
    """Take the memory as unusable even where it holds the prefix: restore a checkpoint anyway."""
    return True


def _no_checkpoint_limit(self: CheckpointPolicy) -> None:
    """Never drop a checkpoint: memory grows past --ctx-checkpoints."""


def _drop_earlier_checkpoints(self: CheckpointPolicy) -> None:
    """Make room by dropping every checkpoint an earlier request took: a branch's older points are lost."""
    for cp in [cp for cp in self.checkpoints if cp.request != self.request]:
        self.events.append(Event("evicted", cp.n_tokens, cp.pos_min, cp.pos_max))
        self.checkpoints.remove(cp)
    CheckpointPolicy.make_room(self)


def _shift_one_late(self: CheckpointPolicy, head_c: int, head_p: int, n: int) -> None:
    """--cache-reuse moves a reused chunk one position past where it belongs."""
    self.memory.seq_rm(head_p, head_c)
    self.memory.seq_add(head_c, head_c + n, head_p - head_c + 1)


@dataclass(frozen=True)
class Fault:
    name: str
    step: str  # the method of `owner` it replaces
    replacement: Callable
    applies_to: tuple[str, ...]  # memory kinds where the step can go wrong
    detected_as: str  # FAIL (wrong answer) or LOST-REUSE
    owner: type = CheckpointPolicy  # the policy whose step it is (CheckpointPolicy, slots.SlotPolicy)

    def __post_init__(self) -> None:
        # a misspelt step would only add an unused attribute: a fault that silently changes nothing
        if not callable(getattr(self.owner, self.step, None)):
            raise ValueError(f"fault {self.name!r} replaces {self.step!r}, which is no step of "
                             f"{self.owner.__name__}")

    @property
    def doc(self) -> str:
        return (self.replacement.__doc__ or "").strip().splitlines()[0]

    def apply(self, policy: object) -> None:
        """Put the replacement in place of the step, on this one policy object."""
        setattr(policy, self.step, self.replacement.__get__(policy))


FAULTS: dict[str, Fault] = {f.name: f for f in [
    Fault("no-restore", "restore", _no_restore, CHECKPOINT_KINDS, Status.FAIL),
    Fault("keep-stale-checkpoints", "erase_invalidated", _no_erase, CHECKPOINT_KINDS, Status.FAIL),
    Fault("restore-off-by-one", "restore", _restore_off_by_one, ("recurrent", "hybrid"), Status.FAIL),
    Fault("swa-threshold", "pos_min_threshold", _swa_threshold, ("swa",), Status.FAIL),
    Fault("no-attention-trim", "trim_tail", _no_attention_trim, ("hybrid",), Status.FAIL),
    Fault("checkpoint-after-batch", "process_batch", _checkpoint_after_batch, ("recurrent", "hybrid"),
          Status.FAIL),
    Fault("force-full-reprocess", "find_checkpoint", _never_restore, CHECKPOINT_KINDS, Status.LOST_REUSE),
    Fault("restore-oldest", "find_checkpoint", _restore_oldest, CHECKPOINT_KINDS, Status.LOST_REUSE),
    Fault("needless-restore", "cannot_trim_to", _needless_restore, CHECKPOINT_KINDS, Status.FAIL),
    Fault("no-checkpoint-limit", "make_room", _no_checkpoint_limit, CHECKPOINT_KINDS, Status.FAIL),
    Fault("drop-earlier-checkpoints", "make_room", _drop_earlier_checkpoints, CHECKPOINT_KINDS,
          Status.LOST_REUSE),
    Fault("cache-reuse-off-by-one", "shift_chunk", _shift_one_late, ("attention", "swa"), Status.FAIL),
]}


def make_policy(memory: Memory, kind: str, n_swa: int, settings: PolicySettings, *,
                fault: str | None = None) -> CheckpointPolicy:
    """The policy with `fault` in place where it is one of its own (llama_cachecheck.faults checks the names)."""
    policy = CheckpointPolicy(memory, kind, n_swa, settings)
    if fault in FAULTS:
        FAULTS[fault].apply(policy)
    return policy
