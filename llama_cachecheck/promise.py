"""What a request must reuse, by the design of the engine that served it: the lower bound that turns a right
answer from too little reuse into LOST-REUSE.

One rule per design (EngineInfo.reuse_design):
- `policy`: llama-server as designed (the in-process policy and a real llama-server): what the slot holds
  as far as the memory can be cut back to it, else the newest checkpoint the slot keeps at or before the
  prompt's divergence. The checkpoints are the design's whole list across requests: every near-end
  checkpoint a request took where it processed that point, kept until a later request cuts back past it
  or the list may have run full. Where a request drops what its slot held, the design saves it to the host
  cache with its checkpoints and loads the entry that serves a later prompt better (slots.SlotPolicy);
  a conversation that goes back to an earlier branch is promised that entry's checkpoint.
- `prefix-match`: llama-cpp-python's prefix cache.
- `engagement`: an OpenAI server of unknown design: a prompt that continues the last one reuses something.

Only what the design surely holds is promised: checkpoints at user messages, the policy's other batch
stops and a slot's memory in a multi-conversation host cache may give more, and are never counted on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .compare import common_prefix, near_end_points, reused_chunks, shifts_chunks
from .engines.base import Completion, SessionSettings
from .server_defaults import HOST_LOAD_MIN_KEEP, SLOT_PROMPT_SIMILARITY

NEEDS_CHECKPOINTS = ("swa", "recurrent", "hybrid")  # memory that cannot be cut back to any point


@dataclass(frozen=True)
class Point:
    """A checkpoint the design took: the tokens it holds, and the turn whose request took it."""

    n_tokens: int
    turn: int


@dataclass
class Branch:
    """A conversation's memory the design saved to the host cache when a request dropped it from the slot."""

    tokens: list[int]
    points: list[Point]
    saved_at: int  # the turn whose request saved it


@dataclass
class Memory:
    """What the design holds of one conversation: its checkpoints (oldest first), how many the real list may
    hold by now at most (it holds checkpoints we do not count on), and its branches in the host cache."""

    points: list[Point] = field(default_factory=list)
    # per request whose checkpoints the slot's list may still hold: where they begin, and at most how many
    made: list[tuple[int, int]] = field(default_factory=list)
    branches: list[Branch] = field(default_factory=list)
    host_known: bool = True  # the branches are all the host cache holds of it
    last: list[Point] = field(default_factory=list)  # the points the last request took: what stays certain


@dataclass(frozen=True)
class Pledge:
    """A promise and where it comes from, for the LOST-REUSE verdict."""

    n: int
    why: str = ""
    branch: Branch | None = None  # the host-cache entry the design loads for it
    certain: bool = True  # the design's choice between the slot and an entry is known


