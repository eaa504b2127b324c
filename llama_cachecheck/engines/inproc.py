"""The bundled engine: llama.cpp in-process, subject through our checkpoint policy.

`InprocEngine` is what the runner talks to; it forwards every call to a worker process
(worker.py) that owns the model, because a GGML_ABORT inside llama.cpp must become an ERROR
row for one scenario rather than the end of the run. `Session` below is what runs in there.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .. import pins, rundir
from ..policy import PolicySettings, make_policy
from ..slots import Slot, SlotFileError, SlotPolicy, SlotSettings, make_slot_policy
from ..speculation import Verified
from .base import (
    Completion,
    EngineError,
    EngineInfo,
    Prompt,
    Refused,
    SessionSettings,
    StartError,
    TopK,
    damage,
    template_features,
)
from .lowlevel import Context, Model, check_abi, loaded_library
from .replay import Call, Recipes, RecordedMemory, Step, run_plan
from .speculating import Row, Speculating
from .worker import Worker


def distribution(logits: np.ndarray, k: int) -> tuple[int, TopK]:
    """The greedy token and the top k log-probabilities of one row of logits.

    Runs once per generated token on a whole vocabulary (262k on Gemma), so it ranks only the
    logits within 8 of the largest when at least k are there (then the top k are all among
    them; on Gemma 3 270M about a thousand are), and normalizes only the k it keeps: a
    logprob is the logit minus one constant per row, the log of a float64 sum of float32
    exponentials.
    """
    best = int(np.argmax(logits))
    m = float(logits[best])
    lse = m + float(np.log(np.exp(logits - np.float32(m)).sum(dtype=np.float64)))
    pool = np.flatnonzero(logits >= np.float32(m - 8.0)) if logits.size > 4096 else None
    if pool is not None and pool.size >= k:
        idx = pool[np.argpartition(logits[pool], -k)[-k:]] if k < pool.size else pool
    else:
        idx = np.argpartition(logits, -k)[-k:] if k < logits.size else np.arange(logits.size)
    idx = idx[np.argsort(-logits[idx], kind="stable")]
    return best, list(zip(idx.tolist(), (logits[idx].astype(np.float64) - lse).tolist(), strict=True))


CALIBRATED = "the reference chunks prompts its own way (--tolerance calibrated)"


class Session(Speculating):
    """Lives in the worker: one model, a context per subject slot (the slot policy chooses), a reference context."""

    def __init__(self, path: str, fault: str | None, replay: bool = True, files: str = ""):
        check_abi()
        self.model = Model(path)
        self.fault = fault
        self.replay = replay  # False: the reference chunks prompts its own way (the calibrated tolerance's mode)
        self.files = Path(files) if files else None  # where slot files go (a directory of the run)
        self.contexts: list[Context] = []  # one per slot, kept while the context settings stay
        self.ref: Context | None = None
        self.recipes: Recipes = {}  # the decode calls behind every saved state, shared by the slots
        self.slots: SlotPolicy | None = None
        # each prompt served: its calls, and why they cannot be bit-exact
        self._plans: dict[tuple[int, ...], tuple[list[Step] | None, str]] = {}
        self.settings: SessionSettings | None = None
        self.decode_closed = 0.0
        self._rendered: tuple[Prompt, list[int]] | None = None
        self._rows: dict[tuple[Prompt, int], list[Row]] = {}  # what reference() may reuse of the subject's
        self._pending: list[dict] = []  # events of slot actions, told with the next request
        self.requests = 0
        self.drafter = None  # the subject's drafter, where it speculates
        self._draft_models: dict[str, Model] = {}
        # each speculated reply: its tokens and the verify batches they came from; the reference's rows along it
        self._verified: dict[tuple[int, ...], tuple[list[int], list[Verified]]] = {}
        self._forced: dict[tuple[Prompt, int], tuple[list[int], list[TopK]]] = {}

    def info(self) -> dict:
        return {"arch": self.model.meta("general.architecture") or "?",
                "memory": self.model.memory_kind, "n_swa": self.model.n_swa, "n_vocab": self.model.n_vocab,
                "builtin_template": self.model.builtin_template,
                "template_features": template_features(self.model.meta("tokenizer.chat_template")),
                "ascii_only": (self.model.meta("general.name") or "").startswith("cachecheck-"),
                "libllama": loaded_library()}

    def shifts(self) -> str:
        """Whether this model's memory shifts cached positions (llama_memory_can_shift), what cache_reuse needs:
        always, "with swa_full" (an SWA cache shifts only where it is as large as the full one) or never (e.g.
        M-RoPE). Asked of a context of each kind only when a scenario needs it: making one may abort on a
        model that no scenario could play anyway."""
        for swa_full in (False, True) if self.model.n_swa else (False,):
            # the default context: a small one's SWA cache is as large as the full one, and shifts
            ctx = Context(self.model, SessionSettings(swa_full=swa_full))
            try:
                if ctx.can_shift():
                    return "with swa_full" if swa_full else "always"
            finally:
                ctx.close()
        return "never"

    def start_session(self, settings: SessionSettings) -> None:
        n_slots = settings.n_parallel or SlotSettings.n_parallel
        if self.settings is None or _context_part(self.settings) != _context_part(settings) \
                or len(self.contexts) != n_slots:
            for c in [*self.contexts, self.ref]:
                if c is not None:
                    self.decode_closed += c.decode_seconds  # the benchmark wants all of it
                    c.close()
            self.contexts = [Context(self.model, settings) for _ in range(n_slots)]
            self.ref = Context(self.model, settings)
        self.recipes.clear()
        self._rows, self._plans, self._pending = {}, {}, []
        self._verified, self._forced = {}, {}
        self.settings = settings
        self._start_drafter(settings)
        ps = PolicySettings(settings.ctx_checkpoints, settings.checkpoint_min_step, settings.n_batch,
                            settings.n_ubatch, settings.cache_reuse)
        n_swa = 0 if settings.swa_full else self.model.n_swa
        kind = "attention" if settings.swa_full and self.model.memory_kind == "swa" else self.model.memory_kind
        self.kind, self.n_swa = kind, n_swa
        slots = []
        for i, ctx in enumerate(self.contexts):
            mem = RecordedMemory(ctx, n_swa if kind == "swa" else 0, self.recipes, self._tail_ok)
            mem.clear()
            slots.append(Slot(i, make_policy(mem, kind, n_swa, ps, fault=self.fault)))
        self.slots = make_slot_policy(slots, slot_settings(settings), self.files, self.fault)

    def tokens_of(self, prompt: Prompt, n_predict: int = 0) -> list[int]:
        # subject, reference and scoring all ask for the same prompt: render the template once
        if self._rendered is None or self._rendered[0] != prompt:
            chat = prompt.chat_options()
            tokens = list(prompt.tokens) if prompt.tokens is not None else \
                self.model.render_chat(prompt.message_dicts(), chat.get("tools"), chat.get("chat_template_kwargs"))
            self._rendered = (prompt, tokens)
        tokens = list(self._rendered[1])
        if len(tokens) + n_predict > self.settings.n_ctx:
            raise EngineError(f"prompt of {len(tokens)} tokens + {n_predict} to generate does not fit "
                              f"n_ctx {self.settings.n_ctx} (raise settings.n_ctx)")
        return tokens

    def user_starts(self, prompt: Prompt, tokens: list[int]) -> tuple[int, ...]:
        """Where user messages begin: the positions of the template's user delimiter, as the server finds them."""
        if prompt.messages is None:
            return ()
        delim = self.model.user_delimiter
        n = len(delim)
        return tuple(i for i in range(len(tokens) - n + 1) if n and tokens[i:i + n] == delim)

    def complete(self, prompt: Prompt, n_predict: int, k: int, id_slot: int | None = None) -> Completion:
        return self.complete_parallel([(prompt, n_predict, k, id_slot)])[0]

    def complete_parallel(self, requests: list[tuple[Prompt, int, int, int | None]]) -> list[Completion]:
        """Requests sent at once: each takes a slot no other of them holds, in their order; one whose slot is
        taken waits until the others are done (as llama-server defers it). The slots' contexts are apart, so
        serving them one after another computes what serving them side by side does."""
        self._rows, self._plans, self._verified, self._forced = {}, {}, {}, {}
        done: list[Completion | None] = [None] * len(requests)
        waiting, busy, running = [], set(), []
        for i, (prompt, n_predict, k, id_slot) in enumerate(requests):
            tokens = self.tokens_of(prompt, n_predict)
            self._check_slot(id_slot)
            slot = self.slots.acquire(tokens, id_slot, busy)
            if slot is None:
                waiting.append(i)
                continue
            busy.add(slot.id)
            running.append(slot)
            done[i] = self._serve(slot, prompt, tokens, n_predict, k)
        for slot in running:
            self.slots.release(slot)
        for i in waiting:
            prompt, n_predict, k, id_slot = requests[i]
            tokens = self.tokens_of(prompt, n_predict)
            slot = self.slots.acquire(tokens, id_slot, set())
            done[i] = self._serve(slot, prompt, tokens, n_predict, k)
            self.slots.release(slot)
        return done

    def _check_slot(self, id_slot: int | None) -> None:
        if id_slot is not None and not 0 <= id_slot < len(self.contexts):
            raise EngineError(f"id_slot {id_slot}: the engine has {len(self.contexts)} slots (n_parallel)")

    def _serve(self, slot: Slot, prompt: Prompt, tokens: list[int], n_predict: int, k: int) -> Completion:
        events = self._pending + [asdict(e) for e in self.slots.events]
        self._pending = []
        policy, mem = slot.policy, slot.policy.memory
        policy.request = self.requests  # one count over all slots: a checkpoint may move to another slot
        served = policy.serve(tokens, self.user_starts(prompt, tokens))
        self.requests = policy.request
        why = "" if not mem.window_overwritten else (
            "the subject's window cells were overwritten by tokens a trim then removed; their slots (and which "
            "cells remain) cannot be rebuilt from the kept calls")
        self._plans[tuple(tokens)] = (mem.plan(len(tokens), self._tail_ok), why)
        told = []
        if self.drafter is not None:
            out, top, rows, event = self._speculate(policy, mem.ctx, n_predict, k, tuple(tokens))
            told.append(event)
        else:
            out, top, rows = self._generate(mem.ctx, n_predict, k, policy.append)
        mem.forget_checkpoints(self.slots.live_states())
        self._rows[(prompt, k)] = rows
        return Completion(tokens, out, self.model.detokenize(out), top, served.n_reused, served.n_processed,
                          events + [asdict(e) for e in served.events] + told, self._ends_eog(out), slot=slot.id,
                          held=list(policy.tokens))

    def slot_action(self, action: str, file: str | None, id_slot: int) -> int:
        self._check_slot(id_slot)
        slot = self.slots.slots[id_slot]
        self.slots.events = []  # the last request's events were told with it
        try:
            if action == "save":
                return self.slots.save_file(slot, file)
            if action == "restore":
                return self.slots.restore_file(slot, file)
            if action == "damage":
                return damage(self.slots.files_dir / file)
            return self.slots.erase(slot)
        except SlotFileError as e:
            raise Refused(str(e)) from None
        finally:
            self._pending += [asdict(e) for e in self.slots.events]
            self.slots.events = []

    def reference(self, prompt: Prompt, n_predict: int, k: int) -> Completion:
        tokens = self.tokens_of(prompt, n_predict)
        pos, inexact = self._process(self.ref, tokens)
        spoken = self._verified.get(tuple(tokens)) if self.replay else None
        if spoken is not None:
            out, top = self._along_verified(prompt, tokens, n_predict, k, *spoken)
        else:
            out, top, _ = self._generate(self.ref, n_predict, k, self._ref_appender(pos),
                                         self._rows.get((prompt, k), []))
        done = Completion(tokens, out, self.model.detokenize(out), top, 0, len(tokens), [], self._ends_eog(out),
                          exact=not inexact, inexact=inexact)
        return done

    def _ref_appender(self, pos: int):
        state = {"pos": pos}

        def append(tok: int) -> None:
            self.ref.decode([tok], state["pos"])
            state["pos"] += 1

        return append

    def _ends_eog(self, out: list[int]) -> bool:
        return bool(out) and self.model.is_eog(out[-1])

    def score(self, prompt: Prompt, tokens: list[int], k: int) -> list[TopK]:
        """Teacher forcing: the reference's distribution at every slot of the subject's answer.

        The prompt goes in the subject's calls and the answer one token per decode, as it was
        generated (a batched pass takes other kernels: a gemm instead of a gemv).
        """
        if not tokens:
            return []
        forced = self._forced.get((prompt, k))
        if forced is not None and forced[0] == tokens:  # a speculated reply: its verify batches' rows
            return forced[1]
        pos, _ = self._process(self.ref, self.tokens_of(prompt))
        rows: list[TopK] = []
        for i, tok in enumerate(tokens):
            rows.append(distribution(self.ref.logits(-1), k)[1])
            if i < len(tokens) - 1:
                self.ref.decode([tok], pos + i)
        return rows

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.model.tokenize(text, add_special)

    def detokenize(self, tokens: list[int]) -> list[str]:
        return [self.model.piece(t) for t in tokens]

    def decode_seconds(self) -> float:
        return self.decode_closed + sum(c.decode_seconds for c in (*self.contexts, self.ref) if c is not None)

    def _tail_ok(self, call: Call) -> bool:
        """Whether a cut-off tail can be replayed without changing what is kept.

        Attention cells past a trim are simply gone. A sliding-window cache overwrites cells
        that the window has left as of the start of each ubatch: a tail in the same ubatch as
        the last kept token only overwrites cells the kept tokens no longer see either; a tail
        reaching into a later ubatch could overwrite cells they still see, unless it stays in
        the first window. Recurrent state absorbs every token: no tail is ever replayed there.
        """
        end, ub = call.pos0 + len(call.tokens), self.settings.n_ubatch
        same_ubatch = (call.n - 1) // ub == (len(call.tokens) - 1) // ub
        return self.kind == "attention" or (self.kind == "swa" and (same_ubatch or end <= self.n_swa))

    def _process(self, ctx: Context, tokens: list[int]) -> tuple[int, str]:
        """The whole prompt from empty memory, in the subject's decode calls where we have them.

        Returns the positions processed and, where the result need not be bit-exact, why.
        """
        ctx.clear()
        plan, why = self._plans.get(tuple(tokens), (None, ""))
        if not self.replay:  # chunks moved by --cache-reuse have no other truth than the same moves
            plan, why = (plan, f"{CALIBRATED}, but for the chunks --cache-reuse moved: their calls and moves") \
                if plan is not None and any(step.moved for step in plan) else (None, CALIBRATED)
        elif plan is None:
            why = "the subject's decode calls are not known"
        if plan is None:
            nb = self.settings.n_batch
            plan = [Step(p, min(nb, len(tokens) - p)) for p in range(0, len(tokens), nb)]
        cut = run_plan(ctx, plan, tokens.__getitem__)
        if cut is not None and not why:
            why = f"the subject's batch at position {cut.pos0} was cut back to {cut.keep} tokens, " + (
                "across ubatches past the first window: its tail is not replayed (it could overwrite cells the "
                "kept tokens see), so sliding-window cells sit in other slots and attention sums them in another "
                "order"
                if self.kind == "swa" else "and a tail is not replayed into recurrent state")
        return len(tokens), why

    def _generate(self, ctx: Context, n_predict: int, k: int, append, known: list[Row] = ()) \
            -> tuple[list[int], list[TopK], list[Row]]:
        """Greedy generation, one token per decode; `known` are the subject's rows for the same prompt.

        A row of logits bit-identical to the subject's at the same position (the same digest) has
        the same greedy token and top-k: they are taken from there instead of being ranked again,
        which halves that work on a correct cache. Any other row is ranked on its own.
        """
        out: list[int] = []
        top: list[TopK] = []
        rows: list[Row] = []
        for i in range(n_predict):
            row = self._rank(ctx.logits(-1), k, known[i] if i < len(known) else None)
            rows.append(row)
            tok = row[1]
            out.append(tok)  # an end-of-generation token is compared too; the runner keeps it out of the chat
            top.append(row[2])
            if self.model.is_eog(tok) or i == n_predict - 1:
                break
            append(tok)
        return out, top, rows

    @staticmethod
    def _rank(logits: np.ndarray, k: int, known: Row | None = None) -> Row:
        """One row's greedy token and top k; taken from `known` (the subject's row there) where it is bit-identical."""
        digest = hashlib.sha1(logits).digest()  # a row's identity; sha1 is the fastest here (0.5 ms per MB)
        return known if known is not None and known[0] == digest else (digest, *distribution(logits, k))



