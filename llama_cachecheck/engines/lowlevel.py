"""A thin layer over llama.cpp's C API (llama-cpp-python's low-level bindings).

Deliberately not llama-cpp-python's `Llama` class: its own prefix cache is a different
system under test. Here every decode, memory trim and state save is one explicit call, so
the checkpoint policy (llama_cachecheck/policy.py) can be read against llama-server's.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from functools import cached_property
from pathlib import Path

import jinja2.sandbox
import llama_cpp as ll
import numpy as np

from .base import EngineError, SessionSettings

SEQ = 0  # one sequence per context: a subject session is one server slot
PARTIAL_ONLY = ll.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY

_quiet_cb = None


@ll.llama_progress_callback
def _silent_progress(_progress, _ud):  # ctypes callback
    return True




def quiet_logs() -> None:
    """Send llama.cpp's log to stderr only for errors; the worker keeps stderr as a crash tail."""
    global _quiet_cb

    @ll.llama_log_callback
    def _cb(level, text, _ud):  # ctypes callback
        if level >= 4:  # GGML_LOG_LEVEL_ERROR
            os.write(2, text)

    _quiet_cb = _cb
    ll.llama_log_set(_quiet_cb, ctypes.c_void_p())


# Defaults the pinned bindings read from llama_context_default_params / llama_model_default_params. A library
# whose structs are laid out otherwise (a field added or moved) shows other values here, and would be handed
# structs it misreads: such a library is refused before anything runs on it.
EXPECTED_DEFAULTS = {
    "context": {"n_batch": 2048, "n_ubatch": 512, "n_seq_max": 1, "n_rs_seq": 0, "n_outputs_max": 0,
                "n_outputs_max_per_seq": 1, "type_k": 1, "type_v": 1, "swa_full": True, "kv_unified": False},
    "model": {"split_mode": 1, "main_gpu": 0, "vocab_only": False, "check_tensors": False, "use_extra_bufts": True},
}


def loaded_library() -> str:
    """The libllama.so this process bound (llama-cpp-python opens it by path: LLAMA_CPP_LIB_PATH or its own)."""
    return str(Path(ll.llama_cpp._lib._name).resolve())


def check_abi() -> None:
    """Refuse a libllama whose structs the pinned bindings would misread (see EXPECTED_DEFAULTS)."""
    got = {"context": ll.llama_context_default_params(), "model": ll.llama_model_default_params()}
    for struct, fields in EXPECTED_DEFAULTS.items():
        wrong = {f: getattr(got[struct], f) for f, v in fields.items() if getattr(got[struct], f) != v}
        if wrong:
            raise EngineError(f"its llama_{struct}_params are laid out otherwise than llama-cpp-python "
                              f"{ll.__version__} expects (read {wrong}, expected "
                              f"{ {f: fields[f] for f in wrong} })")


