"""The subject's decode shapes, kept so the reference can repeat them from empty memory.

llama.cpp's kernels give the same bits for the same computation, but not for the same maths
done in other shapes: a 64-token batch and a 50 + 14 split of it, or a gemm and a gemv, round
differently. A reference that chunks the prompt its own way therefore differs from a correct
cache by float noise. If instead it makes the very decode calls that built the subject's
memory, over the prompt's tokens, a correct cache gives the same logits bit for bit, and any
difference is a finding.

`RecordedMemory` wraps the subject's context. For the state in memory it keeps the calls that
computed it (position and length); a trim cuts that list, a saved checkpoint keeps a copy of
it, and a restored checkpoint brings its copy back. `plan()` is then the reference's recipe
for the prompt just served, and `run_plan` carries it out.

--cache-reuse moves cells (`seq_rm` of a middle range, `seq_add`): the moved state is then one
call of its own, a `Move` that keeps the calls of the state before it, the tokens it held and
the move. The reference makes those calls and the same move, with each token that lands in the
prompt taken from the prompt: where the subject moved a chunk to the wrong place, the reference
holds other tokens there, and the logits differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .lowlevel import Context


@dataclass(frozen=True)
class Move:
    """Cells of a state moved by one seq_rm (of a middle range) or seq_add, and the state before it."""

    calls: tuple[Call, ...]  # what made the state before the move
    held: tuple[int, ...]  # its token at each position (-1: no cell there)
    op: tuple[int, int, int | None]  # (p0, p1, shift): the cells in [p0, p1) shifted, or removed (None)

    def where(self, pos: int) -> int | None:
        """Where the cell at `pos` is after the move (None: removed)."""
        p0, p1, shift = self.op
        if not p0 <= pos < p1:
            return pos
        return None if shift is None else pos + shift


@dataclass(frozen=True)
class Call:
    pos0: int
    n: int  # the positions of this call still in memory (a trim may have cut it short)
    tokens: tuple[int, ...]  # what it decoded: its shape, and the tokens of a part since cut off
    # after it, a state was saved and later loaded back: "partial" (a window checkpoint restored) or "full" (a
    # prompt from the host-memory cache or a slot file): the loaded cells sit in other slots of the cache
    reloaded: str = ""
    move: Move | None = None  # a state of moved cells (then pos0 is 0, and tokens empty)

    def cut(self, p0: int) -> Call:
        return replace(self, n=min(self.n, p0 - self.pos0))


@dataclass(frozen=True)
class Step:
    """One decode call of the reference: the prompt's tokens for `keep` positions, then a cut-off tail."""

    pos0: int
    keep: int
    tail: tuple[int, ...] = ()  # decoded for the call's shape, then trimmed away
    reload: str = ""  # save and load back the reference's own state here ("partial" / "full"), as the subject's was
    cut: bool = False  # the subject's call went on past `keep`, and that tail is not replayed
    moved: tuple[tuple[Step, ...], Move] | None = None  # the calls of the state before a move, and the move


Recipes = dict[int, tuple[bytes, list[Call], bool]]