def library_name(libllama: str | None) -> str:
    """The llama.cpp under test in-process, as the report names it."""
    bindings = f"llama-cpp-python {pins.LLAMA_CPP_PYTHON_VERSION}"
    if not libllama:
        return f"llama.cpp {pins.LLAMA_CPP_COMMIT} in-process ({bindings})"
    from .. import builds

    rec = builds.library_record(Path(libllama))
    what = f"{rec['label']} ({rec['version']})" if rec else "a libllama built elsewhere"
    return f"llama.cpp {what} in-process ({bindings}, libllama {libllama})"


def slot_settings(s: SessionSettings) -> SlotSettings:
    """The scenario's slot settings, llama-server's defaults where it states none (a server started with -m)."""
    d = SlotSettings()
    return SlotSettings(d.n_parallel if s.n_parallel is None else s.n_parallel, s.unified_kv,
                        d.cache_ram if s.cache_ram is None else s.cache_ram,
                        d.cache_idle_slots if s.cache_idle_slots is None else s.cache_idle_slots,
                        d.similarity if s.slot_prompt_similarity is None else s.slot_prompt_similarity, s.n_ctx)


def _context_part(s: SessionSettings) -> tuple:
    """What a llama_context is made with; the checkpoint settings only change the policy."""
    return (s.n_ctx, s.n_batch, s.n_ubatch, s.threads, s.swa_full)