class Promise:
    """The reuse promise of one scenario's play on one engine."""

    def __init__(self, design: str, memory: str, settings: SessionSettings, reuse: bool):
        self.design, self.memory, self.s, self.reuse = design, memory, settings, reuse
        self.host_cache = bool(settings.cache_ram)  # None (in-process without one) and 0: no host prompt cache

    @property
    def similarity(self) -> float:
        """The slot prompt similarity threshold (unset: the servers' default)."""
        return SLOT_PROMPT_SIMILARITY if self.s.slot_prompt_similarity is None else self.s.slot_prompt_similarity

    @property
    def idle_cleared(self) -> bool:
        """Whether idle slots are saved to the host cache and cleared when a task starts: with
        --cache-idle-slots on a unified KV cache."""
        return self.s.cache_idle_slots is not False and self.s.unified_kv

    def host_brings(self, t, prompt: list[int]) -> bool:
        """Whether the host-memory cache brings a conversation's memory to another slot: only where it is there
        (its slot was taken or cleared, or idle slots are saved), and not where the entry would keep less than
        a quarter of itself (the prompt and the reply its slot held: "don't trash large prompts")."""
        n = common_prefix(t.prev_held, prompt)
        cached = self.host_cache and (t.in_host or self.s.cache_idle_slots is not False)
        return cached and n / max(len(t.prev_held), 1) >= HOST_LOAD_MIN_KEEP

    def let_go(self, t, prompt: list[int]) -> bool:
        """Whether the design lets a prompt's reuse go: with several slots, one that shares no more than the
        similarity threshold with its conversation's last prompt (any, with the rule off) may go to another
        slot, where it finds its memory only in the host cache (`host_brings`)."""
        if (self.s.n_parallel or 1) < 2 or not t.prev_prompt or not prompt:
            return False
        n = common_prefix(t.prev_prompt, prompt)
        elsewhere = self.similarity == 0 or n / len(prompt) <= self.similarity  # 0: the rule is off, always LRU
        return elsewhere and not self.host_brings(t, prompt)

    # the promise ------------------------------------------------------------------------
    def of(self, t, sub: Completion, alone: bool) -> Pledge:
        """What this request must reuse, from its conversation's memory (`t`, a conversation.Track). `alone`:
        the only conversation so far, nothing moved its memory, so the host cache holds only its branches."""
        prompt = sub.prompt_tokens
        if t.prev_prompt is None:
            return Pledge(0)
        if not (self.reuse and t.kept and sub.reuse_reported) or self.let_go(t, prompt):
            return Pledge(0, certain=False)
        if t.in_host and not self.host_brings(t, prompt):  # its memory is in the host cache only, and the cache
            return Pledge(0, certain=False)  # does not load an entry kept so little
        if self.design == "engagement":
            return Pledge(engaged(t.prev_prompt, prompt))
        if self.design == "prefix-match":
            return Pledge(prefix_match_reuse(t.prev_held, prompt, self.memory))
        slot = self._serves(t.prev_held, t.memory.points, prompt, "its slot")
        if self.s.cache_reuse and shifts_chunks(self.memory) and t.prev_held:  # chunks shifted into place
            shifted = min(chunk_reuse(t.prev_held, prompt, self.s.cache_reuse), len(prompt) - 1)
            if shifted > slot.n:
                slot = Pledge(shifted, "the chunks --cache-reuse shifts into place")
        if not (alone and self._keeps_branches(t)):
            return slot
        return self._from_host(t, prompt, slot)

    def _serves(self, held: list[int], points: list[Point], prompt: list[int], where: str) -> Pledge:
        """What memory holding `held`, with checkpoints `points`, gives back of `prompt` (SlotPolicy.serves, on
        what the design surely holds): what it shares, where the memory can be cut back to it or continues it
        (recurrent state continues all it holds); else the newest checkpoint within the shared part. An SWA
        checkpoint taken at p restores to p - 1: the server keeps its [pos_min, pos_max] and resumes at pos_max;
        a recurrent state restored is kept whole and one token must be left to decode. (A speculating slot may hold
        drafts past what we know it holds: its state is not promised.)"""
        n = common_prefix(held, prompt)
        last = len(prompt) - 1
        if self.memory not in NEEDS_CHECKPOINTS:
            return Pledge(min(n, last), f"the tokens the prompt shares with {where}")
        if self.memory != "swa" and 0 < n == len(held) < len(prompt) and self.s.speculative is None:
            return Pledge(n, f"the state of {where}, which the prompt continues")
        limit = n if self.memory == "swa" else min(n, last)
        usable = [p for p in points if 0 < p.n_tokens <= limit]
        if not usable:
            return Pledge(0)
        best = max(usable, key=lambda p: p.n_tokens)
        got = min(best.n_tokens - (self.memory == "swa"), last)
        return Pledge(got, f"the checkpoint at {best.n_tokens} tokens taken at turn {best.turn}, in {where}")

    def _keeps_branches(self, t) -> bool:
        """Whether the design's host cache surely keeps every branch this conversation saved: it loads and
        evicts by its own rules, which hold only while the entries fit its token limit (at least n_ctx) and its
        memory (we assume no scenario's few thousand tokens outgrow a GiB)."""
        ram = self.s.cache_ram
        return self.host_cache and t.memory.host_known and not self.s.cache_reuse and (ram < 0 or ram >= 1024) and \
            sum(len(b.tokens) for b in t.memory.branches) + len(t.prev_held) <= self.s.n_ctx

    def _from_host(self, t, prompt: list[int], slot: Pledge) -> Pledge:
        """SlotPolicy.best_entry on what the design surely holds: the branch that shares the most of the
        prompt, more than the slot, keeping at least a quarter of itself and serving no less than the slot.
        Where our lists are short of the real ones, the choice may go the other way: then the lesser of the
        two is promised, and after it only what this request took is counted (`served`)."""
        n_slot = common_prefix(t.prev_held, prompt)
        if n_slot == len(t.prev_held):
            return slot  # the design drops nothing of the slot's: no host-cache update
        best, n_best = None, n_slot
        for b in t.memory.branches:
            n = common_prefix(b.tokens, prompt)
            if n / len(b.tokens) >= HOST_LOAD_MIN_KEEP and n >= n_best and (n > n_best or best is not None):
                best, n_best = b, n
        if best is None:
            return slot
        got = self._serves(best.tokens, best.points, prompt, f"the host-cache entry saved at turn {best.saved_at}")
        if got.n >= n_slot:  # it serves more than the slot could: the design surely loads it
            return Pledge(got.n, got.why, best)
        low = got if got.n < slot.n else slot
        return Pledge(low.n, low.why, None, certain=False)

    # what the request leaves -------------------------------------------------------------
    def served(self, t, sub: Completion, pledge: Pledge, turn: int) -> None:
        """After the request: the design's checkpoints for the conversation's next one. Those it kept (no later
        than where this request resumed and within what the prompt shares: a checkpoint past pos_next is
        erased), and the near-end points of this prompt where it processed them; the slot's old memory saved as
        a branch where the design drops it, the branch it loaded gone from the host cache."""
        if self.design != "policy":
            return
        m, prompt, reused, s = t.memory, sub.prompt_tokens, sub.n_reused, self.s
        n_slot = common_prefix(t.prev_held, prompt)
        if not pledge.certain:  # where the design took its memory from is not known: only what this request took
            uncertain(m, known=False)
        elif self.host_cache and t.prev_prompt is not None and n_slot < len(t.prev_held):
            self._save(m, Branch(list(t.prev_held), list(m.points), turn))
        held = pledge.branch.tokens if pledge.branch else t.prev_held
        source = pledge.branch.points if pledge.branch else m.points
        if pledge.branch in m.branches:
            m.branches.remove(pledge.branch)
        if reused < pledge.n:  # it fell short: which memory it took is not known, only what both held
            both = set(m.points)
            source = [p for p in source if p in both]
        n_held = common_prefix(held, prompt)
        within = min(reused, n_held)
        kept = [p for p in source if p.n_tokens <= within]
        taken = sorted({p for p in near_end_points(len(prompt), s.n_batch, s.n_ubatch) if p > 0 and p >= reused})
        m.last = [Point(p, turn) for p in taken][-s.ctx_checkpoints:] if s.ctx_checkpoints > 0 else []
        reach = max(n_slot, n_held)
        if self._may_be_full(m, reach, min(reused, pledge.n), len(prompt)):  # older requests' ones evicted
            kept = []
        points = sorted([p for p in kept if p.n_tokens not in taken] + m.last, key=lambda p: p.n_tokens)
        m.points = points[-s.ctx_checkpoints:] if s.ctx_checkpoints > 0 else []

    def _may_be_full(self, m: Memory, reach: int, resumed: int, n_prompt: int) -> bool:
        """Whether the slot's real list may have run full with this request (make_room then evicts older
        requests' checkpoints): it holds at most what each request since can have added that no later one
        surely erased. A request's checkpoints lie at or past where it resumed, and are surely erased only past
        the furthest a later one can have resumed (`reach`: its slot's, or the entry's, common prefix)."""
        m.made = [(first, n) for first, n in m.made if first <= reach + 1]
        m.made.append((resumed, self._most_taken(n_prompt - resumed)))
        if sum(n for _, n in m.made) + 1 < self.s.ctx_checkpoints:
            return False
        m.made = m.made[-1:]
        return True

    def _most_taken(self, processed: int) -> int:
        """The most checkpoints one request can add to the slot's list (CheckpointPolicy.batch_end and
        wants_checkpoint): each batch in the prompt's last n_ubatch + 4 tokens, and the batches a user message
        starts (the last one, the first into an empty list, then one per min-step), each cutting a batch."""
        s = self.s
        users = 2 + processed // max(1, s.checkpoint_min_step)
        return -(-(s.n_ubatch + 4) // max(1, s.n_batch)) + 1 + 2 * users

    def _save(self, m: Memory, b: Branch) -> None:
        """server_prompt_cache::alloc: not where an entry holds it all; entries it holds all of are dropped."""
        if any(common_prefix(e.tokens, b.tokens) == len(b.tokens) for e in m.branches):
            return
        m.branches = [e for e in m.branches if common_prefix(e.tokens, b.tokens) < len(e.tokens)] + [b]


def uncertain(m: Memory, known: bool = True) -> None:
    """Its memory moved or another conversation ran beside it: only the last request's checkpoints stay sure
    (`known`: the memory is still the one they were taken in), and the host cache holds entries we do not
    know. A conversation stays so: its host-cache branches are not promised again."""
    m.points = list(m.last) if known else []
    m.branches, m.host_known = [], False


def engaged(prev_prompt: list[int] | None, prompt: list[int]) -> int:
    """The engagement guard's promise, for a server whose cache design is unknown: a prompt that continues
    the last one (all of it kept) must reuse something from any prefix cache."""
    return int(bool(prev_prompt) and common_prefix(prev_prompt, prompt) == len(prev_prompt))


def chunk_reuse(held: list[int], prompt: list[int], n_min: int) -> int:
    """How many of `prompt`'s tokens llama-server's --cache-reuse finds in `held` (its slot's tokens)."""
    return common_prefix(held, prompt) + sum(n for _, _, n in reused_chunks(held, prompt, n_min))


def prefix_match_reuse(held: list[int], prompt: list[int], memory: str) -> int:
    """llama-cpp-python's `generate`: what its context holds is kept as far as the prompt shares it, one
    token less where the prompt is all shared (its logits must be computed again); memory that cannot drop
    a tail (recurrent state, and hybrid memory with it) keeps it only where the prompt continues all of it."""
    if not held:
        return 0
    n = common_prefix(held, prompt)
    if memory in ("recurrent", "hybrid") and n < len(held):
        return 0
    return n - 1 if n == len(prompt) else n
