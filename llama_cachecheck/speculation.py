"""The in-process engine's speculative decoding: llama-server's draft, verify and roll back, one step at a time.

Mirrors the pinned `tools/server/server-context.cpp`: `update_slots` drafts for a generating slot and
saves a checkpoint of the target's memory (`spec_ckpt`) where the memory cannot drop single positions
(recurrent and hybrid: `COMMON_CONTEXT_SEQ_RM_TYPE_FULL`); `handle_last_sampled_token` puts the sampled
token and the draft in one batch; the sample-and-accept loop (`common_sampler_sample_and_accept_n`)
takes the target's greedy token at each row while it agrees with the draft. A partial acceptance on
such memory restores the checkpoint and verifies the accepted tokens once more (`spec_is_replay`);
elsewhere the rejected cells are trimmed. With greedy sampling none of this may change a token.

Every decode the reply's tokens came from is logged (`Verified`), so the reference can make the same
batches from empty memory: a row of a batch of five rounds otherwise than a one-token decode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .policy import Checkpoint, CheckpointPolicy, Fault, relabel
from .status import Status


class NoProgress(Exception):
    """Verify batches rolled back without end: the slot would never finish."""


MAX_ROLLBACKS = 16  # a correct rollback is verified again once, twice where float noise splits a near-tie

# what the target's memory can drop: single positions (attention, SWA), or only whole states back to a checkpoint
ROLLS_BACK_BY_CHECKPOINT = ("recurrent", "hybrid")


@dataclass(frozen=True)
class Verified:
    """One decode of the sampled token and its draft at `pos0`; its first `n_out` rows gave the reply's next
    tokens (0: the batch was rolled back, and a later one verified what it accepted)."""

    pos0: int
    tokens: tuple[int, ...]
    n_out: int


# what the decoder reads of the target's logits: row i of the last decode -> (greedy token, anything the caller keeps)
RowReader = Callable[[int], tuple[int, object]]
# a drafter: what the memory holds, the sampled token, at most how many -> the draft
Drafter = Callable[[list[int], int, int], list[int]]


class SpeculativeDecoder:
    """Generates a reply with a drafter on a policy's memory, as llama-server does for one slot."""

    def __init__(self, policy: CheckpointPolicy, drafter: Drafter, read_row: RowReader, is_eog: Callable[[int], bool],
                 n_ctx: int, n_batch: int):
        self.policy, self.drafter, self.read_row, self.is_eog = policy, drafter, read_row, is_eog
        self.n_ctx, self.n_batch = n_ctx, n_batch
        self.log: list[Verified] = []
        self.stats = {"batches": 0, "rolled_back": 0, "drafted": 0, "accepted": 0}  # what the timeline says

    @property
    def memory(self):
        return self.policy.memory

    def generate(self, first: tuple[int, object], n_predict: int) -> list[tuple[int, object]]:
        """The reply's rows, from the prompt's last row on: the first token is sampled as without speculation."""
        rows = [first]
        replay: list[int] | None = None  # what a rolled-back batch accepted, verified again (spec_is_replay)
        ckpt: Checkpoint | None = None
        while not self.done(rows, n_predict):
            sampled, n_mem = rows[-1][0], len(self.policy.tokens)
            draft = replay
            if draft is None:
                draft = self.draft(sampled, n_mem, n_predict - len(rows))
                ckpt = self.save_checkpoint(n_mem) if draft and self.policy.kind in ROLLS_BACK_BY_CHECKPOINT else None
            batch = [sampled, *draft]
            self.memory.decode(batch, n_mem, all_logits=len(batch) > 1)
            self.policy.tokens.extend(batch)
            accepted = self.accept(draft)
            if draft and replay is None:
                self.stats["batches"] += 1
                self.stats["drafted"] += len(draft)
                self.stats["accepted"] += len(accepted) - 1
            if len(accepted) < len(batch) and ckpt is not None and self.roll_back(ckpt, n_mem, len(accepted)):
                self.stats["rolled_back"] += 1
                self.log.append(Verified(n_mem, tuple(batch), 0))
                if len(self.log) > MAX_ROLLBACKS and not any(v.n_out for v in self.log[-MAX_ROLLBACKS:]):
                    raise NoProgress(f"speculative decoding made no progress: {MAX_ROLLBACKS} verify batches in a "
                                     f"row were rolled back at position {n_mem}")
                replay = [tok for tok, _ in accepted]
                continue
            replay = None
            self.keep_accepted(n_mem, len(accepted))
            self.log.append(Verified(n_mem, tuple(batch), self.emit(rows, accepted, n_predict)))
        return rows

    def done(self, rows: list, n_predict: int) -> bool:
        return len(rows) >= n_predict or self.is_eog(rows[-1][0])

    def draft(self, sampled: int, n_mem: int, n_remaining: int) -> list[int]:
        """The server's get_n_draft_max: room for the context, and no more than the reply still needs."""
        n_max = min(self.n_ctx - n_mem - 2, n_remaining - 1)
        if n_max <= 0:
            return []
        # a drafter that sizes its drafts itself (the n-gram ones) may go past n_max: the batch must hold them
        return self.drafter(list(self.policy.tokens), sampled, n_max)[: self.n_batch - 1]

    def save_checkpoint(self, n_mem: int) -> Checkpoint:
        m = self.memory
        return Checkpoint(n_mem, m.pos_min(), m.pos_max(), m.save_partial(), self.policy.request)

    def accept(self, draft: list[int]) -> list[tuple[int, object]]:
        """The target's row at each drafted position while it agrees; a drafted end-of-generation token is
        accepted only last (past it, tokens would stay in the context that are never output)."""
        out = []
        for i in range(len(draft) + 1):
            row = self.read_row(i)
            out.append(row)
            if i == len(draft) or row[0] != draft[i] or self.ends_run(row[0], i, len(draft)):
                break
        return out

    def ends_run(self, token: int, i: int, n_draft: int) -> bool:
        """A drafted end-of-generation token ends the accepted run, unless it is the draft's last (a replay's)."""
        return self.is_eog(token) and i + 1 < n_draft

    def roll_back(self, ckpt: Checkpoint, n_mem: int, n_accepted: int) -> bool:
        """A partial acceptance on memory that cannot drop positions: back to the state before the batch, whose
        accepted tokens are then verified again (True)."""
        self.memory.load_partial(ckpt.data)
        self.memory.seq_rm(ckpt.pos_max + 1, -1)
        del self.policy.tokens[n_mem:]
        return True

    def keep_accepted(self, n_mem: int, n_accepted: int) -> None:
        """The sampled token and the accepted drafts stay; the cells of rejected drafts go (the server does not
        check the result: on memory that rolls back by checkpoint, nothing is left to drop)."""
        keep = n_mem + n_accepted
        del self.policy.tokens[keep:]
        self.memory.seq_rm(keep, -1)

    def emit(self, rows: list, accepted: list, n_predict: int) -> int:
        """The accepted tokens go to the reply until it ends (process_token); how many went."""
        n = 0
        for row in accepted:
            if self.done(rows, n_predict):
                break
            rows.append(row)
            n += 1
        return n


