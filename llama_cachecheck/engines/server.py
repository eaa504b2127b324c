"""The real llama-server under test: two processes of ours (server_process.py) behind the Engine interface.

Subject: a server with its prompt cache and context checkpoints on, every request pinned to
slot 0 with `cache_prompt: true` — chat steps through /v1/chat/completions (the server's own
chat template and message-span checkpoints), raw-token steps through /completion. Reference:
a second server process, every request with `cache_prompt: false`, so a full re-process can
never disturb the subject's slot. The server cannot score given tokens (no prompt logprobs),
so there is no teacher forcing: generated tokens' logprobs are compared up to the divergence.
Cache events come from the subject's log (-lv 4), parsed into the in-process timeline's form.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from .. import rundir
from ..compare import shifts_chunks
from ..noise import Noise
from . import noise_floor
from .base import (
    Completion,
    EngineError,
    EngineInfo,
    Prompt,
    SessionSettings,
    TopK,
    Unsupported,
    damage,
)
from .capabilities import (
    Capabilities,
    check_server_args,
    effective_settings,
    matched_flags,
    probe,
    reference_flags,
    server_flags,
    without_overridden,
)
from .matched import MatchedReference, Plan, SubjectMemory
from .rendering import Rendering
from .server_log import parse_events, split_by_task
from .server_process import AttachedServer, ServerProcess, attached_said

# a scenario's plain and matched references, and the last scenario's (flags of another batch size or context)
REFERENCES_KEPT = 4


def _as_written(probs: list[dict], n: int, eog: bool, content: str) -> str:
    """A chat reply as the model wrote it, from its tokens' bytes. The server's reply parser trims the
    content where the template knows tools or reasoning, and puts back a <think> the prompt opened; the
    client we play keeps what was written, as in-process, so both engines send the same next prompt. The
    content as parsed where the bytes are not all there (a token the list leaves out, inside a character
    cut in two, leaves them invalid UTF-8)."""
    written = probs[:n - 1] if eog else probs[:n]
    if len(probs) < n or any("bytes" not in p for p in written):
        return content
    try:
        return b"".join(bytes(p["bytes"]) for p in written).decode("utf-8")
    except UnicodeDecodeError:
        return content


class ServerEngine:
    """The Engine interface over two llama-server processes (subject with cache, reference without)."""

    def __init__(self, binary: str, path: str, name: str, info: EngineInfo, request_timeout: float = 300.0, *,
                 server_url: str | None = None, reference_bin: str | None = None, profile: str = "deployed",
                 server_args: str = ""):
        self.binary, self.path, self.name, self.server_url = binary, path, name, server_url
        # the reference may be another build (master, a PR's base): "does my PR change what the cache gives?"
        self.reference_bin = reference_bin
        self.caps: Capabilities = probe(binary)
        self.ref_caps: Capabilities = probe(reference_bin) if reference_bin else self.caps
        self.profile, self.server_args = profile, server_args
        self.user_flags, self.user_settings = check_server_args(self.caps, server_args)  # BadServerArgs
        build = f"llama-server {self.caps.version} ({binary})"
        reference = f"llama-server {self.ref_caps.version} ({reference_bin or binary})"
        if server_url:  # the reference is ours: --reference-bin's build, else --server-bin's
            build = f"llama-server at {server_url} ({attached_said(server_url)}); reference {reference}"
        elif reference_bin:
            build = f"subject {build}; reference {reference}"
        self.info = dataclasses.replace(info, engine="server", model=name, path=path, llama_cpp=build,
                                        # an attached server is judged as one its users started with the build's
                                        # defaults: what the reference takes for it (attached_said)
                                        profile="server-deployed" if server_url else f"server-{profile}")
        self.timeout = request_timeout
        self.settings: SessionSettings | None = None
        self.subject: ServerProcess | None = None
        self.ref: ServerProcess | None = None
        # references by their flags, the last few kept: scenarios alternate between a handful of
        # contexts and batch sizes, and a reference (stateless, caching off) serves any number of them
        self.refs: dict[tuple[str, ...], ServerProcess] = {}
        self.slot_dir: str | None = None
        self.subject_flags: list[str] = []  # the subject's command line as we made it (without its slot directory)
        self.ref_flags: list[str] = []  # the reference's, for the scenario being played
        self.resets = 0  # subjects emptied in place instead of restarted
        self.pieces: dict[int, str] = {}  # token -> its text, one model's vocabulary as met
        self.clock: collections.Counter = collections.Counter()  # where the time goes, for benchmarks/
        # the subject's renderings of the latest chat prompts, the reference's too: one build, our template
        # flags on both, renders alike (another --reference-bin, or an attached server, renders its own)
        self.shared_rendering = reference_bin is None and not server_url
        self.rendered: dict[str, list[int]] = {}
        self.rendering = Rendering(self.info.builtin_template)  # an own rendering of the subject's, checked once
        # cache_reuse on memory that shifts: a reference that shifts cached chunks too (see reference())
        # what the subject was sent, in order, where a reproducer is being made (repro.py): None otherwise
        self.recording: list[dict] | None = None
        self._block: int | None = None  # the parallel block being sent (its requests go at once)
        self.shifting_flags: list[str] | None = None
        self.shifting_held: list[int] | None = None  # what its one slot holds
        # the subject's batches, followed from its log per slot, for a reference that repeats them (matched.py)
        self.memory = SubjectMemory(info.n_swa)
        self.matched_flags: list[str] | None = None  # None: this scenario's replies cannot be matched
        self.matched_dir: str | None = None  # the matched reference's --slot-save-path: only ever erased
        # for the subject's latest reply: its plan (or why none), and the prompt it is for
        self.plan: tuple[Plan | None, str, list[int]] = (None, "", [])
        self.matched: tuple[ServerProcess, MatchedReference] | None = None  # the process whose slot it rebuilds

    def replay_args(self) -> list[str]:
        args = ["--engine", "server", "--server-bin", str(self.binary)]
        if self.server_url:  # the server under test, and the build of our reference
            args += ["--server-url", self.server_url]
        if self.reference_bin:
            args += ["--reference-bin", str(self.reference_bin)]
        args += ["--server-profile", self.profile]
        if self.server_args:
            args += ["--server-args", self.server_args]
        return args

    def subject_command(self) -> str:
        if self.server_url:
            return f"(attached at {self.server_url}: its own command line)"
        return shlex.join(self.subject.command) if self.subject is not None and self.subject.command else ""

    def start_session(self, settings: SessionSettings) -> SessionSettings:
        """Every scenario starts on an empty subject: no cache survives from the last one. Emptied in
        place where that is verifiably what a fresh process gives (see `_reset_in_place`), restarted
        otherwise. The reference keeps nothing between requests (every cache off, each prompt
        processed in full), so it serves every scenario of the model that starts it with its flags.

        Returns what the subject runs with (the profile's and the user's flags applied)."""
        template = self.info.builtin_template
        # Unsupported: the scenario is skipped
        ours = server_flags(self.caps, settings, True, template, profile=self.profile)
        subject_flags = without_overridden(self.caps, ours, self.user_flags) + self.user_flags
        effective = settings if self.server_url else \
            effective_settings(self.caps, settings, self.profile, self.user_settings)
        # an attached server's batch sizes and kernels cannot be read (attached_said): its build's defaults
        computes = effective_settings(self.caps, settings, "deployed", {}) if self.server_url else effective
        ref_flags = reference_flags(self.ref_caps, computes, template, "deployed" if self.server_url else self.profile,
                                    subject=self.caps, user=self.user_flags)
        self.ref_flags = ref_flags  # what the reference runs with, for a reproducer (repro.py)
        self.memory, self.plan = SubjectMemory(self.info.n_swa), (None, "", [])
        self.matched_flags = self._matched_flags(ref_flags, settings)
        self.shifting_flags, self.shifting_held = self._shifting_flags(settings, template), None
        if self._reset_in_place(subject_flags, effective):
            self.settings = dataclasses.replace(effective, n_parallel=1)
            try:
                self.ref = self._reference_server(ref_flags)
            except EngineError:
                self.close()
                raise
            return self.settings
        self.close_subject()
        self.subject_flags = subject_flags
        if "--slot-save-path" in self.caps.options:  # slot: save / restore steps write their files there
            self.slot_dir = rundir.directory("slots", self.name)
            subject_flags = subject_flags + ["--slot-save-path", self.slot_dir]
        self.settings = effective
        self.subject = AttachedServer(self.server_url, f"{self.name} subject server", self.clock) \
            if self.server_url else \
            ServerProcess(self.binary, self.path, subject_flags, f"{self.name} subject server", clock=self.clock)
        try:
            self.subject.start()
            self.ref = self._reference_server(ref_flags)
        except (EngineError, Unsupported):
            self.close()
            raise
        started = "\n".join(self.subject.new_log_lines())
        slots = re.search(r"initializing, n_slots = (\d+)", started)  # `-np` auto: what the build made of it
        if slots:  # and with `-np auto` its KV cache unified (SessionSettings.unified_kv), said before it is lost
            self.settings = dataclasses.replace(self.settings, n_parallel=int(slots.group(1)),
                                                kv_unified=self.settings.unified_kv)
        return self.settings

    def _matched_flags(self, ref_flags: list[str], settings: SessionSettings) -> list[str] | None:
        """None where the subject's batches cannot be followed or repeated: an attached server (no log), drafts
        (verify batches the reference cannot make)."""
        if self.server_url or settings.speculative is not None:
            return None
        if self.matched_dir is None:
            self.matched_dir = rundir.directory("slots", f"{self.name}-matched-reference")
        return matched_flags(self.ref_caps, ref_flags, self.info.n_swa, self.matched_dir)

    def _shifting_flags(self, settings: SessionSettings, template: str | None) -> list[str] | None:
        """The shifting reference's command line: one slot, no host cache, no draft, the scenario's
        cache_reuse, the reference's build; None where the design shifts nothing (no cache_reuse, or
        memory that does not shift them, compare.shifts_chunks)."""
        if not settings.cache_reuse or not shifts_chunks(self.info.memory):
            return None
        alone = dataclasses.replace(settings, n_parallel=None, kv_unified=None, cache_ram=0, cache_idle_slots=None,
                                    slot_prompt_similarity=None, speculative=None)
        return server_flags(self.ref_caps, alone, True, template, profile="isolated")

    def _reset_in_place(self, flags: list[str], settings: SessionSettings) -> bool:
        """Empty the last scenario's subject instead of starting another, where the build lets us verify
        that this is what a fresh process gives: the same command line, one slot (several remember which
        was used last, and choose by it), no host-memory prompt cache (no endpoint of any build empties
        it, so with one on, the default, every scenario gets a new process), no draft model (its own
        context). The slot is erased (its tokens, its memory and, in builds that keep them in the
        prompt, its checkpoints; a checkpoint an older build left behind is past position 0 and goes
        with the next prompt's processing) and /slots must then say it holds no token."""
        subject = self.subject
        if (subject is None or self.server_url or subject.proc is None or subject.proc.poll() is not None
                or flags != self.subject_flags or self.slot_dir is None or settings.cache_ram != 0
                or self.settings is None or self.settings.n_parallel != 1 or settings.speculative is not None):
            return False
        t0 = time.perf_counter()
        try:
            subject.post("/slots/0?action=erase", {}, 10.0)
            slots = subject.http.get(f"{subject.url}/slots", timeout=10.0).json()
        except (EngineError, requests.RequestException, ValueError):
            return False
        finally:
            self.clock["reset (/slots erase, ours)"] += time.perf_counter() - t0
        if not isinstance(slots, list) or [s.get("n_prompt_tokens") for s in slots if isinstance(s, dict)] != [0]:
            return False  # a build whose /slots does not say so cannot be verified: restart
        for f in Path(self.slot_dir).iterdir():  # the last scenario's slot files are not this one's
            f.unlink()
        subject.new_log_lines()  # what the reset logged is not the next request's
        self.resets += 1
        return True

    def _request(self, server: ServerProcess, prompt: Prompt, n_predict: int, k: int, cache: bool,
                 id_slot: int | None = None) -> Completion:
        if id_slot is None:  # the server chooses, as for its users (a pinned request takes another path in some
            # builds: b9093 skips the host cache for it); the reference and an attached server of unknown slots: 0
            id_slot = 0 if not cache or self.server_url else -1
        common = {"temperature": 0.0, "cache_prompt": cache, "id_slot": id_slot, "seed": 0}
        said = ""
        if prompt.tokens is not None:
            tokens = list(prompt.tokens)
            path, payload = "/completion", {**common, "prompt": tokens, "n_predict": n_predict, "n_probs": k,
                                            "return_tokens": True}
        else:
            chat = self._chat_body(prompt)
            tokens = self._chat_tokens(server, chat)
            # an agent-loop prompt asks for the reply unparsed (reasoning_format none): the scenario says what of
            # it was reasoning; the conversation takes the reply as written either way (_as_written)
            path, payload = "/v1/chat/completions", {**common, **chat, "max_tokens": n_predict, "logprobs": True,
                                                     "top_logprobs": k}
        if server is self.subject and self.recording is not None:
            self.recording.append({"path": path, "body": payload, "tokens": tokens, "block": self._block})
        body = server.post(path, payload, self.timeout)
        if prompt.tokens is not None:
            probs = body.get("completion_probabilities", [])
            text = body.get("content", "")
        else:
            choice = body["choices"][0]
            probs = (choice.get("logprobs") or {}).get("content") or []
            text = choice["message"].get("content") or ""
        # /completion returns the generated ids; its probabilities skip a token now and then (one
        # that ends inside a multi-byte character), so align them to the ids, leaving gaps empty
        out = body.get("tokens") or [p["id"] for p in probs]
        self._learn_pieces(probs)
        top: list[TopK] = []
        j = 0
        for tok in out:
            if j < len(probs) and probs[j]["id"] == tok:
                top.append([(t["id"], float(t["logprob"])) for t in probs[j]["top_logprobs"]])
                j += 1
            else:
                top.append([])
        if cache and self.settings.speculative is not None and k > 0:
            # drafted tokens come back without probabilities in some builds (logprob 0.0, no top-k):
            # those positions are compared by token alone, and the report says so
            blind = sum(1 for p in probs if not p.get("top_logprobs"))
            if blind:
                said = (f"; speculative decoding: the server reported no probabilities for {blind} of "
                        f"{len(out)} tokens (drafted ones), compared by token only")
        t = body.get("timings", {})
        # as in-process: a reply that ended on end-of-generation does not put that token in the conversation
        eog = body.get("stop_type") == "eos" or bool(body.get("stopped_eos")) or \
            (prompt.tokens is None and body["choices"][0].get("finish_reason") == "stop" and len(out) < n_predict)
        if prompt.tokens is None:
            text = _as_written(probs, len(out), eog, text)
        return Completion(tokens, out, text, top, int(t.get("cache_n", 0)), int(t.get("prompt_n", len(tokens))),
                          ends_with_eog=eog, inexact="llama-server batches a prompt its own way; that cannot be "
                                                    "replayed from outside" + said,
                          slot=body.get("id_slot") if isinstance(body.get("id_slot"), int) else None)

    def _learn_pieces(self, probs: list[dict]) -> None:
        """Every token a reply names comes with its piece's bytes (what /detokenize of it would say):
        kept, so the report's texts cost no request per token."""
        for p in probs:
            for t in (p, *p.get("top_logprobs", ())):
                if "bytes" in t and t["id"] not in self.pieces:
                    self.pieces[t["id"]] = bytes(t["bytes"]).decode(errors="replace")

    @staticmethod
    def _chat_body(prompt: Prompt) -> dict:
        """A chat prompt in OpenAI's words; an agent-loop one also asks for the reply as written."""
        options = prompt.chat_options()
        if options or any(len(m) > 2 for m in prompt.messages or ()):
            options["reasoning_format"] = "none"
        return {"messages": prompt.message_dicts(), **options}

    def _chat_tokens(self, server: ServerProcess, body: dict) -> list[int]:
        """A chat prompt as `server` renders and tokenizes it; the subject's renderings of the latest prompts are
        kept (a regeneration's, and the reference's: it processes the subject's tokens, never its own)."""
        key = json.dumps(body, sort_keys=True)
        if key in self.rendered and (server is self.subject or self.shared_rendering):
            return self.rendered[key]
        text = server.post("/apply-template", body, self.timeout)["prompt"]
        tokens = server.post("/tokenize", {"content": text, "add_special": True, "parse_special": True},
                             self.timeout)["tokens"]
        if server is self.subject:
            if len(self.rendered) > 64:  # a parallel block's worth, and a scenario's latest prompts
                self.rendered.clear()
            self.rendered[key] = tokens
        return tokens

    def _rendered_reference(self, prompt: Prompt, n_predict: int, top_k: int) -> Completion:
        """A subject that renders chats its own way (an attached server, another --reference-bin): the reference
        processes the token ids the subject's rendering gave (DESIGN 4: same tokens in), through /completion;
        where that rendering is not the model's template as we render it, the run says so once."""
        chat = self._chat_body(prompt)
        tokens = self._chat_tokens(self.subject, chat)
        said = self.rendering.check(chat, tokens, lambda: self._chat_tokens(self.ref, chat))
        done = self._request(self.ref, Prompt(tokens=tuple(tokens)), n_predict, top_k, cache=False)
        done.inexact += "; the reference processed the subject's own rendering of the chat" + (f" ({said})" if said
                                                                                              else "")
        return done

    def complete(self, prompt: Prompt, n_predict: int, top_k: int, id_slot: int | None = None) -> Completion:
        c = self._request(self.subject, prompt, n_predict, top_k, cache=True, id_slot=id_slot)
        t0 = time.perf_counter()
        lines = self.subject.new_log_lines(until="stop processing")
        c.events = parse_events(lines)
        tasks = list(split_by_task(lines).values())
        if c.slot is None:  # the chat API does not say which slot served it; the log does
            c.slot = next((t.slot for t in tasks), None)
        self.plan = (None, "the subject's batches are not followed for this scenario", [])
        if self.matched_flags is not None and len(tasks) == 1 and c.slot is not None:
            self.plan = (*self.memory.follow(lines, c.slot, c.prompt_tokens, c.tokens), c.prompt_tokens)
        self.clock["log: waiting for and parsing (ours)"] += time.perf_counter() - t0
        return c

    def complete_parallel(self, requests: list[tuple[Prompt, int, int, int | None]]) -> list[Completion]:
        """All at once from threads of ours; each reply's events are its slot's log lines."""
        self._block = (self._block or 0) + 1 if self.recording is not None else None  # sent at once, recorded so
        self.memory.forget()  # batches of several slots at once: shapes no reference repeats
        self.plan = (None, "requests sent at once are batched together", [])
        try:
            with ThreadPoolExecutor(max_workers=len(requests)) as pool:
                futures = [pool.submit(self._request, self.subject, p, n, k, True, slot) for p, n, k, slot in requests]
                done = [f.result() for f in futures]
        finally:
            self._block = None
        tasks = split_by_task(self.subject.new_log_lines(until="stop processing", count=len(requests)))
        for c in done:  # a reply's task: the one whose prompt had its length (and ran on its slot, where known)
            mine = [(rank, t) for rank, t in enumerate(tasks.values())  # in the order the log first names them
                    if t.n_tokens == len(c.prompt_tokens) and c.slot in (None, t.slot)]
            if len(mine) == 1:
                (c.order, task), = mine
                c.slot, c.events = task.slot, parse_events(task.lines)
            else:  # two prompts of one length: their events cannot be told apart, so none is judged
                c.events = []
                c.inexact += "; its cache events could not be told from another request's of the same length"
        return done

    def slot_action(self, action: str, file: str | None, id_slot: int) -> int:
        """Through /slots (the subject was started with --slot-save-path in a directory of ours)."""
        if self.server_url:
            raise Unsupported("slot: steps need a llama-server we start (its files go in a directory of ours)")
        if self.slot_dir is None:
            raise Unsupported(f"llama-server {self.caps.version} has no --slot-save-path")
        body = {"filename": file} if file else {}
        if self.recording is not None:
            self.recording.append({"damage": file} if action == "damage" else
                                  {"path": f"/slots/{id_slot}?action={action}", "body": body})
        if action == "damage":
            return damage(Path(self.slot_dir) / file)
        if action != "save":  # erased, or loaded from a file: cells the log does not follow
            self.memory.forget(id_slot)
        said = self.subject.post(f"/slots/{id_slot}?action={action}", body, self.timeout)
        self.subject.new_log_lines()  # what the action logged is not the next request's
        return int(said.get({"save": "n_saved", "restore": "n_restored", "erase": "n_erased"}[action], -1))

    def _reference_server(self, flags: list[str]) -> ServerProcess:
        key = tuple(flags)
        ref = self.refs.pop(key, None)
        if ref is not None and (ref.proc is None or ref.proc.poll() is not None):
            ref.close()
            ref = None
        if ref is None:
            while len(self.refs) >= REFERENCES_KEPT:
                self.refs.pop(next(iter(self.refs))).close()
            ref = ServerProcess(self.reference_bin or self.binary, self.path, flags,
                                f"{self.name} reference server", clock=self.clock)
            ref.start()
        self.refs[key] = ref  # the most recently used last
        return ref

    def reference(self, prompt: Prompt, n_predict: int, top_k: int, held: list[int] | None = None) -> Completion:
        if not held or self.shifting_flags is None:
            plan, why, planned = self.plan
            if plan is not None:
                done, why = self._matched_reference(plan, planned, prompt, n_predict, top_k)
                if done is not None:
                    return done
            if prompt.tokens is None and not self.shared_rendering:
                done = self._rendered_reference(prompt, n_predict, top_k)
            else:
                done = self._request(self.ref, prompt, n_predict, top_k, cache=False)
            done.inexact += f"; not matched: {why}" if why else ""
            if not self.server_url:  # its own batches; with other slots, their cells too, and a window's ring of
                # another size (a unified cache keeps the window for every slot)
                shared = (self.settings.n_parallel or 1) > 1
                done.arrangement = ("batches",) + (("cells",) if shared else ()) + \
                    (("window",) if shared and self.info.n_swa else ())
            return done
        # cache_reuse: the subject shifted chunks of `held` into place, so the answer is what they give. The
        # shifting reference gets `held` processed afresh (unless it holds it already: a conversation's turns
        # in a row keep its chunks as they were shifted), then the prompt; the same chunks move. Its build
        # shifts them its own way: a subject that moves them elsewhere, or keeps what it should not, differs.
        ref = self._reference_server(self.shifting_flags)
        afresh = self.shifting_held != held
        if afresh:  # uncached: its slot drops what it held and processes `held` in full
            self._request(ref, Prompt(tokens=tuple(held)), 1, 0, cache=False)
        done = self._request(ref, prompt, n_predict, top_k, cache=True, id_slot=0)
        self.shifting_held = done.prompt_tokens + done.tokens[:-1]
        done.inexact += (f"; cache_reuse {self.settings.cache_reuse}: the reference shifted the same chunks, from the "
                         + (f"slot's {len(held)} tokens processed afresh" if afresh else
                            "conversation's earlier turns as it played them"))
        return done

    def _matched_reference(self, plan: Plan, planned: list[int], prompt: Prompt, n_predict: int,
                           top_k: int) -> tuple[Completion | None, str]:
        """The subject's latest prompt on a reference that first rebuilt the subject's memory in its calls
        (matched.py). (None, why) where it could not."""
        tokens = self._chat_tokens(self.subject, self._chat_body(prompt)) if prompt.tokens is None \
            else list(prompt.tokens)
        if tokens != planned:
            return None, "the reference was asked for another prompt than the subject's latest"
        ref = self._reference_server(self.matched_flags)
        if self.matched is None or self.matched[0] is not ref:  # a new process: its slot holds nothing
            self.matched = ref, MatchedReference(
                lambda body, n, k: self._request(ref, Prompt(tokens=tuple(body)), n, k, cache=True, id_slot=0),
                lambda: ref.post("/slots/0?action=erase", {}, self.timeout),
                trims=self.info.memory in ("attention", "swa"), n_vocab=self.info.n_vocab)
        return self.matched[1].answer(plan, tokens, n_predict, top_k)

    def noise_floor(self, settings: SessionSettings | None = None) -> dict[str, Noise]:
        return noise_floor.measure(self, settings)

    def score(self, prompt: Prompt, tokens: list[int], top_k: int) -> None:
        return None  # llama-server has no prompt logprobs: no teacher forcing

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.ref.post("/tokenize", {"content": text, "add_special": add_special, "parse_special": True},
                             self.timeout)["tokens"]

    def detokenize(self, tokens: list[int]) -> list[str]:
        for t in dict.fromkeys(tokens):  # each token of the vocabulary asked once
            if t not in self.pieces:
                self.pieces[t] = self.ref.post("/detokenize", {"tokens": [t]}, self.timeout)["content"]
        return [self.pieces[t] for t in tokens]

    def close(self) -> None:
        # also called from the main thread on Ctrl-C while a pool thread starts a reference server:
        # take what is there, never iterate what the other thread changes
        self.close_subject()
        refs, self.refs = self.refs, {}
        for ref in list(refs.values()):
            ref.close()
        self.ref = None
        matched_dir, self.matched_dir = self.matched_dir, None
        if matched_dir is not None:
            rundir.discard(matched_dir)

    def close_subject(self) -> None:
        subject, self.subject = self.subject, None
        if subject is not None:
            subject.close()
        slot_dir, self.slot_dir = self.slot_dir, None
        if slot_dir is not None:
            rundir.discard(slot_dir)
