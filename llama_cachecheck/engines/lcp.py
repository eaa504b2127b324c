"""llama-cpp-python's own prompt cache under test: the high-level `Llama` (its prefix match in `generate`,
and `LlamaRAMCache` / `LlamaDiskCache` on top), driven through `create_completion` for raw-token scenarios
and `create_chat_completion` for chat, as its users call it.

The reference is a second `Llama` of the same version that forgets its context before every prompt
(`reset()`: no prefix is matched, the memory is cleared from position 0), so each prompt is processed in
full. The two process a prompt in different batches, so the comparison is the calibrated tolerance.
What a reply reused is read where `generate` decides it: its first `eval` starts after the tokens it kept
(after a cache entry was loaded, and the prefix matched). The generated ids and their top-k come from its
`sample` calls, each with the logits it samples from, so tokens are the model's own ids.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import numpy as np

from .. import rundir
from ..reproducer import lcp_ask
from .base import (
    Completion,
    EngineError,
    EngineInfo,
    ModelUnsupported,
    Prompt,
    SessionSettings,
    TopK,
    Unsupported,
    settings_set,
)
from .worker import SITE, Worker


def lcp_step(prompt: Prompt, n: int) -> dict:
    """A request as lcp_ask sends it (and a reproducer's case.json records it)."""
    step = {"max_tokens": max(n, 1)}
    if prompt.tokens is not None:
        return {"tokens": [int(t) for t in prompt.tokens], **step}
    return {"messages": prompt.message_dicts(), "tools": prompt.chat_options()["tools"] if prompt.tools else None,
            **step}


def _top(logits: np.ndarray, k: int) -> TopK:
    """The k best tokens and their logprobs, once per sampled token: the k are picked without sorting the
    whole vocabulary (262k tokens for Gemma)."""
    lp = logits.astype(np.float64)
    lp -= lp.max()
    lp -= np.log(np.exp(lp).sum())
    k = min(k, len(lp))
    best = np.argpartition(-lp, k - 1)[:k] if k else np.arange(0)
    ids = best[np.lexsort((best, -lp[best]))]  # highest first, ties by id as a stable full sort had them
    return [(int(i), float(lp[i])) for i in ids]


class Session:
    """In the worker: the subject `Llama` with its cache, the reference `Llama`, one scenario's worth."""

    def __init__(self, path: str, cache: str, files: str):
        import llama_cpp

        self.ll, self.path, self.cache, self.files = llama_cpp, path, cache, files
        self.subject = self.ref = None

    def info(self) -> dict:
        return {"version": self.ll.__version__}

    def start_session(self, s: SessionSettings) -> None:
        for llm in (self.subject, self.ref):
            if llm is not None and hasattr(llm, "close"):  # older releases free it when collected
                llm.close()
        wanted = {"n_ctx": s.n_ctx, "n_batch": s.n_batch, "n_ubatch": s.n_ubatch, "n_threads": s.threads,
                  "n_threads_batch": s.threads, "swa_full": s.swa_full, "verbose": False}
        known = inspect.signature(self.ll.Llama.__init__).parameters
        missing = [k for k, v in wanted.items() if k not in known and v != getattr(SessionSettings(), k, v)]
        if missing:  # an older release: a setting it cannot take is not played as another
            raise Unsupported(f"llama-cpp-python {self.ll.__version__}'s Llama takes no {', '.join(missing)}")
        try:
            made = [self.ll.Llama(model_path=self.path, **{k: v for k, v in wanted.items() if k in known})
                    for _ in range(2)]
        except ValueError as e:  # "Failed to load model from file": a release older than the architecture
            raise ModelUnsupported(f"llama-cpp-python {self.ll.__version__} cannot load this model ({e})") from None
        self.subject, self.ref = made
        if self.cache == "ram":
            self.subject.set_cache(self.ll.LlamaRAMCache())
        elif self.cache == "disk":
            self.subject.set_cache(self.ll.LlamaDiskCache(cache_dir=self.files))

    def complete(self, prompt: Prompt, n: int, k: int, reference: bool) -> Completion:
        llm = self.ref if reference else self.subject
        if reference:
            llm.reset()  # nothing of the last prompt is matched: a full re-process
        got = lcp_ask(self.ll, llm, lcp_step(prompt, n), lambda p, n_vocab: _top(
            np.ctypeslib.as_array(p, shape=(n_vocab,)), k))
        ids, tops, text = got["ids"], got["tops"], got["text"]
        eog = got["finish"] == "stop" and len(ids) < max(n, 1)
        if n == 0:  # max_tokens 0 asks for the rest of the context: a primer samples one, kept unsaid
            ids, tops, text, eog = [], [], "", False
        tokens = got["prompt"]
        reused = 0 if reference else got["reused"]
        return Completion(tokens, ids, text, tops, reused, len(tokens) - reused, ends_with_eog=eog,
                          inexact="llama-cpp-python: the reference processes each prompt in full, in batches of its "
                                  "own")

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return [int(t) for t in self.ref.tokenize(text.encode(), add_bos=add_special, special=True)]

    def detokenize(self, tokens: list[int]) -> list[str]:
        return [self.ref.detokenize([t], special=True).decode(errors="replace") for t in tokens]


class LcpEngine:
    """The Engine interface over a Session in a worker of its own (an abort of llama.cpp ends only it)."""

    def __init__(self, path: str, name: str, info: EngineInfo, version: str, cache: str = "ram",
                 timeout: float = 900.0, site: str | None = None):
        self.asked, self.cache = version, cache  # the release asked for (the replay asks for it again)
        self.recording: list[dict] | None = None  # `cachecheck repro`: every subject request, as lcp_ask sends it
        self.settings = SessionSettings()
        self.worker = Worker("llama_cachecheck.engines.lcp:Session", (path, cache, rundir.directory("lcp-cache", name)),
                             name=name, timeout=timeout, env={SITE: site} if site else None)
        version = self.worker.call("info")["version"]  # what the bindings imported say they are
        self.info = dataclasses.replace(info, engine="llama-cpp-python", model=name, profile="",
                                        llama_cpp=f"llama-cpp-python {version} (Llama, cache {cache})",
                                        reuse_design="prefix-match")

    def replay_args(self) -> list[str]:
        return ["--engine", "llama-cpp-python", "--lcp-version", self.asked, "--lcp-cache", self.cache]

    def subject_command(self) -> str:
        return ""

    def start_session(self, settings: SessionSettings) -> SessionSettings:
        needs = settings_set(settings)
        self.settings = settings
        if needs:
            raise Unsupported(f"llama-cpp-python's Llama serves one prompt at a time with no server settings; the "
                              f"scenario sets {', '.join(needs)}")
        try:
            self.worker.call("start_session", settings)
        except EngineError as e:
            if "engine process died" not in str(e):
                raise
            # an abort while making the context, before any prompt: the release cannot run this model at all (an
            # older llama.cpp than the architecture's form in the file), which says nothing of its cache
            where = re.findall(r"[\w.-]+\.(?:c|cpp|h):\d+: [^|]*", str(e))
            raise ModelUnsupported(f"{self.info.llama_cpp.split(' (')[0]} cannot run this model: it aborts making a "
                                   f"context ({(where[-1] if where else str(e)[-200:]).strip()})") from None
        return settings

    def complete(self, prompt: Prompt, n_predict: int, top_k: int, id_slot: int | None = None) -> Completion:
        if id_slot is not None:
            raise Unsupported("llama-cpp-python's Llama has no slots to pin a request to")
        if prompt.template_vars:
            raise Unsupported("llama-cpp-python's create_chat_completion passes no variables to the chat template")
        if self.recording is not None:
            self.recording.append(lcp_step(prompt, n_predict))
        return self.worker.call("complete", prompt, n_predict, top_k, False)

    def complete_parallel(self, requests: list[tuple[Prompt, int, int, int | None]]) -> list[Completion]:
        raise Unsupported("llama-cpp-python's Llama serves one prompt at a time (no parallel requests)")

    def slot_action(self, action: str, file: str | None, id_slot: int) -> int:
        raise Unsupported("slot: steps need llama-server's /slots (--engine server)")

    def reference(self, prompt: Prompt, n_predict: int, top_k: int, held: list[int] | None = None) -> Completion:
        return self.worker.call("complete", prompt, n_predict, top_k, True)

    def score(self, prompt: Prompt, tokens: list[int], top_k: int) -> None:
        return None

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.worker.call("tokenize", text, add_special)

    def detokenize(self, tokens: list[int]) -> list[str]:
        return self.worker.call("detokenize", tokens)

    def close(self) -> None:
        self.worker.close()