# faults --------------------------------------------------------------------------------------

def _keep_rejected_draft(self: SpeculativeDecoder, n_mem: int, n_accepted: int) -> None:
    """After a partial acceptance the first rejected draft token stays in memory, as if accepted."""
    keep = min(n_mem + n_accepted + 1, len(self.policy.tokens))
    del self.policy.tokens[keep:]
    self.memory.seq_rm(keep, -1)
    # the sampled token goes in after it: the policy's count of held tokens is where the next batch starts


def _no_rollback(self: SpeculativeDecoder, ckpt: Checkpoint, n_mem: int, n_accepted: int) -> bool:
    """No checkpoint restored: the state, that saw the rejected drafts, is kept as if trimmed to the accepted
    ones (a build that takes the memory for one that drops positions; relabelled, so llama.cpp goes on)."""
    keep = n_mem + n_accepted
    self.memory.load_partial(relabel(self.memory.save_partial(), self.memory.pos_max(), keep - 1))
    return False


def _send_past_end(self: SpeculativeDecoder, rows: list, accepted: list, n_predict: int) -> int:
    """Accepted tokens go on past the end of generation: drafts past an end-of-generation token or past
    n_predict are accepted, and every accepted token is sent."""
    rows += accepted
    return len(accepted)


def _accept_past_eog(self: SpeculativeDecoder, token: int, i: int, n_draft: int) -> bool:
    return False


def _draft_past_end(self: SpeculativeDecoder, sampled: int, n_mem: int, n_remaining: int) -> list[int]:
    return SpeculativeDecoder.draft(self, sampled, n_mem, self.n_ctx)


SPEC_FAULTS: dict[str, Fault] = {f.name: f for f in [
    Fault("spec-keeps-rejected-draft", "keep_accepted", _keep_rejected_draft, ("attention", "swa"), Status.FAIL,
          SpeculativeDecoder),
    Fault("spec-no-rollback", "roll_back", _no_rollback, ROLLS_BACK_BY_CHECKPOINT, Status.FAIL, SpeculativeDecoder),
    Fault("spec-past-end", "emit", _send_past_end, ("attention", "swa", "recurrent", "hybrid"), Status.FAIL,
          SpeculativeDecoder),
]}


def make_decoder(policy: CheckpointPolicy, drafter: Drafter, read_row: RowReader, is_eog: Callable[[int], bool],
                 *, n_ctx: int, n_batch: int, fault: str | None = None) -> SpeculativeDecoder:
    d = SpeculativeDecoder(policy, drafter, read_row, is_eog, n_ctx, n_batch)
    if fault in SPEC_FAULTS:
        SPEC_FAULTS[fault].apply(d)
        if fault == "spec-past-end":  # one bug: the drafting, accepting and sending steps all miss the end
            d.ends_run, d.draft = _accept_past_eog.__get__(d), _draft_past_end.__get__(d)
    return d