class InprocEngine:
    """The runner's handle: the Engine interface, each call carried out in the worker."""

    def __init__(self, path: str, name: str, fault: str | None = None, timeout: float = 900.0, replay: bool = True,
                 libllama: str | None = None):
        env = {"LLAMA_CPP_LIB_PATH": libllama} if libllama else {}
        self.asked_libllama, self.replay = libllama, replay
        self.files = rundir.directory("slots", name)  # the slot: save / restore steps' files
        self.worker = Worker("llama_cachecheck.engines.inproc:Session", (path, fault, replay, self.files), name=name,
                             timeout=timeout, env=env)
        info = self.worker.call("info")
        self.info = EngineInfo("inproc", name, path, info["arch"], info["memory"], info["n_swa"],
                               info["n_vocab"], library_name(libllama), info["builtin_template"], info["ascii_only"],
                               template_features=tuple(info["template_features"]))
        self.libllama = info["libllama"]  # the file the worker loaded, as the loader opened it
        self._last_reference: tuple[Prompt, int, Completion] | None = None  # what score() may reuse
        if libllama and Path(self.libllama).parent != Path(libllama).resolve():
            self.worker.close()  # bindings that look for their library elsewhere would silently test the wrong one
            raise StartError(f"{name}: asked for the libllama in {libllama}, but the engine loaded {self.libllama}")

    def shifts(self) -> str:
        return self.worker.call("shifts")

    def replay_args(self) -> list[str]:
        args = ["--engine", "inproc"]
        if self.asked_libllama:
            args += ["--libllama", str(self.asked_libllama)]
        if not self.replay:
            args += ["--tolerance", "calibrated"]
        return args

    def subject_command(self) -> str:
        return ""  # no process of its own to name: the build is in info.llama_cpp

    def start_session(self, settings: SessionSettings) -> SessionSettings:
        self.worker.call("start_session", settings)
        d = slot_settings(settings)  # the runner's promises follow what the slots do
        return replace(settings, n_parallel=d.n_parallel, kv_unified=d.kv_unified, cache_ram=d.cache_ram,
                       cache_idle_slots=d.cache_idle_slots, slot_prompt_similarity=d.similarity)

    def complete(self, prompt: Prompt, n_predict: int, top_k: int, id_slot: int | None = None) -> Completion:
        return self.worker.call("complete", prompt, n_predict, top_k, id_slot)

    def complete_parallel(self, requests: list[tuple[Prompt, int, int, int | None]]) -> list[Completion]:
        return self.worker.call("complete_parallel", requests)

    def slot_action(self, action: str, file: str | None, id_slot: int) -> int:
        return self.worker.call("slot_action", action, file, id_slot)

    def reference(self, prompt: Prompt, n_predict: int, top_k: int, held: list[int] | None = None) -> Completion:
        done = self.worker.call("reference", prompt, n_predict, top_k)
        self._last_reference = (prompt, top_k, done)
        return done

    def score(self, prompt: Prompt, tokens: list[int], top_k: int) -> list[TopK]:
        """Only needed after a divergence: where the reference generated exactly these tokens, its
        own run already is this computation, and it is returned as it is (no round trip)."""
        last = self._last_reference
        if last is not None and last[:2] == (prompt, top_k) and last[2].tokens == tokens:
            return last[2].top
        return self.worker.call("score", prompt, tokens, top_k)

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.worker.call("tokenize", text, add_special)

    def detokenize(self, tokens: list[int]) -> list[str]:
        return self.worker.call("detokenize", tokens)

    def decode_seconds(self) -> float:
        return self.worker.call("decode_seconds")

    def close(self) -> None:
        self.worker.close()
        rundir.discard(self.files)