class RecordedMemory:
    """The policy's memory: a Context whose state remembers which decode calls made it."""

    def __init__(self, ctx: Context, n_swa: int = 0, recipes: Recipes | None = None,
                 tail_ok: Callable[[Call], bool] = lambda _c: False):
        self.ctx = ctx
        self.n_swa = n_swa
        self.tail_ok = tail_ok  # whether plan() replays a cut-off tail whole (see Session._tail_ok)
        # a trim removed tokens that may have overwritten window cells the kept ones still see (see `seq_rm`)
        self.window_overwritten = False
        self.calls: list[Call] = []
        # id(state) -> state, its calls, overwritten; shared by the slots of a session, since a saved state
        # (a checkpoint, a host-cache entry) may be loaded into another slot than the one that made it
        self._saved: Recipes = {} if recipes is None else recipes

    # the Memory protocol -----------------------------------------------------------------------
    def pos_min(self) -> int:
        return self.ctx.pos_min()

    def pos_max(self) -> int:
        return self.ctx.pos_max()

    def decode(self, tokens: list[int], pos0: int, all_logits: bool = False) -> None:
        self.ctx.decode(tokens, pos0, all_logits)
        self.calls.append(Call(pos0, len(tokens), tuple(tokens)))

    def seq_rm(self, p0: int, p1: int = -1) -> bool:
        had = self.ctx.pos_max()
        ok = self.ctx.seq_rm(p0, p1)
        if ok and self.n_swa and had > p0 and had >= self.n_swa and not self._replayed_tail(p0, p1):
            # each ubatch reuses the slots of cells the window has left as of its first position; one that
            # began past p0 may have taken cells that tokens from p0 on still see, and no replay of the
            # kept calls brings that back (a checkpoint restore does: load_partial clears this)
            self.window_overwritten = True
        if ok and p1 < 0:
            self.calls = [c.cut(p0) for c in self.calls if c.pos0 < p0]
        elif ok:
            self._moved((p0, p1, None))
        return ok

    def _replayed_tail(self, p0: int, p1: int) -> bool:
        """Whether a trim takes only the tail of the last call, which plan() decodes again whole and trims (a
        rejected draft's cells): the same cells are then overwritten, in the same slots."""
        last = self.calls[-1] if self.calls else None
        return p1 < 0 and last is not None and last.move is None and last.pos0 < p0 < last.pos0 + last.n \
            and self.tail_ok(last.cut(p0))

    def seq_add(self, p0: int, p1: int, shift: int) -> None:
        self.ctx.seq_add(p0, p1, shift)
        self._moved((p0, p1, shift))

    def _moved(self, op: tuple[int, int, int | None]) -> None:
        held = cells(self.calls)
        move = Move(tuple(self.calls), tuple(held.get(p, -1) for p in range(max(held, default=-1) + 1)), op)
        after = [q for q in map(move.where, held) if q is not None]
        self.calls = [Call(0, max(after, default=-1) + 1, (), move=move)]

    def save_partial(self) -> bytes:
        return self._remember(self.ctx.save_partial())

    def load_partial(self, data: bytes) -> None:
        self.ctx.load_partial(data)
        if self.n_swa:  # only a window's restored cells move to other slots
            self._recall(data, "partial")
        else:
            self._recall(data, "")

    def save_full(self) -> bytes:
        return self._remember(self.ctx.save_full())

    def load_full(self, data: bytes) -> None:
        self.ctx.load_full(data)
        self._recall(data, "full")

    def recipe(self) -> tuple[list[Call], bool]:
        """The recipe of the state in memory now, to go with it elsewhere (a slot file)."""
        return list(self.calls), self.window_overwritten

    def recalled(self, recipe: tuple[list[Call], bool] | None, how: str) -> None:
        """A state was loaded by other means (a slot file): its recipe comes back with it."""
        if recipe is None:
            self.calls, self.window_overwritten = [Call(0, -1, ())], False  # unknown: plan() says so
            return
        self.calls, self.window_overwritten = list(recipe[0]), recipe[1]
        if self.calls and how:
            self.calls[-1] = replace(self.calls[-1], reloaded=how)

    def _remember(self, data: bytes) -> bytes:
        self._saved[id(data)] = (data, list(self.calls), self.window_overwritten)
        return data

    def _recall(self, data: bytes, how: str) -> None:
        saved = self._saved.get(id(data))
        if saved is not None and saved[0] is data:  # else a fault made these bytes: the calls stay as they are
            self.recalled((saved[1], saved[2]), how)

    # ------------------------------------------------------------------------------------------
    def clear(self) -> None:
        self.ctx.clear()
        self.calls = []
        self.window_overwritten = False

    def forget_checkpoints(self, keep: list[bytes]) -> None:
        """Drop the recipes of states nobody holds any more (they would pin their bytes)."""
        live = {id(d) for d in keep}
        for k in [k for k in self._saved if k not in live]:
            del self._saved[k]

    def plan(self, n_prompt: int, tail_ok: Callable[[Call], bool]) -> list[Step] | None:
        """The decode calls that cover the prompt, in order; None where they do not tile it.

        A call a trim cut short is replayed in its full shape where `tail_ok` says the tail
        cannot change what is kept (it goes in and is trimmed off again): a quantized matmul
        rounds a row differently in a batch of 8 than in a batch of 7. Elsewhere only its kept
        part is replayed.
        """
        steps, pos = _tile(self.calls, tail_ok)
        return steps if steps is not None and pos == n_prompt else None