class Model:
    def __init__(self, path: str | Path):
        self.path = str(path)
        params = ll.llama_model_default_params()
        params.progress_callback = _silent_progress
        # No weight repacking: its AMX kernels crash on K-quants (SIGSEGV in ggml_backend_amx_mul_mat on
        # a Sapphire Rapids VM, Gemma 3 270M Q4_K_M), and one kernel choice on every CPU keeps the
        # calibrated noise thresholds portable. The server gets --no-repack for the same reasons.
        params.use_extra_bufts = False
        self.ptr = ll.llama_model_load_from_file(self.path.encode(), params)
        if not self.ptr:
            raise EngineError(f"llama.cpp could not load {self.path} (a truncated file, or an architecture this "
                              "llama.cpp does not know)")
        self.vocab = ll.llama_model_get_vocab(self.ptr)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self._pieces: dict[tuple[int, bool], bytes] = {}

    def close(self) -> None:
        if self.ptr:
            ll.llama_model_free(self.ptr)
            self.ptr = None

    @cached_property
    def memory_kind(self) -> str:
        if ll.llama_model_is_hybrid(self.ptr):
            return "hybrid"
        if ll.llama_model_is_recurrent(self.ptr):
            return "recurrent"
        return "swa" if self.n_swa > 0 else "attention"

    @cached_property
    def n_swa(self) -> int:
        return int(ll.llama_model_n_swa(self.ptr))

    def meta(self, key: str) -> str | None:
        size = 4096
        while True:
            buf = ctypes.create_string_buffer(size)
            n = ll.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:  # long values (chat templates) report their length: ask again with room
                return buf.value.decode("utf-8", "replace")
            size = n + 1

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        raw = text.encode()
        cap = len(raw) + 16
        out = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.vocab, raw, len(raw), out, cap, add_special, True)
        if n < 0:
            raise EngineError(f"tokenizer needs {-n} slots for {len(raw)} bytes")
        return list(out[:n])

    def piece(self, token: int) -> str:
        """What the report shows for one token: control tokens by name (<s>, </s>)."""
        return self._piece_bytes(token, True).decode("utf-8", "replace")

    def detokenize(self, tokens: list[int]) -> str:
        """A reply's text as llama-server writes it: control tokens render as nothing (its `special` is off),
        so the next turn's prompt is the same on both engines."""
        return b"".join(self._piece_bytes(t, False) for t in tokens).decode("utf-8", "replace")

    def _piece_bytes(self, token: int, special: bool) -> bytes:
        key = (token, special)  # every reply is detokenized twice per turn: ask llama.cpp once per token
        if key not in self._pieces:
            buf = ctypes.create_string_buffer(256)
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            self._pieces[key] = buf.raw[: max(n, 0)]
        return self._pieces[key]

    @cached_property
    def row_type(self) -> type:
        """The ctypes type of one row of logits (building it per token costs more than reading the row)."""
        return ctypes.c_float * self.n_vocab

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.vocab, token))

    @cached_property
    def builtin_template(self) -> str | None:
        """llama.cpp's built-in template for a GGUF that ships none (llama-server: --chat-template)."""
        if self.meta("tokenizer.chat_template"):
            return None
        return BUILTIN_TEMPLATES.get(self.meta("general.architecture") or "")

    @cached_property
    def user_delimiter(self) -> list[int]:
        """The tokens that open a user message in this template (llama-server's message delimiter)."""
        try:  # what two one-message prompts share is the template's opening of a user message
            a, b = (self.render_chat([{"role": "user", "content": c}]) for c in ("Alpha", "Zulu"))
        except EngineError:
            return []
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        head = a[:n]
        return head[1:] if head and head[0] == ll.llama_vocab_bos(self.vocab) else head

    def render_chat(self, messages: list[dict], tools: list | None = None, variables: dict | None = None) -> list[int]:
        """Apply the model's own chat template (jinja, as llama-server does) and tokenize: the tools and the
        template's own variables given to it as llama-server gives them (tools only when there are some)."""
        template = self.meta("tokenizer.chat_template")
        if not template and self.builtin_template:
            return self.tokenize(self._apply_builtin(messages), add_special=True)
        if not template:
            raise EngineError(f"{self.path}: the model has no chat template; use `tokens` steps")
        bos = self.piece(ll.llama_vocab_bos(self.vocab))
        eos = self.piece(ll.llama_vocab_eos(self.vocab))
        text = self._template.render(**(variables or {}), messages=messages, add_generation_prompt=True,
                                     bos_token=bos, eos_token=eos, **({"tools": tools} if tools else {}))
        # a template that writes BOS itself must not get a second one from the tokenizer
        return self.tokenize(text, add_special=not (bos and text.startswith(bos)))

    @cached_property
    def _template(self) -> jinja2.Template:
        # compiling a template costs more than rendering it: once per model, not once per prompt
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        env.filters["tojson"] = _tojson
        return env.from_string(self.meta("tokenizer.chat_template"))

    def _apply_builtin(self, messages: list[dict]) -> str:
        msgs = (ll.llama_chat_message * len(messages))()
        keep = []
        for i, m in enumerate(messages):
            role, content = m["role"].encode(), m["content"].encode()
            keep += [role, content]
            msgs[i].role, msgs[i].content = role, content
        size = 4096 + sum(len(k) for k in keep) * 2
        buf = ctypes.create_string_buffer(size)
        n = ll.llama_chat_apply_template(self.builtin_template.encode(), msgs, len(messages), True, buf, size)
        if n < 0 or n > size:
            raise EngineError(f"{self.path}: llama.cpp's built-in {self.builtin_template!r} template failed ({n})")
        return buf.raw[:n].decode("utf-8", "replace")


# architectures whose GGUFs are often shipped without a template, and llama.cpp's name for theirs
BUILTIN_TEMPLATES = {"gemma3": "gemma", "gemma2": "gemma", "gemma": "gemma"}


def _tojson(value, indent: int | None = None, separators: tuple[str, str] | None = None, sort_keys: bool = False,
            ensure_ascii: bool = False) -> str:
    """`tojson` as chat templates expect it (Hugging Face's, and llama.cpp's own jinja): keys in their
    order, nothing HTML-escaped. jinja2's sorts the keys and escapes <, > and &, so a tool definition would
    render differently in-process than on the server."""
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)


def _raise_template_error(message: str) -> None:
    raise EngineError(f"chat template: {message}")


