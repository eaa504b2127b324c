"""The checkpoint policy against a fake memory: each step, the whole flow, and each fault's replacement.

The fake knows only which token each position holds, so "is the answer right" becomes "does the
memory hold exactly the prompt": no model, no llama.cpp, each case in milliseconds.
"""

import json
import struct
from dataclasses import replace

import pytest

from llama_cachecheck.policy import FAULTS, CheckpointPolicy, Fault, PolicySettings, make_policy
from llama_cachecheck.status import Status


def test_a_fault_that_names_no_step_of_the_policy_is_refused():
    with pytest.raises(ValueError, match="'restor', which is no step of CheckpointPolicy"):
        Fault("typo", "restor", lambda self: None, ("swa",), Status.FAIL)



# the policy against a fake memory -------------------------------------------------------------

WINDOW = 8
SETTINGS = PolicySettings(ctx_checkpoints=3, checkpoint_min_step=4, n_batch=16, n_ubatch=8)


class FakeMemory:
    """Which token each position holds, without a model: attention cells, a sliding window that
    forgets cells a window and a ubatch behind, or a recurrent state that has absorbed tokens and
    cannot be trimmed. Cells are kept per position as a list: a position decoded twice without a
    trim holds two cells, both attended, as in llama.cpp. Saved states have llama.cpp's header
    layout (magic, seq, cells, position), so the faults' relabelling works on them as on real ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self.cells: dict[int, list[int]] = {}  # attention and window cells: position -> tokens there
        self.state: list[int] = []  # recurrent: every token absorbed, in order
        self.state_pos = -1  # recurrent: the position the state says it is at

    @property
    def recurrent(self) -> bool:
        return self.kind in ("recurrent", "hybrid")

    def pos_min(self) -> int:
        return self.state_pos if self.recurrent else min(self.cells, default=-1)

    def pos_max(self) -> int:
        return self.state_pos if self.recurrent else max(self.cells, default=-1)

    def decode(self, tokens, pos0, all_logits=False):
        if self.recurrent:
            assert pos0 == self.state_pos + 1, f"llama.cpp refuses a batch at {pos0} after {self.state_pos}"
            self.state = self.state + tokens
            self.state_pos += len(tokens)
        if self.kind != "recurrent":
            for i, t in enumerate(tokens):
                self.cells.setdefault(pos0 + i, []).append(t)
            if self.kind == "swa":  # llama.cpp's window cache has room for the window and a ubatch
                top = max(self.cells)
                self.cells = {p: c for p, c in self.cells.items() if p > top - WINDOW - SETTINGS.n_ubatch}

    def seq_rm(self, p0, p1=-1):
        if self.recurrent and 0 < p0 <= self.state_pos:
            return False  # a recurrent state cannot go back
        if self.recurrent and p0 == 0:
            self.state, self.state_pos = [], -1
        self.cells = {p: c for p, c in self.cells.items() if p < p0 or 0 <= p1 <= p}
        return True

    def seq_add(self, p0, p1, shift):
        assert not self.recurrent, "the policy shifts attention cells only"
        self.cells = {p + shift if p0 <= p < p1 else p: c for p, c in self.cells.items()}

    def save_partial(self) -> bytes:
        part = self.state if self.recurrent else self.cells
        n = 1 if self.recurrent else len(self.cells)
        return struct.pack("<Iiii", 0xCAC4E, 0, n, self.pos_max()) + json.dumps(part).encode()

    def load_partial(self, data: bytes) -> None:
        pos = struct.unpack_from("<Iiii", data, 0)[3]
        part = json.loads(data[16:])
        if self.recurrent:
            self.state, self.state_pos = part, pos  # a relabelled state keeps its contents
        else:
            self.cells = {int(p): c for p, c in part.items()}

    def serves(self, prompt: list[int]) -> bool:
        """Whether the next token would be computed from exactly this prompt (its window, for SWA)."""
        n = len(prompt)
        if self.recurrent and (self.state_pos != n - 1 or self.state != prompt):
            return False
        if self.kind == "recurrent":
            return True
        lo = max(0, n - WINDOW) if self.kind == "swa" else 0
        return all(self.cells.get(p) == [prompt[p]] for p in range(lo, n)) and max(self.cells) == n - 1


REPLY = list(range(101, 113))  # every reply: 12 tokens, longer than a ubatch, within the window cache


def conversation():
    """Prompts as a chat makes them: grow, a second turn, regenerate, edit the first turn, go on."""
    p1 = list(range(1, 41))
    p2 = p1 + REPLY + list(range(200, 230))
    p4 = p1[:20] + list(range(300, 331))
    return [p1, p2, p2, p4, p4 + REPLY + list(range(400, 420))]


def spliced():
    """Raw prompts edited in the middle: a chunk deleted, then two more, then text inserted."""
    p1 = list(range(1, 61))
    p2 = p1[:10] + p1[20:] + REPLY[:-1] + [500, 501]
    p3 = p2[:5] + p2[8:30] + p2[34:] + [600]
    return [p1, p2, p3, p3[:40] + [700, 701, 702] + p3[40:]]


def play_policy(kind: str, fault: str | None = None, settings: PolicySettings = SETTINGS, prompts=None):
    """Serve each prompt, check what the memory holds, generate a reply; return (wrong, reused, events, most)."""
    mem = FakeMemory(kind)
    policy = make_policy(mem, kind, WINDOW if kind == "swa" else 0, settings, fault=fault)
    wrong, reused, events, most = [], [], [], 0
    for i, prompt in enumerate(prompts or conversation()):
        served = policy.serve(prompt)
        if not mem.serves(prompt):
            wrong.append(i)
        reused.append(served.n_reused)
        events.append([e.kind for e in served.events])
        most = max(most, len(policy.checkpoints))
        for tok in REPLY[:-1]:  # the server decodes every sampled token but the last
            policy.append(tok)
    return wrong, reused, events, most


@pytest.mark.parametrize("kind", ["attention", "swa", "recurrent", "hybrid"])
def test_the_correct_policy_serves_every_prompt_exactly_and_reuses(kind):
    wrong, reused, events, most = play_policy(kind)
    assert wrong == []
    assert reused[1] > 0 and reused[2] > 0 and reused[4] > 0  # a new turn, the regeneration, the turn after the edit
    assert most <= SETTINGS.ctx_checkpoints
    if kind == "attention":
        assert reused[3] == 20 and not any(events)  # the edit keeps what precedes it; no checkpoint anywhere
    else:  # the edit at 20 precedes every checkpoint: start over, and drop the abandoned branch's
        assert "full-reprocess" in events[3] and "erased" in events[3]
    if kind in ("recurrent", "hybrid"):
        assert "restored" in events[2]  # the regeneration must go back before the reply


def test_cache_reuse_moves_the_chunks_a_splice_left_into_place():
    reuse = replace(SETTINGS, cache_reuse=4)
    wrong, reused, _, _ = play_policy("attention", settings=reuse, prompts=spliced())
    assert wrong == [] and reused == [0, 10 + 51, 5 + 22 + 29, 40]  # the prefix, then each chunk; an insertion: none
    assert play_policy("attention", prompts=spliced())[1] == [0, 10, 5, 40]  # off: the common prefix only
    wrong, reused, _, _ = play_policy("recurrent", settings=reuse, prompts=spliced())
    assert wrong == [] and reused[1:3] == [0, 0]  # a recurrent state shifts nothing: the design


SHIFTING = {"cache-reuse-off-by-one"}  # faults of --cache-reuse: played on spliced prompts, as attention memory


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_fault_changes_what_its_step_does_on_every_kind_it_applies_to(fault):
    if fault in SHIFTING:  # an SWA cache shifts only with swa_full, where the engine plays it as attention
        clean = play_policy("attention", settings=replace(SETTINGS, cache_reuse=4), prompts=spliced())
        bad = play_policy("attention", fault, replace(SETTINGS, cache_reuse=4), spliced())
        assert bad[0] and not clean[0] and bad[1] == clean[1], (clean, bad)  # the same reuse, a wrong memory
        return
    for kind in FAULTS[fault].applies_to:
        clean, bad = play_policy(kind), play_policy(kind, fault)
        assert bad != clean, f"{fault} on {kind} changed nothing"
        wrong, reused, events, most = bad
        if fault == "drop-earlier-checkpoints":  # the lost reuse needs an older branch's checkpoint: the selftest's
            evicted = [sum(e.count("evicted") for e in run[2]) for run in (clean, bad)]
            assert not wrong and evicted[1] > evicted[0], (kind, evicted)
        elif FAULTS[fault].detected_as == Status.LOST_REUSE:
            assert not wrong and sum(reused) < sum(clean[1]), (fault, kind, bad)
        elif fault == "needless-restore":
            assert any("restored" in e for e in events[1:2]), (kind, events)  # the new turn extends the memory
        elif fault == "no-checkpoint-limit":
            assert most > SETTINGS.ctx_checkpoints
        elif fault == "keep-stale-checkpoints":  # the wrong answer needs a stale one restored: the selftest's
            assert not any("erased" in e for e in events) and any("erased" in e for e in clean[2])
        else:
            assert wrong, (fault, kind, bad)


def test_the_steps_one_by_one():
    mem = FakeMemory("recurrent")
    p = CheckpointPolicy(mem, "recurrent", 0, SETTINGS)
    p.tokens = [1, 2, 3, 4]
    assert p.match_prefix([1, 2, 9]) == 2
    assert p.pos_min_threshold(10, True) == 10 and CheckpointPolicy(mem, "swa", 8, SETTINGS).pos_min_threshold(
        10, False) == 1
    assert p.keep_one_token(4, [1, 2, 3, 4]) == 3 and p.keep_one_token(2, [1, 2, 3, 4]) == 2
    # a batch stops where a checkpoint is due: 4 + n_ubatch and 4 tokens before the prompt's end
    assert [p.batch_end(s, 40) for s in (0, 16, 28, 36)] == [16, 28, 36, 40]
    mem.decode(list(range(20)), 0)
    p.tokens = list(range(20))
    for n in (4, 8, 12, 16):  # the limit (3): the oldest goes first
        p.create_checkpoint(n)
    assert [cp.n_tokens for cp in p.checkpoints] == [8, 12, 16]
    assert [e.kind for e in p.events] == ["created", "created", "created", "evicted", "created"]
    p.events = []
    p.erase_invalidated(10)  # the state they hold reaches position 19, past a divergence at 10
    assert p.checkpoints == [] and [e.kind for e in p.events] == ["erased"] * 3