def _tile(calls: list[Call] | tuple[Call, ...], tail_ok: Callable[[Call], bool]) -> tuple[list[Step] | None, int]:
    out, pos = [], 0
    for c in calls:
        if c.pos0 != pos or c.n <= 0:
            return None, pos
        if c.move is not None:
            inner, _ = _tile(c.move.calls, tail_ok)
            if inner is None:
                return None, pos
            out.append(Step(0, c.n, moved=(tuple(inner), c.move)))
        else:
            tail = c.tokens[c.n:] if tail_ok(c) else ()
            out.append(Step(c.pos0, c.n, tail, c.reloaded, cut=c.n + len(tail) < len(c.tokens)))
        pos += c.n
    return out, pos


def cells(calls: list[Call] | tuple[Call, ...]) -> dict[int, int]:
    """The token of each cell a state of these calls holds, by position."""
    out: dict[int, int] = {}
    for c in calls:
        if c.move is None:
            out.update(zip(range(c.pos0, c.pos0 + max(c.n, 0)), c.tokens[:max(c.n, 0)], strict=False))
            continue
        for p, tok in enumerate(c.move.held):
            q = c.move.where(p)
            if tok >= 0 and q is not None and q < c.n:
                out[q] = tok
    return out


def run_plan(ctx: Context, plan: list[Step] | tuple[Step, ...], token_at: Callable[[int], int]) -> Step | None:
    """Make the plan's calls (and moves) on `ctx`, with the token `token_at` gives for each position; the
    first step whose subject call went on past what is kept, and is not replayed whole, or None."""
    cut = None
    for step in plan:
        if step.moved is not None:
            inner, move = step.moved

            def inner_at(p: int, move: Move = move, keep: int = step.keep) -> int:
                q = move.where(p)  # a cell that lands in the prompt holds the prompt's token there
                return token_at(q) if q is not None and q < keep else move.held[p]

            inner_cut = run_plan(ctx, inner, inner_at)
            cut = cut or inner_cut
            p0, p1, shift = move.op
            if shift is None:
                ctx.seq_rm(p0, p1)
            else:
                ctx.seq_add(p0, p1, shift)
            ctx.seq_rm(step.keep)  # what the subject trimmed after the move (nothing, where it kept all)
            continue
        ctx.decode([token_at(p) for p in range(step.pos0, step.pos0 + step.keep)] + list(step.tail), step.pos0)
        if step.reload == "partial":  # the restored window's cells sit in new slots: so here
            ctx.load_partial(ctx.save_partial())
        elif step.reload == "full":  # a prompt loaded whole (host cache, slot file): its cells too
            ctx.load_full(ctx.save_full())
        if step.tail:
            ctx.seq_rm(step.pos0 + step.keep)
        if step.cut and cut is None:
            cut = step
    return cut


def run_verified(ctx: Context, log: list, n_prompt: int, reply: list[int], *,
                 read_row: Callable[[int], object]) -> int:
    """The rows of the reply's positions 1, 2, ... made in the subject's own verify batches (`speculation.Verified`),
    on `ctx` holding the prompt: the same batches over the same tokens, so a correct cache gives the same bits.
    `read_row(i)` reads row i of the batch just made, once per reply position in order; returns how many.

    A batch the subject rolled back gave no token and is not made (its checkpoint undid it). Each other
    batch must start where the reply has reached and hold the reply's tokens in the rows it gave: else the
    subject's memory left its reply (a kept rejected draft), and the rows stop there; the caller goes on
    one token per decode. So do they where the memory cannot drop the batch's unused tail."""
    at = 0  # reply positions read: the reply's token fed first in the next batch (the sampled one)
    for v in log:
        if v.n_out == 0:
            continue
        if v.pos0 != n_prompt + at or list(v.tokens[:v.n_out]) != reply[at:at + v.n_out]:
            break
        ctx.decode(list(v.tokens), v.pos0, all_logits=len(v.tokens) > 1)
        for i in range(v.n_out):
            read_row(i)
        at += v.n_out
        end = v.pos0 + v.n_out
        if end < v.pos0 + len(v.tokens) and at < len(reply) and not ctx.seq_rm(end, -1):
            break
    return at
