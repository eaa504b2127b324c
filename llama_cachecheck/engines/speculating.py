"""The in-process session's speculative decoding: the subject's replies through llama_cachecheck/speculation.py, and
the reference that makes the subject's verify batches again.

A mixin of `inproc.Session` (its model, contexts, plans and ranking), kept apart because only a
speculating scenario needs it.
"""

from __future__ import annotations

from pathlib import Path

from ..speculation import NoProgress, Verified, make_decoder
from .base import EngineError, Prompt, SessionSettings, TopK
from .drafts import ModelDrafter, ngram_simple
from .lowlevel import Context, Model
from .replay import run_verified

Row = tuple[bytes, int, TopK]  # one generated position: the logits' digest, the greedy token, the top k


class Speculating:
    """What `Session` does where the subject speculates (its drafter set by `_start_drafter`)."""

    def _start_drafter(self, settings: SessionSettings) -> None:
        if self.drafter is not None and hasattr(self.drafter, "close"):
            self.drafter.close()
        spec = settings.speculative
        if spec is None:
            self.drafter = None
        elif spec.ngram is not None:
            self.drafter = ngram_simple
        else:  # `draft` is a GGUF path by now (the engine resolved it); the model itself drafts with its own file
            same = Path(spec.draft).resolve() == Path(self.model.path).resolve()
            model = self.model if same else self._draft_models.get(spec.draft) or Model(spec.draft)
            self._draft_models.setdefault(spec.draft, model)
            self.drafter = ModelDrafter(model, settings, spec)

    def _speculate(self, policy, ctx: Context, n_predict: int, k: int, key: tuple[int, ...]) \
            -> tuple[list[int], list[TopK], list[Row], dict]:
        """The subject's reply with speculative decoding (llama_cachecheck/speculation.py), its verify batches kept; and
        the timeline's event of it."""
        def read(i: int) -> tuple[int, Row]:
            row = self._rank(ctx.logits(i), k)
            return row[1], row

        decoder = make_decoder(policy, self.drafter, read, self.model.is_eog, n_ctx=self.settings.n_ctx,
                               n_batch=self.settings.n_batch, fault=self.fault)
        rows: list[Row] = []
        if n_predict > 0:  # a primer only processes its prompt: the reference generates nothing either
            try:
                rows = [row for _, row in decoder.generate(read(-1), n_predict)]
            except NoProgress as e:  # on a server: a slot that never finishes
                raise EngineError(str(e)) from None
            self._verified[key] = ([r[1] for r in rows], decoder.log)
        out = [r[1] for r in rows]
        told = {"kind": "speculated", "n_tokens": len(key), "pos_min": -1, "pos_max": -1, **decoder.stats}
        return out, [r[2] for r in rows], rows, told

    def _along_verified(self, prompt: Prompt, tokens: list[int], n_predict: int, k: int, reply: list[int],
                        log: list[Verified]) -> tuple[list[int], list[TopK]]:
        """The reference of a speculated reply: the subject's verify batches made again from the prompt's state
        (teacher forcing: they hold the subject's tokens), one token per decode where they leave the reply.
        Its own tokens follow these rows while they agree with the subject's; past a split it generates alone."""
        known = self._rows.get((prompt, k), [])
        forced = [self._rank(self.ref.logits(-1), k, known[0] if known else None)]

        def read(i: int) -> Row:
            j = len(forced)
            forced.append(self._rank(self.ref.logits(i), k, known[j] if j < len(known) else None))
            return forced[-1]

        run_verified(self.ref, log, len(tokens), reply, read_row=read)
        m = len(forced)
        if m < len(reply):  # the subject's memory left its reply: on, one token per decode
            self._truth(tokens, reply[:m])
            for i in range(m, len(reply)):
                if i > m:
                    self.ref.decode([reply[i - 1]], len(tokens) + i - 1)
                forced.append(self._rank(self.ref.logits(-1), k))
        self._forced[(prompt, k)] = (reply, [r[2] for r in forced])
        out: list[int] = []
        for row, tok in zip(forced, reply, strict=False):
            out.append(row[1])
            if row[1] != tok or self.model.is_eog(row[1]) or len(out) >= n_predict:
                break
        top = [r[2] for r in forced[:len(out)]]
        if not (out and self.model.is_eog(out[-1])) and len(out) < n_predict:  # past the split: its own way
            self._truth(tokens, out)
            more, more_top, _ = self._generate(self.ref, n_predict - len(out), k, self._ref_appender(len(tokens) +
                                                                                                   len(out)))
            out, top = out + more, top + more_top
        return out, top

    def _truth(self, tokens: list[int], reply: list[int]) -> None:
        """The reference holding the prompt and these reply tokens, the prompt as the subject's calls made it."""
        self._process(self.ref, tokens)
        nb = self.settings.n_batch
        for p in range(0, len(reply), nb):
            self.ref.decode(reply[p:p + nb], len(tokens) + p)