class Context:
    """One llama_context with one sequence; the unit a policy drives."""

    def __init__(self, model: Model, settings: SessionSettings):
        self.model = model
        self.settings = settings
        p = ll.llama_context_default_params()
        p.n_ctx = settings.n_ctx
        p.n_batch = settings.n_batch
        p.n_ubatch = settings.n_ubatch
        p.n_seq_max = 1
        p.n_threads = settings.threads
        p.n_threads_batch = settings.threads
        p.swa_full = settings.swa_full
        # No flash attention: on the CPU it accumulates in F16, and on Gemma 3 270M the batch split
        # alone then moves logprobs by ~2.7 nats (100 tokens as 64+36 vs 50+50); without it the
        # same splits agree bit for bit. The reference must be an oracle, not a second noise source.
        # The server engine passes -fa off: the thresholds were calibrated on these kernels.
        p.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ptr = ll.llama_init_from_model(model.ptr, p)
        if not self.ptr:
            raise EngineError(f"{model.path}: could not create a context with {settings}")
        self.mem = ll.llama_get_memory(self.ptr)
        self._batch = ll.llama_batch_init(settings.n_batch, 0, 1)
        nb = settings.n_batch
        for i in range(nb):  # one sequence: set once, not per decode
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = SEQ
        # numpy views of the batch's arrays: a decode fills them with slices, not a Python loop per token
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(nb,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(nb,))
        self._wants = np.ctypeslib.as_array(self._batch.logits, shape=(nb,))
        self.decode_seconds = 0.0  # time inside llama_decode, for the benchmark

    def close(self) -> None:
        if self.ptr:
            ll.llama_batch_free(self._batch)
            ll.llama_free(self.ptr)
            self.ptr = None

    # memory -------------------------------------------------------------------------------
    def clear(self) -> None:
        ll.llama_memory_clear(self.mem, True)

    def pos_min(self) -> int:
        return int(ll.llama_memory_seq_pos_min(self.mem, SEQ))

    def pos_max(self) -> int:
        return int(ll.llama_memory_seq_pos_max(self.mem, SEQ))

    def seq_rm(self, p0: int, p1: int = -1) -> bool:
        return bool(ll.llama_memory_seq_rm(self.mem, SEQ, p0, p1))

    def can_shift(self) -> bool:
        return bool(ll.llama_memory_can_shift(self.mem))

    def seq_add(self, p0: int, p1: int, shift: int) -> None:
        ll.llama_memory_seq_add(self.mem, SEQ, p0, p1, shift)

    def save_partial(self) -> bytes:
        """The non-rollbackable part of the memory (recurrent state, SWA cells)."""
        size = ll.llama_state_seq_get_size_ext(self.ptr, SEQ, PARTIAL_ONLY)
        buf = (ctypes.c_uint8 * size)()
        n = ll.llama_state_seq_get_data_ext(self.ptr, buf, size, SEQ, PARTIAL_ONLY)
        if n != size:
            raise EngineError(f"state save wrote {n} of {size} bytes")
        return bytes(buf)

    def load_partial(self, data: bytes) -> None:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if ll.llama_state_seq_set_data_ext(self.ptr, buf, len(data), SEQ, PARTIAL_ONLY) == 0:
            raise EngineError("llama.cpp refused to load a checkpoint")

    def save_full(self) -> bytes:
        """The whole sequence (every cell), as llama-server saves a slot to its host-memory prompt cache."""
        size = ll.llama_state_seq_get_size_ext(self.ptr, SEQ, 0)
        buf = (ctypes.c_uint8 * size)()
        n = ll.llama_state_seq_get_data_ext(self.ptr, buf, size, SEQ, 0)
        if n != size:
            raise EngineError(f"state save wrote {n} of {size} bytes")
        return bytes(buf)

    def load_full(self, data: bytes) -> None:
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if ll.llama_state_seq_set_data_ext(self.ptr, buf, len(data), SEQ, 0) != len(data):
            raise EngineError("llama.cpp refused to load a saved prompt state")

    def save_file(self, path: Path, tokens: list[int]) -> int:
        """The sequence and its tokens to a file (the server's /slots save); the bytes written."""
        arr = (ll.llama_token * max(1, len(tokens)))(*tokens)
        return int(ll.llama_state_seq_save_file(self.ptr, str(path).encode(), SEQ, arr, len(tokens)))

    def load_file(self, path: Path, capacity: int) -> list[int] | None:
        """The sequence back from a file (the server's /slots restore); its tokens, or None where refused."""
        arr = (ll.llama_token * max(1, capacity))()
        n = ctypes.c_size_t(0)
        if not ll.llama_state_seq_load_file(self.ptr, str(path).encode(), SEQ, arr, capacity, ctypes.byref(n)):
            return None
        return list(arr[:n.value])

    # decoding -----------------------------------------------------------------------------
    def decode(self, tokens: list[int], pos0: int, all_logits: bool = False) -> None:
        """One llama_decode of at most n_batch tokens at positions pos0, pos0+1, ..."""
        n = len(tokens)
        if not 0 < n <= self.settings.n_batch:
            raise EngineError(f"batch of {n} tokens (n_batch = {self.settings.n_batch})")
        self._batch.n_tokens = n
        self._tokens[:n] = tokens
        self._pos[:n] = range(pos0, pos0 + n)
        self._wants[:n] = all_logits
        self._wants[n - 1] = True
        t0 = time.perf_counter()
        rc = ll.llama_decode(self.ptr, self._batch)
        self.decode_seconds += time.perf_counter() - t0
        if rc != 0:
            raise EngineError(f"llama_decode returned {rc} for {n} tokens at pos {pos0}")

    def logits(self, i: int = -1) -> np.ndarray:
        """A view of llama.cpp's row, valid until the next decode (callers copy what they keep)."""
        addr = ctypes.cast(ll.llama_get_logits_ith(self.ptr, i), ctypes.c_void_p).value
        return np.frombuffer(self.model.row_type.from_address(addr), dtype=np.float32)
