"""Any OpenAI-compatible server as the subject (vLLM, SGLang, Ollama, llama-server, llama_cpp.server): its
prefix cache is judged from outside, through /v1/chat/completions alone.

The reference is a second instance of the same server with its cache off (`--reference-url`): a request
that turns the cache off on the subject's own server (llama-server's `cache_prompt: false`) would be
processed in one of its slots and leave that slot holding a fresh computation, so the subject's own
cache history would never be what the next request meets. Every reference reply must say it reused
nothing, where the server reports reuse. The API names tokens by their text, not ids: each text gets an
id of ours, the same on both sides, so the comparison reads them as any engine's tokens.

A prompt's tokens are not known either (no tokenizer of the API): a prompt is its messages, one
pseudo-token each, so "this prompt continues the last one" is a common prefix as for token ids. That is
what the engagement guard needs: where a prompt continues its conversation, a prefix cache must reuse
something, and a server that reports `usage.prompt_tokens_details.cached_tokens` of 0 there has a cache
that is not engaged (LOST-REUSE), so a run cannot pass on a server whose cache never hit.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import requests

from .base import (
    SERVER_SETTINGS,
    Completion,
    EngineError,
    EngineInfo,
    Prompt,
    Refused,
    SessionSettings,
    TopK,
    Unsupported,
    settings_set,
)

NOT_REPORTED = -1  # n_reused of a server that does not say what it reused
BREAKER = "cachecheck: a prompt that shares nothing with the next"


class OpenAIServer:
    """One OpenAI-compatible endpoint: requests, and errors that name it and what it said."""

    def __init__(self, url: str, name: str, timeout: float = 300.0):
        self.url, self.name, self.timeout = url.rstrip("/"), name, timeout
        self.http = requests.Session()
        self.http.trust_env = True  # someone else's server may sit behind the user's proxy

    def get(self, path: str) -> dict:
        return self._call("GET", path, None)

    def post(self, path: str, body: dict) -> dict:
        return self._call("POST", path, body)

    def _call(self, method: str, path: str, body: dict | None) -> dict:
        try:
            r = self.http.request(method, f"{self.url}{path}", json=body, timeout=self.timeout)
        except requests.RequestException as e:
            raise EngineError(f"{self.name} {path}: {type(e).__name__}") from None
        if r.status_code != 200:
            error = Refused if 400 <= r.status_code < 500 else EngineError
            raise error(f"{self.name} {path} answered {r.status_code}: {r.text[:300]}")
        try:
            doc = r.json()
        except ValueError:
            raise EngineError(f"{self.name} {path}: the answer is not JSON: {r.text[:120]!r}") from None
        if not isinstance(doc, dict):
            raise EngineError(f"{self.name} {path}: the answer is not a JSON object: {r.text[:120]!r}")
        return doc

    def close(self) -> None:
        self.http.close()


def served_models(server: OpenAIServer) -> list[str]:
    """What /v1/models lists; EngineError where the answer is not an OpenAI model list."""
    doc = server.get("/v1/models")
    data = doc.get("data")
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
        raise EngineError(f"{server.name} /v1/models: not an OpenAI model list (no data[].id)")
    return [m["id"] for m in data]


def _cached(said: dict) -> int:
    """The reuse a reply reports: OpenAI's usage.prompt_tokens_details.cached_tokens, else llama-server's
    timings.cache_n, else NOT_REPORTED."""
    details = (said.get("usage") or {}).get("prompt_tokens_details") or {}
    for value in (details.get("cached_tokens"), (said.get("timings") or {}).get("cache_n")):
        if isinstance(value, int):
            return value
    return NOT_REPORTED


class OpenAIEngine:
    """The Engine interface over two OpenAI-compatible servers (subject with its cache, reference without)."""

    def __init__(self, url: str, reference_url: str, model_name: str, info: EngineInfo):
        self.model_name = model_name
        self.subject = OpenAIServer(url, f"subject {url}")
        self.ref = OpenAIServer(reference_url, f"reference {reference_url}")
        self.info = info
        self.ref_reports = False  # whether the reference says what it reused (until it has, it is not trusted)
        self.ids: dict[str, int] = {}  # token text -> our id, the same on both sides
        self.pieces: dict[int, str] = {}

    def replay_args(self) -> list[str]:
        return ["--engine", "openai", "--url", self.subject.url, "--reference-url", self.ref.url,
                "--model-name", self.model_name]

    def subject_command(self) -> str:
        return f"(OpenAI-compatible server at {self.subject.url}: its own command line)"

    def start_session(self, settings: SessionSettings) -> SessionSettings:
        """The servers run with their own settings: a scenario that needs others of a server (slots, host
        cache, speculation, cache reuse) cannot be played on them."""
        needs = settings_set(settings, (*SERVER_SETTINGS, "swa_full"))
        if needs:
            raise Unsupported(f"an OpenAI-compatible server runs with its own settings; the scenario sets "
                              f"{', '.join(needs)}")
        return settings

    def _id(self, text: str) -> int:
        if text not in self.ids:
            self.ids[text] = len(self.ids)
            self.pieces[self.ids[text]] = text
        return self.ids[text]

    def _request(self, server: OpenAIServer, prompt: Prompt, n_predict: int, k: int, cache: bool) -> Completion:
        if prompt.messages is None:
            raise Unsupported("raw-token scenarios need token ids, which the OpenAI chat API does not take")
        asked, n_predict = n_predict, max(n_predict, 1)  # a primer (0) asks for one token, kept unsaid: 0 is refused
        body = {"model": self.model_name, "messages": prompt.message_dicts(), "max_tokens": n_predict,
                "temperature": 0.0, "seed": 0, "logprobs": True, "top_logprobs": k, **prompt.chat_options()}
        if not cache:
            body["cache_prompt"] = False  # llama-server's own switch; other servers ignore a field they lack
        said = server.post("/v1/chat/completions", body)
        try:
            choice = said["choices"][0]
            content = (choice.get("logprobs") or {}).get("content") or []
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise EngineError(f"{server.name}: not an OpenAI chat completion: {json.dumps(said)[:200]}") from None
        if text and not content and k:  # compared token by token: a reply without them could only pass unseen
            raise EngineError(f"{server.name}: the reply has text but no logprobs (asked for logprobs and "
                              f"top_logprobs {k}); cachecheck compares token by token")
        out = [self._id(p["token"]) for p in content]
        top: list[TopK] = [[(self._id(t["token"]), float(t["logprob"])) for t in p.get("top_logprobs") or ()]
                           for p in content]
        reused = _cached(said)
        if not cache and reused > 0:
            raise EngineError(f"{server.name} reused {reused} cached prompt tokens: the reference must run with its "
                              f"cache off (start that instance with its prefix cache disabled)")
        eog = choice.get("finish_reason") == "stop" and len(out) < n_predict
        if asked == 0:
            out, top, text, eog = [], [], "", False
        inexact = "an OpenAI-compatible server, compared by token text and the logprobs it returns"
        if reused == NOT_REPORTED:
            inexact += "; it reports no cached tokens, so its reuse is not judged"
        n_prompt = int((said.get("usage") or {}).get("prompt_tokens") or 0)
        reported = reused != NOT_REPORTED
        return Completion(_pseudo_tokens(prompt), out, text, top, max(reused, 0), n_prompt - max(reused, 0),
                          ends_with_eog=eog, inexact=inexact, reuse_reported=reported, n_prompt=n_prompt)

    def complete(self, prompt: Prompt, n_predict: int, top_k: int, id_slot: int | None = None) -> Completion:
        if id_slot is not None:
            raise Unsupported("an OpenAI-compatible server has no slots to pin a request to")
        return self._request(self.subject, prompt, n_predict, top_k, cache=True)

    def complete_parallel(self, requests: list[tuple[Prompt, int, int, int | None]]) -> list[Completion]:
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            return list(pool.map(lambda r: self.complete(*r), requests))

    def slot_action(self, action: str, file: str | None, id_slot: int) -> int:
        raise Unsupported("slot: steps need llama-server's /slots (--engine server)")

    def reference(self, prompt: Prompt, n_predict: int, top_k: int, held: list[int] | None = None) -> Completion:
        if not self.ref_reports:
            # it says nothing of its reuse, and may keep the last prompt whatever it is told (llama_cpp.server
            # always matches the prefix of its one context): a prompt that shares nothing takes its place first
            self._request(self.ref, Prompt(messages=(("user", BREAKER),)), 1, 0, cache=False)
        done = self._request(self.ref, prompt, n_predict, top_k, cache=False)
        self.ref_reports = done.reuse_reported
        if not done.reuse_reported:
            done.inexact += ("; the reference says nothing of its reuse: each of its prompts follows one that "
                             "shares nothing with it")
        return done

    def score(self, prompt: Prompt, tokens: list[int], top_k: int) -> None:
        return None  # no prompt logprobs in the chat API: no teacher forcing

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        raise Unsupported("raw-token scenarios need a tokenizer, which the OpenAI API does not have")

    def detokenize(self, tokens: list[int]) -> list[str]:
        return [self.pieces.get(t, "?") for t in tokens]

    def close(self) -> None:
        self.subject.close()
        self.ref.close()


def _pseudo_tokens(prompt: Prompt) -> list[int]:
    """A chat prompt as pseudo-tokens (stable hashes), so that prefixes compare as its parts: first what the
    template renders before any message (the tools, its variables: a date line changes the top), then one
    per message."""
    parts = [[prompt.tools, prompt.template_vars], *(list(m) for m in prompt.messages or ())]
    return [int.from_bytes(hashlib.blake2b(json.dumps(p).encode(), digest_size=4).digest(), "big") for p in parts]
