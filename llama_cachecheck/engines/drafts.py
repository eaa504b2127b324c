"""Drafters for the in-process subject's speculative decoding (llama_cachecheck/speculation.py verifies their drafts).

What a drafter proposes only decides how many tokens each verify batch accepts; with greedy
sampling it may never change the reply. So these follow the pinned server's drafters in what
they propose (a draft model's greedy tokens, the n-gram lookup of `common_ngram_simple_draft`),
not in how the draft model's own memory is kept: that memory is not under test.
"""

from __future__ import annotations

import numpy as np

from ..compare import common_prefix
from .base import SessionSettings, Speculative
from .lowlevel import Context, Model

# common_params_speculative_ngram_map: the n-gram looked up, and how many tokens after it are proposed
NGRAM_SIZE_N, NGRAM_SIZE_M = 12, 48


def ngram_simple(held: list[int], sampled: int, n_max: int) -> list[int]:
    """common_ngram_simple_draft: the tokens that followed the last earlier occurrence of the last n-gram
    (the held tokens' tail and the sampled one). Like the server's, it sizes its drafts itself."""
    n, m, cur = NGRAM_SIZE_N, NGRAM_SIZE_M, len(held)
    if cur <= n + m + 1:
        return []
    pattern = held[cur - n + 1:] + [sampled]
    for j in range(cur - n - 1, 0, -1):
        if held[j:j + n] == pattern:
            copy = min(m, cur - (j + n))
            return held[j + n:j + n + copy] if copy >= n else []
    return []


class ModelDrafter:
    """A draft model's greedy continuation (draft-simple): n_max tokens, dropped when fewer than n_min."""

    def __init__(self, model: Model, settings: SessionSettings, spec: Speculative):
        self.model, self.spec = model, spec
        self.ctx = Context(model, settings)
        self.held: list[int] = []  # what the draft context's memory holds
        self.rolls_back = model.memory_kind in ("attention", "swa")

    def close(self) -> None:
        self.ctx.close()

    def __call__(self, held: list[int], sampled: int, n_max: int) -> list[int]:
        self._catch_up(held)
        saved = None if self.rolls_back else self.ctx.save_partial()
        out: list[int] = []
        tok, pos = sampled, len(held)
        while len(out) < min(n_max, self.spec.n_max):
            self.ctx.decode([tok], pos)
            tok, pos = int(np.argmax(self.ctx.logits(-1))), pos + 1
            out.append(tok)
        if saved is not None:  # the drafted tokens leave the draft model's memory again
            self.ctx.load_partial(saved)
        self.ctx.seq_rm(len(held), -1)
        return out if len(out) >= self.spec.n_min else []

    def _catch_up(self, held: list[int]) -> None:
        n = common_prefix(self.held, held)
        if n < len(self.held) and not (self.rolls_back and self.ctx.seq_rm(n, -1)):
            self.ctx.clear()
            n = 0
        nb = self.ctx.settings.n_batch
        for p in range(n, len(held), nb):
            self.ctx.decode(held[p:p + nb], p)
        self.held = list(held)
